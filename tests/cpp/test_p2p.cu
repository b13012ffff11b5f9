// Standalone test of the P2P kernels (csrc/kernels/p2p.h) in virtual-rank mode against host fp64
// references. Needs a GPU (built everywhere, run only where one is present).
//
// R virtual ranks (2, 4, 8) hold their inputs in R buffers on the one device; the same kernels that run
// across GPUs run here with the same pointer tables, with stream order as the barrier. Checked:
//   * all-reduce (one-shot and two-shot), reduce-scatter, all-gather: every element within the bound of
//     an fp32 (fp64) accumulation of R terms plus one rounding of the fp64 sum, for sizes from 16 bytes
//     to 64 MB including lengths that are no multiple of the 16-byte vector, and misaligned pointers
//     (element-wise path);
//   * every virtual rank's output bitwise identical to rank 0's (same accumulation order everywhere);
//   * guard elements after each output bitwise unchanged (no write past the end);
//   * the fused all-reduce + bias + residual + RMSNorm (hidden up to 16384 + 8) and the RMSNorm backward;
//   * bad arguments throw std::runtime_error.
// Prints one line per case; exit status is non-zero on any failure.
#include "common/cuda_check.h"
#include "kernels/p2p.h"

#include "kernel_test.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

using namespace tpext::kernels;
using tpext::testing::from_f64;
using tpext::testing::to_f64;
using tpext::testing::Traits;

