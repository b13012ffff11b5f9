// Fused all-reduce + residual + RMSNorm against the same three steps unfused, on R virtual ranks of
// one GPU.
//
//   fused    launch_p2p_all_reduce_residual_rmsnorm_virtual: one kernel per rank reads the row from
//            every rank's buffer, adds the residual, writes the new residual and the normalised output.
//   unfused  what a layer without the fused op runs, one kernel per step and rank: tpext's one-shot
//            P2P all-reduce into y, then y += residual (kernels/epilogue.h), then out = rms_norm(y) * w
//            (rmsnorm_kernel below: one block per row, 16-byte accesses, the fused kernel's own
//            reduction and rounding, so the comparison measures the fusion, not a weak baseline).
//
// Virtual ranks (kernels/p2p.h): the R ranks' kernels run one after another on one stream and read all
// R buffers from this GPU's memory. A run is all R ranks; "per rank" is a run / R. This measures the
// kernels and what fusing saves (launches, passes over memory), not NVLink: the device-synchronised
// path, and with it the latency floor of a real multi-GPU call, needs several GPUs.
//
// Timing: `--graph-runs` runs captured in one CUDA graph, so host launch overhead is left out as it is
// in a captured decode step; the graph is replayed `--iters` times between CUDA events after warm-up;
// the median replay / graph-runs is one run.
// Correctness first: every rank's output of both paths against an fp64 host reference of the same
// inputs; the fused outputs must also be bitwise identical across ranks. A failure exits with status 1.
// Napkin: the bytes the fused kernels of a run must move (each rank reads R inputs and the residual,
// writes the output and the new residual) at the device-to-device copy bandwidth measured here.
// Goal (docs/p2p.md): fused >= 1.3x unfused at <= 128 tokens, hidden 8192, bf16.
//
// usage: tpext_bench_p2p_rmsnorm [--ranks 8] [--rows 1,2,8,32,128,512] [--hidden 8192]
//                                [--dtypes bf16,fp16,fp32] [--iters 20] [--graph-runs 50] [--eps 1e-6]
//                                [--copy-mb 512] [--check] [--json PATH]
// The JSON records TPEXT_COMMIT from the environment (docs/benchmarks-cuda.md).
#include "common/cuda_check.h"
#include "common/dtype.cuh"
#include "common/options.cuh"
#include "kernels/epilogue.h"
#include "kernels/p2p.h"
#include "kernels/p2p_device.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using tpext::bench::DtypeInfo;
using namespace tpext::kernels;
using namespace tpext::kernels::p2p_detail;

constexpr uint32_t kResidualTensor = 100, kWeightTensor = 101;  // inputs of rank r are tensor r

const char* kUsage =
    "usage: tpext_bench_p2p_rmsnorm [--ranks 8] [--rows 1,2,8,32,128,512] [--hidden 8192] "
    "[--dtypes bf16,fp16,fp32] [--iters 20] [--graph-runs 50] [--eps 1e-6] [--copy-mb 512] [--check] [--json PATH]";

struct Options {
  int ranks = 8;
  std::vector<int64_t> rows = {1, 2, 8, 32, 128, 512};
  int64_t hidden = 8192;
  std::vector<std::string> dtypes = {"bf16", "fp16", "fp32"};
  int iters = 20, graph_runs = 50;
  double eps = 1e-6;
  int64_t copy_mb = 512;
  bool check_only = false;
  std::string json_path;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  tpext::bench::walk_flags(argc, argv, std::string(kUsage) + "\n", &o.check_only,
                           [&](const std::string& a, const std::string& v) {
    constexpr long long kBig = int64_t{1} << 31;
    if (a == "--ranks") o.ranks = static_cast<int>(tpext::bench::parse_int(a, v, 1, kP2PMaxRanks));
    else if (a == "--rows") o.rows = tpext::bench::parse_list<int64_t>(a, v, 1, kBig);
    else if (a == "--hidden") o.hidden = tpext::bench::parse_int(a, v, 1, kBig);
    else if (a == "--dtypes") o.dtypes = split(v);
    else if (a == "--iters") o.iters = static_cast<int>(tpext::bench::parse_int(a, v, 1, 100000));
    else if (a == "--graph-runs") o.graph_runs = static_cast<int>(tpext::bench::parse_int(a, v, 1, 100000));
    else if (a == "--copy-mb") o.copy_mb = tpext::bench::parse_int(a, v, 1, 1 << 20);
    else if (a == "--eps") o.eps = std::strtod(v.c_str(), nullptr);
    else if (a == "--json") o.json_path = v;
    else throw std::runtime_error("unknown argument " + a + "\n" + kUsage);
  });
  if (o.dtypes.empty()) throw std::runtime_error("--dtypes needs at least one value");
  for (const auto& d : o.dtypes) (void)tpext::bench::dtype_info(d);  // reject an unknown dtype before any work
  return o;
}

