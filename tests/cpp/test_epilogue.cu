// Standalone test of tpext::kernels::launch_bias_residual_add against a host fp64 oracle.
//
// Needs a GPU (built everywhere, run only where one is present). For each dtype and each case it
// fills a whole buffer (matrix plus row padding plus guard elements) with random values, runs the
// kernel, and checks that
//   * every element inside [rows, cols] is within tolerance of y + bias + residual computed in fp64, and
//   * every element outside it (row padding between cols and ld_y, the guards) is bitwise unchanged,
// which is how a wrong tail, a wrong stride or an over-wide vector access shows up. Cases cover odd
// cols (1, 3, 7, 129, 4097: not multiples of any vector width), misaligned base pointers and strides
// (the element-wise fallback), padded aligned strides, both grid-stride directions, rows or cols = 0,
// and bias / residual each present or absent. Bad arguments must throw std::runtime_error.
// Prints one line per case; exit status is non-zero on any failure.
//
// Build: CMake target tpext_test_epilogue (ctest runs it), or without CMake:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc csrc/kernels/epilogue.cu
//        tests/cpp/test_epilogue.cu -o build/test_epilogue
#include "common/cuda_check.h"
#include "kernels/epilogue.h"

#include "kernel_test.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using tpext::kernels::BiasResidualParams;
using tpext::kernels::DType;
using tpext::testing::from_f64;
using tpext::testing::to_f64;
using tpext::testing::Traits;

namespace {

enum class Layout { kContiguous, kPaddedAligned, kOddStride, kMisalignedBase };
const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kPaddedAligned: return "ld=cols+pad";
    case Layout::kOddStride: return "ld=cols+1";
    case Layout::kMisalignedBase: return "base+1elem";
  }
  return "?";
}

struct Case {
  int64_t rows, cols;
};

// A device buffer of T holding a (possibly strided, possibly offset) matrix, with its host mirror.
template <typename T>
struct Buffer {
  std::vector<T> host;
  T* dev = nullptr;
  int64_t offset = 0;  // elements before the matrix start (misaligns it when odd)
  Buffer(int64_t n, int64_t off, std::mt19937_64& rng) : host(static_cast<size_t>(n)), offset(off) {
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    for (auto& v : host) v = from_f64<T>(dist(rng));
    TPEXT_CUDA_CHECK(cudaMalloc(&dev, sizeof(T) * std::max<int64_t>(n, 1)));
    TPEXT_CUDA_CHECK(cudaMemcpy(dev, host.data(), sizeof(T) * n, cudaMemcpyHostToDevice));
  }
  ~Buffer() { cudaFree(dev); }  // destructor: no throw; a failed free would surface at the next check
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* at() { return dev + offset; }
};

