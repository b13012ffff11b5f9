// Correctness checks of the overlap benchmarks, run before any timing.
//
// 1. The sequential schedule's output against an fp64 host reference recomputed from the input hash
//    (dtype.cuh): every element for small problems, sampled elements (first and last row included)
//    otherwise. Bound per element, from the arithmetic: each rank's GEMM accumulates in fp32 and rounds
//    once to the storage type, and a reduction over R ranks rounds at most R times more, so
//      |got - ref| <= 2 (R + 1) u B + 2 k 2^-24 A,
//    u the storage type's unit roundoff, B = sum over ranks of |that rank's partial product|,
//    A = sum over ranks and k of |x w| (the fp32 accumulation term); R = 0 for a gather.
// 2. Every chunked configuration against the sequential output, every element, on the device. The
//    buffers are filled with 0xFF bytes (NaN in every storage type) before each run, so a row that a
//    missing wait leaves unwritten, or that a collective reads before its GEMM wrote it, fails.
//    Bound: ((R + 2) u + k 2^-24) (|a| + |b| + 4 rms), rms that of the sequential output (cuBLAS may
//    pick other kernels, with other summation orders, for a chunk's rows than for all of them).
#pragma once

#include "common/cuda_check.h"
#include "dtype.cuh"
#include "op.cuh"
#include "ranks.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace tpext::bench {

template <typename T>
__global__ void compare_kernel(const T* a, const T* b, int64_t n, double rel, double floor_abs, unsigned long long* bad,
                               unsigned long long* first_bad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const double x = to_double(a[i]), y = to_double(b[i]);
    if (!(fabs(x - y) <= rel * (fabs(x) + fabs(y) + floor_abs))) {
      atomicAdd(bad, 1ull);
      atomicMin(first_bad, static_cast<unsigned long long>(i));
    }
  }
}

// Per-element bound |a - b| <= rel (|a| + |b| + floor).
struct Tolerance {
  double rel, floor;
};
struct Mismatches {
  unsigned long long count;
  int64_t first;  // index of the first element outside the bound (valid when count > 0)
};

// Elements of a[0, n) (rank r's device) outside `tol` against b[0, n).
inline Mismatches count_mismatches(Ranks& rk, int r, const void* a, const void* b, int64_t n, Tolerance tol) {
  rk.set_device(r);
  cudaStream_t s = rk.ctx(r).lanes[0];
  unsigned long long* counters = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&counters, 2 * sizeof(unsigned long long)));
  TPEXT_CUDA_CHECK(cudaMemsetAsync(counters, 0, sizeof(unsigned long long), s));
  TPEXT_CUDA_CHECK(cudaMemsetAsync(counters + 1, 0xFF, sizeof(unsigned long long), s));
  dispatch_dtype(rk.dtype(), [&](auto tag) {
    using T = decltype(tag);
    compare_kernel<T><<<1024, 256, 0, s>>>(static_cast<const T*>(a), static_cast<const T*>(b), n, tol.rel, tol.floor,
                                           counters, counters + 1);
  });
  TPEXT_CUDA_CHECK(cudaGetLastError());
  unsigned long long host[2] = {0, 0};
  TPEXT_CUDA_CHECK(cudaMemcpyAsync(host, counters, sizeof(host), cudaMemcpyDeviceToHost, s));
  TPEXT_CUDA_CHECK(cudaStreamSynchronize(s));
  TPEXT_CUDA_CHECK(cudaFree(counters));
  return {host[0], static_cast<int64_t>(host[1])};
}

// Rank r's [rows, cols] output (device), copied to the host in its storage type; at(i) reads one
// element as a double (no full-size double copy: outputs can be GBs).
class HostCopy {
 public:
  HostCopy(Ranks& rk, int r, const void* p, int64_t rows, int64_t cols) : dt_(rk.dtype()) {
    raw_.resize(static_cast<size_t>(rows * cols) * dt_.size);
    rk.set_device(r);
    TPEXT_CUDA_CHECK(cudaMemcpy(raw_.data(), p, raw_.size(), cudaMemcpyDeviceToHost));
  }
  double at(int64_t i) const {
    double v = 0;
    dispatch_dtype(dt_, [&](auto tag) {
      using T = decltype(tag);
      v = to_double(reinterpret_cast<const T*>(raw_.data())[i]);
    });
    return v;
  }

 private:
  DtypeInfo dt_;
  std::vector<unsigned char> raw_;
};

// Check 1 for rank r's sequential output: returns the number of bad elements (printing the first
// few) and sets *rms to the RMS of the checked elements.
inline int64_t check_against_reference(Ranks& rk, int r, const Op& op, bool full, double* rms) {
  const int64_t rows = op.output_rows(), cols = op.output_cols();
  const HostCopy got(rk, r, op.output(r, true), rows, cols);
  const double u = rk.dtype().unit_roundoff;
  std::vector<std::pair<int64_t, int64_t>> at;
  if (full) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) at.emplace_back(i, j);
  } else {
    std::mt19937_64 rng(1234 + static_cast<uint64_t>(r));
    for (int64_t j = 0; j < std::min<int64_t>(cols, 64); ++j) {
      at.emplace_back(0, j);
      at.emplace_back(rows - 1, j);
    }
    // Each reference element costs R k products (reductions), so the sample shrinks as R grows.
    for (int s = 0; s < std::max(128, 1024 / rk.world()); ++s) {
      at.emplace_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(rows)),
                      static_cast<int64_t>(rng() % static_cast<uint64_t>(cols)));
    }
  }
  int64_t bad = 0;
  double sq = 0;
  for (const auto& [i, j] : at) {
    const RefValue want = op.reference(r, i, j);
    const double y = got.at(i * cols + j);
    const double tol =
        2.0 * (op.summed_ranks() + 1) * u * want.mag + 2.0 * static_cast<double>(op.inner()) * 0x1p-24 * want.abs;
    sq += y * y;
    if (!(std::fabs(y - want.value) <= tol)) {
      if (bad < 5) {
        std::fprintf(stderr, "  rank %d [%lld, %lld]: got %.6g, fp64 reference %.6g, tolerance %.3g\n", r,
                     static_cast<long long>(i), static_cast<long long>(j), y, want.value, tol);
      }
      ++bad;
    }
  }
  *rms = std::sqrt(sq / static_cast<double>(std::max<size_t>(1, at.size())));
  return bad;
}

}  // namespace tpext::bench