// out = rms_norm(h) * weight, one block per row; the arithmetic of the fused kernel's second half
// (fp32 sum of squares by block_sum, rstd = 1 / sqrt(mean + eps), one rounding). `N` elements per
// 16-byte access (1 when the rows are not 16-byte aligned).
template <typename T, int N>
__global__ void __launch_bounds__(1024)
    rmsnorm_kernel(const T* h, const T* weight, T* out, int64_t rows, int64_t hidden, double eps) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[32];
  const int64_t units = hidden / N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* hr = h + row * hidden;
    T* o = out + row * hidden;
    A sumsq = 0;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      const Pack<T, N> v = load_pack<T, N>(hr + u * N);
#pragma unroll
      for (int k = 0; k < N; ++k) sumsq += to_acc(v.v[k]) * to_acc(v.v[k]);
    }
    const A rstd = inv_sqrt(block_sum(sumsq, scratch) / static_cast<A>(hidden) + static_cast<A>(eps));
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      const Pack<T, N> v = load_pack<T, N>(hr + u * N);
      const Pack<T, N> w = load_pack<T, N>(weight + u * N);
      Pack<T, N> r;
#pragma unroll
      for (int k = 0; k < N; ++k) r.v[k] = from_acc<T>(to_acc(v.v[k]) * rstd * to_acc(w.v[k]));
      store_pack<T, N>(o + u * N, r);
    }
  }
}

void launch_rmsnorm(const DtypeInfo& dt, const void* h, const void* w, void* out, int64_t rows, int64_t hidden,
                    double eps, cudaStream_t s) {
  tpext::bench::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    const bool vec = hidden % V == 0;  // buffers come from cudaMalloc: 256-byte aligned
    const int64_t units = vec ? hidden / V : hidden;
    const unsigned threads = static_cast<unsigned>(std::clamp<int64_t>((units + 31) / 32 * 32, 32, 1024));
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 65535));
    if (vec)
      rmsnorm_kernel<T, V><<<grid, threads, 0, s>>>(static_cast<const T*>(h), static_cast<const T*>(w),
                                                    static_cast<T*>(out), rows, hidden, eps);
    else
      rmsnorm_kernel<T, 1><<<grid, threads, 0, s>>>(static_cast<const T*>(h), static_cast<const T*>(w),
                                                    static_cast<T*>(out), rows, hidden, eps);
  });
  TPEXT_CUDA_CHECK(cudaGetLastError());
}

// The device buffers of one (dtype, rows) case.
struct Case {
  DtypeInfo dt;
  int ranks = 0;
  int64_t rows = 0, hidden = 0, n = 0;
  double eps = 0;
  std::vector<void*> inputs, fused_out, fused_res, unfused_y, unfused_out;
  void* residual = nullptr;
  void* weight = nullptr;