namespace {

constexpr int64_t kGuard = 19;  // elements after every buffer: must stay untouched

// A device array of n elements (+ guards, + `offset` leading elements to misalign it) and its host mirror.
template <typename T>
struct Buf {
  std::vector<T> host;
  T* dev = nullptr;
  int64_t n, offset;
  Buf(int64_t n_, int64_t off, std::mt19937_64& rng)
      : host(static_cast<size_t>(n_ + off + kGuard)), n(n_), offset(off) {
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    for (auto& v : host) v = from_f64<T>(dist(rng));
    TPEXT_CUDA_CHECK(cudaMalloc(&dev, sizeof(T) * host.size()));
    TPEXT_CUDA_CHECK(cudaMemcpy(dev, host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice));
  }
  ~Buf() { cudaFree(dev); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* at() { return dev + offset; }
  const T& operator[](int64_t i) const { return host[static_cast<size_t>(offset + i)]; }
  std::vector<T> fetch() const {
    std::vector<T> out(host.size());
    TPEXT_CUDA_CHECK(cudaMemcpy(out.data(), dev, sizeof(T) * out.size(), cudaMemcpyDeviceToHost));
    return out;
  }
};

template <typename T>
using Bufs = std::vector<std::unique_ptr<Buf<T>>>;

template <typename T>
Bufs<T> make_bufs(int n_bufs, int64_t n, int64_t off, std::mt19937_64& rng) {
  Bufs<T> b;
  for (int r = 0; r < n_bufs; ++r) b.push_back(std::make_unique<Buf<T>>(n, off, rng));
  return b;
}

template <typename T>
P2PGroup group_of(Bufs<T>& in) {
  P2PGroup g{};
  g.world = static_cast<int32_t>(in.size());
  for (size_t r = 0; r < in.size(); ++r) g.buffers[r] = in[r]->at();
  return g;
}

template <typename T>
std::vector<void*> ptrs_of(Bufs<T>& b) {
  std::vector<void*> p;
  for (auto& x : b) p.push_back(x->at());
  return p;
}

// Compares every rank's output with ref (tolerance tol[i]); rank r must equal rank 0 bitwise and leave
// its guards alone. Returns true when all hold; prints one line.
template <typename T>
bool check_outputs(const char* what, Bufs<T>& outs, const std::vector<double>& ref, const std::vector<double>& tol) {
  int64_t bad = 0, differ = 0, clobbered = 0;
  double worst = 0.0;
  const std::vector<T> first = outs[0]->fetch();
  for (size_t r = 0; r < outs.size(); ++r) {
    const std::vector<T> got = r == 0 ? first : outs[r]->fetch();
    const Buf<T>& b = *outs[r];
    for (int64_t i = 0; i < static_cast<int64_t>(got.size()); ++i) {
      const int64_t k = i - b.offset;
      if (k < 0 || k >= b.n) {
        if (std::memcmp(&got[i], &b.host[i], sizeof(T)) != 0) ++clobbered;
        continue;
      }
      const double err = std::fabs(to_f64(got[i]) - ref[k]);
      if (!(err <= tol[k])) ++bad;
      if (tol[k] > 0) worst = std::max(worst, err / tol[k]);
      if (std::memcmp(&got[i], &first[i], sizeof(T)) != 0) ++differ;
    }
  }
  const bool ok = bad == 0 && differ == 0 && clobbered == 0;
  std::printf("%s %-4s %s  worst=%.3f tol  bad=%lld not-bitwise-equal=%lld clobbered=%lld\n", ok ? "PASS" : "FAIL",
              Traits<T>::kName, what, worst, static_cast<long long>(bad), static_cast<long long>(differ),
              static_cast<long long>(clobbered));
  return ok;
}

// Reference of sum_p in[p][base + i] and its bound: R accumulation roundings + one storage rounding.
template <typename T>
void sum_ref(Bufs<T>& in, int64_t base, int64_t n, std::vector<double>* ref, std::vector<double>* tol) {
  ref->assign(n, 0.0);
  tol->assign(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0, mag = 0.0;
    for (auto& b : in) {
      s += to_f64((*b)[base + i]);
      mag += std::fabs(to_f64((*b)[base + i]));
    }
    (*ref)[i] = s;
    (*tol)[i] = Traits<T>::kEps * std::fabs(s) + in.size() * Traits<T>::kAcc * mag;
  }
}

template <typename T>
int test_collectives(int world, int64_t n, int64_t off, std::mt19937_64& rng) {
  int failures = 0;
  char what[160];
  auto in = make_bufs<T>(world, n, off, rng);
  std::vector<double> ref, tol;
  sum_ref(in, 0, n, &ref, &tol);
  for (P2PAlgo algo : {P2PAlgo::kOneShot, P2PAlgo::kTwoShot}) {
    auto scratch = make_bufs<T>(world, n, off, rng);  // the two-shot algorithm writes into its buffers
    for (int r = 0; r < world; ++r) {
      TPEXT_CUDA_CHECK(cudaMemcpy(scratch[r]->at(), in[r]->at(), sizeof(T) * n, cudaMemcpyDeviceToDevice));
    }
    auto outs = make_bufs<T>(world, n, off, rng);
    P2PAllReduceParams p{group_of(scratch), nullptr, n, Traits<T>::kDtype, algo};
    launch_p2p_all_reduce_virtual(p, ptrs_of(outs).data(), nullptr);
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    std::snprintf(what, sizeof(what), "all_reduce %s R=%d n=%lld off=%lld",
                  algo == P2PAlgo::kOneShot ? "one-shot" : "two-shot", world, static_cast<long long>(n),
                  static_cast<long long>(off));
    if (!check_outputs(what, outs, ref, tol)) ++failures;
  }
  // Reduce-scatter of R blocks of m elements; all-gather of every input.
  const int64_t m = n / world;
  if (m > 0) {
    auto outs = make_bufs<T>(world, m, off, rng);
    P2PScatterGatherParams p{group_of(in), nullptr, m * world, Traits<T>::kDtype};
    launch_p2p_reduce_scatter_virtual(p, ptrs_of(outs).data(), nullptr);
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    // Rank r's output is block r: check each against its own reference (no cross-rank equality here).
    for (int r = 0; r < world; ++r) {
      sum_ref(in, r * m, m, &ref, &tol);
      Bufs<T> one;
      one.push_back(std::move(outs[r]));
      std::snprintf(what, sizeof(what), "reduce_scatter R=%d block %d m=%lld off=%lld", world, r,
                    static_cast<long long>(m), static_cast<long long>(off));
      if (!check_outputs(what, one, ref, tol)) ++failures;
    }
  }
  if (n * world <= (int64_t{1} << 24)) {
    auto outs = make_bufs<T>(world, n * world, off, rng);
    P2PScatterGatherParams p{group_of(in), nullptr, n, Traits<T>::kDtype};
    launch_p2p_all_gather_virtual(p, ptrs_of(outs).data(), nullptr);
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    ref.assign(n * world, 0.0);
    tol.assign(n * world, 0.0);
    for (int r = 0; r < world; ++r) {
      for (int64_t i = 0; i < n; ++i) ref[r * n + i] = to_f64((*in[r])[i]);
    }
    std::snprintf(what, sizeof(what), "all_gather R=%d n=%lld off=%lld", world, static_cast<long long>(n),
                  static_cast<long long>(off));
    if (!check_outputs(what, outs, ref, tol)) ++failures;
  }
  return failures;
}

template <typename T>
int test_norm(int world, int64_t rows, int64_t hidden, bool bias, bool res, std::mt19937_64& rng) {
  const int64_t n = rows * hidden;
  auto in = make_bufs<T>(world, n, 0, rng);
  auto residual = make_bufs<T>(1, n, 0, rng);
  auto vec = make_bufs<T>(2, hidden, 0, rng);  // bias, weight
  auto outs = make_bufs<T>(world, n, 0, rng), new_res = make_bufs<T>(world, n, 0, rng);
  P2PResidualRMSNormParams p{};
  p.group = group_of(in);
  p.residual = res ? residual[0]->at() : nullptr;
  p.bias = bias ? vec[0]->at() : nullptr;
  p.weight = vec[1]->at();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = 1e-6f;
  p.dtype = Traits<T>::kDtype;
  launch_p2p_all_reduce_residual_rmsnorm_virtual(p, ptrs_of(outs).data(), ptrs_of(new_res).data(), nullptr);
  TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> h_ref, h_tol, o_ref(n), o_tol(n);
  sum_ref(in, 0, n, &h_ref, &h_tol);
  for (int64_t i = 0; i < n; ++i) {
    const double extra = (bias ? to_f64((*vec[0])[i % hidden]) : 0.0) + (res ? to_f64((*residual[0])[i]) : 0.0);
    h_ref[i] += extra;
    h_tol[i] += Traits<T>::kEps * std::fabs(extra) + 2 * Traits<T>::kAcc * std::fabs(extra);
  }
  // out from the kernel's own (rounded) new residual, in fp64: checks the normalisation alone.
  const std::vector<T> h_got = new_res[0]->fetch();
  for (int64_t row = 0; row < rows; ++row) {
    double ss = 0.0;
    for (int64_t j = 0; j < hidden; ++j) ss += to_f64(h_got[row * hidden + j]) * to_f64(h_got[row * hidden + j]);
    const double rstd = 1.0 / std::sqrt(ss / hidden + 1e-6);
    for (int64_t j = 0; j < hidden; ++j) {
      const double v = to_f64(h_got[row * hidden + j]) * rstd * to_f64((*vec[1])[j]);
      o_ref[row * hidden + j] = v;
      o_tol[row * hidden + j] = Traits<T>::kEps * std::fabs(v) + 256 * Traits<T>::kAcc * std::fabs(v) + 1e-30;
    }
  }
  char what[160];
  std::snprintf(what, sizeof(what), "rmsnorm R=%d rows=%lld hidden=%lld bias=%d res=%d", world,
                static_cast<long long>(rows), static_cast<long long>(hidden), bias, res);
  int failures = check_outputs((std::string(what) + " new_residual").c_str(), new_res, h_ref, h_tol) ? 0 : 1;
  failures += check_outputs((std::string(what) + " out").c_str(), outs, o_ref, o_tol) ? 0 : 1;
  return failures;
}

template <typename T>
int test_norm_backward(int64_t rows, int64_t hidden, bool grad_in, std::mt19937_64& rng) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t n = rows * hidden;
  auto t = make_bufs<T>(4, n, 0, rng);  // grad_out, grad_h_in, h, grad_h
  auto w = make_bufs<T>(1, hidden, 0, rng);
  const int64_t blocks = rmsnorm_backward_blocks(rows);
  A* part = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&part, sizeof(A) * blocks * hidden));
  RMSNormBackwardParams p{
      t[0]->at(),       grad_in ? t[1]->at() : nullptr, t[2]->at(), w[0]->at(), t[3]->at(), part, rows, hidden, 1e-6f,
      Traits<T>::kDtype};
  launch_rmsnorm_backward(p, nullptr);
  TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<A> part_host(blocks * hidden);
  TPEXT_CUDA_CHECK(cudaMemcpy(part_host.data(), part, sizeof(A) * part_host.size(), cudaMemcpyDeviceToHost));
  TPEXT_CUDA_CHECK(cudaFree(part));
  std::vector<double> dh_ref(n), dh_tol(n), dw_ref(hidden, 0.0), dw_mag(hidden, 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    double ss = 0.0, gn = 0.0, gn_mag = 0.0;
    for (int64_t j = 0; j < hidden; ++j) ss += std::pow(to_f64((*t[2])[row * hidden + j]), 2);
    const double rstd = 1.0 / std::sqrt(ss / hidden + 1e-6);
    for (int64_t j = 0; j < hidden; ++j) {
      const double g = to_f64((*t[0])[row * hidden + j]) * to_f64((*w[0])[j]);
      gn += g * to_f64((*t[2])[row * hidden + j]) * rstd;
      gn_mag += std::fabs(g * to_f64((*t[2])[row * hidden + j]) * rstd);
    }
    for (int64_t j = 0; j < hidden; ++j) {
      const int64_t i = row * hidden + j;
      const double dy = to_f64((*t[0])[i]), nn = to_f64((*t[2])[i]) * rstd, g = dy * to_f64((*w[0])[j]);
      const double din = grad_in ? to_f64((*t[1])[i]) : 0.0;
      dh_ref[i] = rstd * (g - nn * gn / hidden) + din;
      dh_tol[i] = Traits<T>::kEps * std::fabs(dh_ref[i]) +
                  256 * Traits<T>::kAcc * (rstd * (std::fabs(g) + std::fabs(nn) * gn_mag / hidden) + std::fabs(din));
      dw_ref[j] += dy * nn;
      dw_mag[j] += std::fabs(dy * nn);
    }
  }
  Bufs<T> dh;
  dh.push_back(std::move(t[3]));
  char what[160];
  std::snprintf(what, sizeof(what), "rmsnorm_backward rows=%lld hidden=%lld grad_in=%d", static_cast<long long>(rows),
                static_cast<long long>(hidden), grad_in);
  int failures = check_outputs(what, dh, dh_ref, dh_tol) ? 0 : 1;
  int64_t bad = 0;
  for (int64_t j = 0; j < hidden; ++j) {
    double s = 0.0;
    for (int64_t b = 0; b < blocks; ++b) s += part_host[b * hidden + j];
    if (!(std::fabs(s - dw_ref[j]) <= 256 * Traits<T>::kAcc * dw_mag[j] + 1e-30)) ++bad;
  }
  std::printf("%s %-4s %s grad_weight  bad=%lld\n", bad ? "FAIL" : "PASS", Traits<T>::kName, what,
              static_cast<long long>(bad));
  return failures + (bad ? 1 : 0);
}