template <typename T>
bool run_case(const Case& c, Layout layout, bool with_bias, bool with_res, std::mt19937_64& rng) {
  constexpr int kGuard = 37;  // guard elements after each matrix: catches writes past the end
  int64_t ld_y = c.cols, ld_r = c.cols, off = 0;
  if (layout == Layout::kPaddedAligned) {
    ld_y = (c.cols + 15) / 16 * 16 + 16;
    ld_r = ld_y + 32;
  }
  if (layout == Layout::kOddStride) {
    ld_y = c.cols + 1;
    ld_r = c.cols + 3;
  }
  if (layout == Layout::kMisalignedBase) off = 1;

  Buffer<T> y(off + c.rows * ld_y + kGuard, off, rng);
  Buffer<T> r(off + c.rows * ld_r + kGuard, off, rng);
  Buffer<T> b(off + c.cols + kGuard, off, rng);
  const std::vector<T> y0 = y.host;

  BiasResidualParams p{};
  p.y = y.at();
  p.ld_y = ld_y;
  p.bias = with_bias ? b.at() : nullptr;
  p.residual = with_res ? r.at() : nullptr;
  p.ld_residual = ld_r;
  p.rows = c.rows;
  p.cols = c.cols;
  p.dtype = Traits<T>::kDtype;
  tpext::kernels::launch_bias_residual_add(p, nullptr);
  TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  TPEXT_CUDA_CHECK(cudaMemcpy(y.host.data(), y.dev, sizeof(T) * y.host.size(), cudaMemcpyDeviceToHost));

  // The kernel's error is one rounding of the result (<= eps/2 relative) plus the accumulation error,
  // bounded by eps_acc * (|y| + |b| + |r|).
  const double eps = Traits<T>::kEps;
  double max_err_ulps = 0.0;  // worst |err| in units of eps * |ref|-ish scale, for the log line
  int64_t bad = 0, clobbered = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(y.host.size()); ++i) {
    const int64_t rel = i - off;
    const bool inside = c.cols > 0 && rel >= 0 && rel < c.rows * ld_y && rel % ld_y < c.cols;
    if (!inside) {
      if (std::memcmp(&y.host[i], &y0[i], sizeof(T)) != 0) ++clobbered;
      continue;
    }
    const int64_t row = rel / ld_y, col = rel % ld_y;
    const double yv = to_f64(y0[i]);
    const double bv = with_bias ? to_f64(b.host[off + col]) : 0.0;
    const double rv = with_res ? to_f64(r.host[off + row * ld_r + col]) : 0.0;
    const double ref = yv + bv + rv;
    const double scale = std::fabs(ref) + std::fabs(yv) + std::fabs(bv) + std::fabs(rv);
    const double err = std::fabs(to_f64(y.host[i]) - ref);
    if (!(err <= eps * scale)) ++bad;  // written so that NaN counts as bad
    if (scale > 0) max_err_ulps = std::max(max_err_ulps, err / (eps * scale));
  }
  const bool ok = bad == 0 && clobbered == 0;
  std::printf("%s %-4s rows=%-6lld cols=%-8lld %-12s bias=%d res=%d  max_err=%.3f eps*scale  bad=%lld clobbered=%lld\n",
              ok ? "PASS" : "FAIL", Traits<T>::kName, static_cast<long long>(c.rows), static_cast<long long>(c.cols),
              layout_name(layout), with_bias, with_res, max_err_ulps, static_cast<long long>(bad),
              static_cast<long long>(clobbered));
  return ok;
}

template <typename T>
int run_dtype(std::mt19937_64& rng) {
  // Odd widths exercise the element-wise tail; 4096 is a pure vector row; (70000, 3) needs more row
  // blocks than one wave (grid-stride over rows); (2, 1 << 20 | 3) more unit blocks (grid-stride over
  // columns); rows = 0 and cols = 0 must launch nothing and touch nothing.
  const Case cases[] = {{67, 1},    {67, 3}, {33, 7},    {17, 129},          {5, 4097},
                        {64, 4096}, {1, 8},  {70000, 3}, {2, (1 << 20) | 3}, {0, 129},
                        {129, 0}};
  const Layout layouts[] = {Layout::kContiguous, Layout::kPaddedAligned, Layout::kOddStride, Layout::kMisalignedBase};
  int failures = 0;
  for (const Case& c : cases) {
    for (Layout l : layouts) {
      for (int mask = 0; mask < 4; ++mask) {
        if (!run_case<T>(c, l, mask & 1, mask & 2, rng)) ++failures;
      }
    }
  }
  return failures;
}

// Bad arguments must throw std::runtime_error with a message, and never exit or launch.
int run_argument_checks() {
  int failures = 0;
  float* d = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&d, 64 * sizeof(float)));
  auto expect_throw = [&](const char* what, BiasResidualParams p) {
    try {
      tpext::kernels::launch_bias_residual_add(p, nullptr);
      std::printf("FAIL args: %s did not throw\n", what);
      ++failures;
    } catch (const std::runtime_error& e) {
      std::printf("PASS args: %s -> %s\n", what, e.what());
    }
  };
  const BiasResidualParams good{d, 8, d + 32, d + 16, 8, 2, 8, DType::kFloat32};
  BiasResidualParams p = good;
  p.rows = -1;
  expect_throw("rows < 0", p);
  p = good;
  p.cols = -3;
  expect_throw("cols < 0", p);
  p = good;
  p.ld_y = 7;
  expect_throw("ld_y < cols", p);
  p = good;
  p.ld_residual = 4;
  expect_throw("ld_residual < cols", p);
  p = good;
  p.y = nullptr;
  expect_throw("y == nullptr", p);
  p = good;
  p.dtype = static_cast<DType>(7);
  expect_throw("unknown dtype", p);
  TPEXT_CUDA_CHECK(cudaFree(d));
  return failures;
}

}  // namespace

int main() {
  return tpext::testing::test_main("test_epilogue", "case", [] {
    std::mt19937_64 rng(20240607);
    const int failures = run_argument_checks();
    return failures + tpext::testing::sum_over_dtypes([&](auto t) { return run_dtype<decltype(t)>(rng); });
  });
}