  Case(const DtypeInfo& d, int r, int64_t rw, int64_t hd, double e, cudaStream_t s)
      : dt(d), ranks(r), rows(rw), hidden(hd), n(rw * hd), eps(e) {
    const size_t bytes = static_cast<size_t>(n) * dt.size;
    for (auto* list : {&inputs, &fused_out, &fused_res, &unfused_y, &unfused_out}) {
      list->assign(ranks, nullptr);
      for (void*& p : *list) TPEXT_CUDA_CHECK(cudaMalloc(&p, bytes));
    }
    TPEXT_CUDA_CHECK(cudaMalloc(&residual, bytes));
    TPEXT_CUDA_CHECK(cudaMalloc(&weight, static_cast<size_t>(hidden) * dt.size));
    for (int q = 0; q < ranks; ++q) tpext::bench::fill_inputs(dt, inputs[q], n, static_cast<uint32_t>(q), s);
    tpext::bench::fill_inputs(dt, residual, n, kResidualTensor, s);
    tpext::bench::fill_inputs(dt, weight, hidden, kWeightTensor, s);
  }
  ~Case() {
    for (auto* list : {&inputs, &fused_out, &fused_res, &unfused_y, &unfused_out}) {
      for (void* p : *list) cudaFree(p);
    }
    cudaFree(residual);
    cudaFree(weight);
  }
  Case(const Case&) = delete;
  Case& operator=(const Case&) = delete;

  P2PGroup group() const {
    P2PGroup g{};
    g.world = ranks;
    for (int q = 0; q < ranks; ++q) g.buffers[q] = inputs[q];
    return g;
  }

  void fused(cudaStream_t s) {
    P2PResidualRMSNormParams p{};
    p.group = group();
    p.residual = residual;
    p.weight = weight;
    p.rows = rows, p.hidden = hidden, p.eps = eps, p.dtype = dt.p2p;
    launch_p2p_all_reduce_residual_rmsnorm_virtual(p, fused_out.data(), fused_res.data(), s);
  }

  void unfused(cudaStream_t s) {
    P2PAllReduceParams ar{};
    ar.group = group();
    ar.numel = n, ar.dtype = dt.p2p, ar.algo = P2PAlgo::kOneShot;
    launch_p2p_all_reduce_virtual(ar, unfused_y.data(), s);
    for (int r = 0; r < ranks; ++r) {
      BiasResidualParams add{};
      add.y = unfused_y[r], add.ld_y = hidden, add.residual = residual, add.ld_residual = hidden;
      add.rows = rows, add.cols = hidden, add.dtype = dt.p2p;
      launch_bias_residual_add(add, s);
      launch_rmsnorm(dt, unfused_y[r], weight, unfused_out[r], rows, hidden, eps, s);
    }
  }

  // Bytes the fused kernels of one run must move: per rank R inputs + residual read, out + new residual written.
  double fused_bytes() const { return static_cast<double>(ranks) * (ranks + 3) * static_cast<double>(n) * dt.size; }
};

std::vector<double> download(const DtypeInfo& dt, const void* p, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  tpext::bench::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> host(static_cast<size_t>(n));
    TPEXT_CUDA_CHECK(cudaMemcpy(host.data(), p, static_cast<size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < host.size(); ++i) out[i] = tpext::bench::to_double(host[i]);
  });
  return out;
}