template <typename T>
int run_dtype(std::mt19937_64& rng) {
  int failures = 0;
  const int64_t vec = 16 / static_cast<int64_t>(sizeof(T));
  // 16 bytes, odd lengths around the vector width, a few KB, and 64 MB per rank.
  const int64_t sizes[] = {
      vec, 1, 7, vec + 1, 1000 + 3, (int64_t{1} << 16) + 5, (int64_t{64} << 20) / static_cast<int64_t>(sizeof(T))};
  for (int world : {2, 4, 8}) {
    for (int64_t n : sizes) {
      if (n * static_cast<int64_t>(sizeof(T)) >= (int64_t{64} << 20) && world == 8 && sizeof(T) < 4)
        continue;  // host time
      failures += test_collectives<T>(world, n, 0, rng);
    }
    failures += test_collectives<T>(world, 1000 + 3, 1, rng);  // misaligned: element-wise kernels
    for (int64_t hidden : {13, 128, 4096, 16384 + 8}) {
      for (int mask = 0; mask < 4; ++mask)
        failures += test_norm<T>(world, hidden > 4096 ? 3 : 67, hidden, mask & 1, mask & 2, rng);
    }
  }
  for (int64_t hidden : {13, 4096}) {
    for (int64_t rows : {1, 5, 300}) failures += test_norm_backward<T>(rows, hidden, rows != 5, rng);
  }
  return failures;
}