// Checks both paths of every rank against the fp64 reference; returns an empty string or what failed.
std::string check(Case& c, cudaStream_t s) {
  c.fused(s);
  c.unfused(s);
  TPEXT_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<double> ref(static_cast<size_t>(c.n)), h(static_cast<size_t>(c.hidden));
  for (int64_t row = 0; row < c.rows; ++row) {
    double sumsq = 0;
    for (int64_t j = 0; j < c.hidden; ++j) {
      const uint64_t i = static_cast<uint64_t>(row * c.hidden + j);
      double v = tpext::bench::input_value(c.dt, kResidualTensor, i);
      for (int q = 0; q < c.ranks; ++q) v += tpext::bench::input_value(c.dt, static_cast<uint32_t>(q), i);
      h[j] = v;
      sumsq += v * v;
    }
    const double rstd = 1.0 / std::sqrt(sumsq / static_cast<double>(c.hidden) + c.eps);
    for (int64_t j = 0; j < c.hidden; ++j) {
      ref[row * c.hidden + j] = h[j] * rstd * tpext::bench::input_value(c.dt, kWeightTensor, static_cast<uint64_t>(j));
    }
  }
  // Both paths round h to the storage type (the unfused one twice: after the sum, after the residual
  // add) and the output once; fp32 sums of R + 1 terms add (R + 1) fp32 roundings of the |inputs| <= 1.
  const double u = c.dt.unit_roundoff;
  const double acc = (c.ranks + 1) * 0x1p-24;
  auto compare = [&](const char* what, int r, const void* dev) -> std::string {
    const std::vector<double> got = download(c.dt, dev, c.n);
    for (int64_t i = 0; i < c.n; ++i) {
      const double tol = (6 * u + 4 * acc) * (1 + std::fabs(ref[i]));
      if (!(std::fabs(got[i] - ref[i]) <= tol)) {
        char buf[256];
        std::snprintf(buf, sizeof(buf), "%s rank %d element [%lld, %lld] = %.8g, fp64 reference %.8g (tolerance %.3g)",
                      what, r, static_cast<long long>(i / c.hidden), static_cast<long long>(i % c.hidden), got[i],
                      ref[i], tol);
        return buf;
      }
    }
    return "";
  };
  const size_t bytes = static_cast<size_t>(c.n) * c.dt.size;
  std::vector<unsigned char> first(bytes), other(bytes);
  TPEXT_CUDA_CHECK(cudaMemcpy(first.data(), c.fused_out[0], bytes, cudaMemcpyDeviceToHost));
  for (int r = 0; r < c.ranks; ++r) {
    for (std::string err : {compare("fused", r, c.fused_out[r]), compare("unfused", r, c.unfused_out[r])}) {
      if (!err.empty()) return err;
    }
    TPEXT_CUDA_CHECK(cudaMemcpy(other.data(), c.fused_out[r], bytes, cudaMemcpyDeviceToHost));
    if (std::memcmp(first.data(), other.data(), bytes) != 0)
      return "fused output of rank " + std::to_string(r) + " differs from rank 0's";
  }
  return "";
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median milliseconds of one call of `run`, from `graph_runs` calls captured in a CUDA graph.
template <typename Run>
double time_graph_ms(Run&& run, cudaStream_t s, int graph_runs, int iters) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  TPEXT_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < graph_runs; ++i) run(s);
  TPEXT_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  TPEXT_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  TPEXT_CUDA_CHECK(cudaEventCreate(&start));
  TPEXT_CUDA_CHECK(cudaEventCreate(&stop));
  for (int w = 0; w < 3; ++w) TPEXT_CUDA_CHECK(cudaGraphLaunch(exec, s));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    TPEXT_CUDA_CHECK(cudaEventRecord(start, s));
    TPEXT_CUDA_CHECK(cudaGraphLaunch(exec, s));
    TPEXT_CUDA_CHECK(cudaEventRecord(stop, s));
    TPEXT_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    TPEXT_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(static_cast<double>(t) / graph_runs);
  }
  TPEXT_CUDA_CHECK(cudaEventDestroy(start));
  TPEXT_CUDA_CHECK(cudaEventDestroy(stop));
  TPEXT_CUDA_CHECK(cudaGraphExecDestroy(exec));
  TPEXT_CUDA_CHECK(cudaGraphDestroy(graph));
  return median(ms);
}

// Device-to-device copy bandwidth (bytes read + written per second) of cudaMemcpyAsync.
double copy_gbps(int64_t mb, cudaStream_t s, int iters) {
  const size_t bytes = static_cast<size_t>(mb) << 20;
  void *a = nullptr, *b = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&a, bytes));
  TPEXT_CUDA_CHECK(cudaMalloc(&b, bytes));
  TPEXT_CUDA_CHECK(cudaMemsetAsync(a, 0, bytes, s));
  const double ms = time_graph_ms([&](cudaStream_t st) {
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st));
  }, s, 4, iters);
  TPEXT_CUDA_CHECK(cudaFree(a));
  TPEXT_CUDA_CHECK(cudaFree(b));
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

struct Result {
  std::string dtype;
  int64_t rows = 0;
  double fused_ms = 0, unfused_ms = 0, napkin_ms = 0;
};

void write_json(const Options& o, const cudaDeviceProp& prop, double gbps, const std::vector<Result>& results) {
  FILE* f = std::fopen(o.json_path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot open --json path " + o.json_path + ": " + std::strerror(errno));
  const char* commit = std::getenv("TPEXT_COMMIT");
  std::fprintf(
      f,
      "{\n  \"bench\": \"p2p_rmsnorm\",\n  \"device\": \"%s\",\n  \"commit\": \"%s\",\n  \"virtual_ranks\": %d,\n"
      "  \"hidden\": %lld,\n  \"graph_runs\": %d,\n  \"iters\": %d,\n  \"statistic\": \"median\",\n"
      "  \"baseline\": \"one-shot P2P all-reduce, then y += residual, then RMSNorm: one kernel each per rank\",\n"
      "  \"napkin\": \"fused bytes (R ranks x (R inputs + residual read, out + new residual written)) at the D2D copy "
      "bandwidth\",\n"
      "  \"copy_gbps\": %.1f,\n  \"results\": [\n",
      prop.name, commit ? commit : "unknown", o.ranks, static_cast<long long>(o.hidden), o.graph_runs, o.iters, gbps);
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    std::fprintf(
        f,
        "    {\"dtype\": \"%s\", \"rows\": %lld, \"message_bytes\": %lld, \"fused_us\": %.3f, \"fused_us_per_rank\": "
        "%.3f, "
        "\"unfused_us\": %.3f, \"speedup\": %.3f, \"napkin_us\": %.3f}%s\n",
        r.dtype.c_str(), static_cast<long long>(r.rows),
        static_cast<long long>(r.rows * o.hidden * static_cast<int64_t>(tpext::bench::dtype_info(r.dtype).size)),
        r.fused_ms * 1e3, r.fused_ms * 1e3 / o.ranks, r.unfused_ms * 1e3, r.unfused_ms / r.fused_ms, r.napkin_ms * 1e3,
        i + 1 < results.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  if (std::fclose(f) != 0) throw std::runtime_error("cannot write --json path " + o.json_path);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    int dev = 0;
    TPEXT_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    TPEXT_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    cudaStream_t s = nullptr;
    TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    const double gbps = o.check_only ? 0.0 : copy_gbps(o.copy_mb, s, o.iters);
    std::printf("p2p_rmsnorm on %s: %d virtual ranks, hidden %lld, D2D copy %.0f GB/s\n", prop.name, o.ranks,
                static_cast<long long>(o.hidden), gbps);
    if (!o.check_only) {
      std::printf("%-5s %6s %10s %10s %12s %11s %8s %10s\n", "dtype", "rows", "msg KB", "fused us", "fused us/rk",
                  "unfused us", "speedup", "napkin us");
    }
    std::vector<Result> results;
    int failures = 0;
    for (const auto& name : o.dtypes) {
      const DtypeInfo dt = tpext::bench::dtype_info(name);
      for (int64_t rows : o.rows) {
        Case c(dt, o.ranks, rows, o.hidden, o.eps, s);
        const std::string err = check(c, s);
        if (!err.empty()) {
          std::printf("FAIL %s rows=%lld: %s\n", name.c_str(), static_cast<long long>(rows), err.c_str());
          ++failures;
          continue;
        }
        if (o.check_only) {
          std::printf("ok   %s rows=%lld\n", name.c_str(), static_cast<long long>(rows));
          continue;
        }
        Result r{name, rows};
        r.fused_ms = time_graph_ms([&](cudaStream_t st) { c.fused(st); }, s, o.graph_runs, o.iters);
        r.unfused_ms = time_graph_ms([&](cudaStream_t st) { c.unfused(st); }, s, o.graph_runs, o.iters);
        r.napkin_ms = c.fused_bytes() / (gbps * 1e9) * 1e3;
        std::printf("%-5s %6lld %10.1f %10.2f %12.2f %11.2f %7.2fx %10.2f\n", name.c_str(),
                    static_cast<long long>(rows), static_cast<double>(c.n) * dt.size / 1024.0, r.fused_ms * 1e3,
                    r.fused_ms * 1e3 / o.ranks, r.unfused_ms * 1e3, r.unfused_ms / r.fused_ms, r.napkin_ms * 1e3);
        results.push_back(r);
      }
    }
    if (!o.json_path.empty() && !o.check_only) write_json(o, prop, gbps, results);
    TPEXT_CUDA_CHECK(cudaStreamDestroy(s));
    if (failures) {
      std::printf("p2p_rmsnorm: %d case(s) failed their correctness check\n", failures);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "p2p_rmsnorm: error: %s\n", e.what());
    return 2;
  }
}