int run_argument_checks() {
  int failures = 0;
  auto expect_throw = [&](const char* what, auto&& fn) {
    try {
      fn();
      std::printf("FAIL args: %s did not throw\n", what);
      ++failures;
    } catch (const std::runtime_error& e) {
      std::printf("PASS args: %s -> %s\n", what, e.what());
    }
  };
  float* d = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&d, 64 * sizeof(float)));
  P2PGroup g{};
  g.world = 2;
  g.buffers[0] = d;
  g.buffers[1] = d + 16;
  void* outs[2] = {d + 32, d + 48};
  P2PAllReduceParams ar{g, d + 32, 16, DType::kFloat32, P2PAlgo::kOneShot};
  expect_throw("world = 9", [&] {
    auto p = ar;
    p.group.world = 9;
    launch_p2p_all_reduce_virtual(p, outs, nullptr);
  });
  expect_throw("numel < 0", [&] {
    auto p = ar;
    p.numel = -1;
    launch_p2p_all_reduce_virtual(p, outs, nullptr);
  });
  expect_throw("bad algo", [&] {
    auto p = ar;
    p.algo = static_cast<P2PAlgo>(5);
    launch_p2p_all_reduce_virtual(p, outs, nullptr);
  });
  expect_throw("null buffer", [&] {
    auto p = ar;
    p.group.buffers[1] = nullptr;
    launch_p2p_all_reduce_virtual(p, outs, nullptr);
  });
  expect_throw("device sync without signals", [&] { launch_p2p_all_reduce(ar, nullptr); });
  P2PGroup synced = g;  // device sync; the signal areas are never touched: every case throws before a launch
  synced.rank = 0;
  for (int q = 0; q < 2; ++q) synced.signals[q] = reinterpret_cast<uint32_t*>(d);
  expect_throw("device sync, misaligned out", [&] {
    auto p = ar;
    p.group = synced;
    p.out = d + 33;
    launch_p2p_all_reduce(p, nullptr);
  });
  expect_throw("device sync, misaligned weight", [&] {
    P2PResidualRMSNormParams p{};
    p.group = synced;
    p.weight = d + 1;
    p.out = d + 32;
    p.new_residual = d + 48;
    p.rows = 1, p.hidden = 16, p.eps = 1e-6, p.dtype = DType::kFloat32;
    launch_p2p_all_reduce_residual_rmsnorm(p, nullptr);
  });
  expect_throw("reduce-scatter numel % world", [&] {
    P2PScatterGatherParams p{g, d, 15, DType::kFloat32};
    launch_p2p_reduce_scatter_virtual(p, outs, nullptr);
  });
  TPEXT_CUDA_CHECK(cudaFree(d));
  return failures;
}

}  // namespace

int main() {
  return tpext::testing::test_main("test_p2p", "case", [] {
    std::mt19937_64 rng(20251121);
    const int failures = run_argument_checks();
    return failures + tpext::testing::sum_over_dtypes([&](auto t) { return run_dtype<decltype(t)>(rng); });
  });
}
