// y += bias + residual: the row-parallel epilogue (see epilogue.h for the why and the contract).
//
// Shape of the kernel. The op is memory-bound (per element: read y, read residual, write y; the bias
// row is re-read from L1/L2), so everything here serves bandwidth:
//  * 16-byte accesses per thread (8 x bf16/fp16, 4 x fp32, 2 x fp64), coalesced across the warp, when
//    every pointer and row stride allows it; one element per access otherwise.
//  * A 2-D grid-stride loop: threadIdx.x/blockIdx.x walk the "units" of a row (vectors, then the
//    element-wise tail), threadIdx.y/blockIdx.y walk rows. Rows never need a 64-bit division, strided
//    rows (ld > cols) cost nothing extra, and the grid is sized to one full wave of the device, each
//    thread looping until the matrix is covered, so launch cost does not grow with the size.
//  * All offsets are int64_t: rows * ld_y exceeds 2^31 for large activations (16384 x 131072, say).
#include "epilogue.h"

#include "../common/cuda_check.h"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tpext::kernels {
namespace {

constexpr int kThreads = 256;  // per block; the grid size follows each kernel's occupancy (launch_config)

using numeric::AccOf;
using numeric::from_acc;
using numeric::Pack;
using numeric::to_acc;

// acc = y + bias + residual, left to right, one rounding to T. Kept identical in the vector body and
// the element-wise tail, so an element's result does not depend on which path handled it.
template <typename T, bool kBias, bool kRes>
__device__ __forceinline__ T add_one(T y, T b, T r) {
  typename AccOf<T>::type acc = to_acc(y);
  if constexpr (kBias) acc += to_acc(b);
  if constexpr (kRes) acc += to_acc(r);
  return from_acc<T>(acc);
}

// N = elements per access (16 / sizeof(T) on the fast path, 1 on the fallback). __restrict__: bias and
// residual never overlap y (the contract), which lets them take the read-only cache path and lets the
// compiler hoist the next iteration's loads above this iteration's store.
template <typename T, int N, bool kBias, bool kRes>
__global__ void __launch_bounds__(kThreads)
    bias_residual_add_kernel(T* __restrict__ y, int64_t ld_y, const T* __restrict__ bias,
                             const T* __restrict__ residual, int64_t ld_res, int64_t rows, int64_t cols) {
  using P = Pack<T, N>;
  const int64_t nvec = cols / N;                   // full packs per row
  const int64_t units = nvec + (cols - nvec * N);  // packs, then the < N trailing elements one by one
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t unit_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t unit0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    T* y_row = y + r * ld_y;
    const T* res_row = kRes ? residual + r * ld_res : nullptr;
    for (int64_t u = unit0; u < units; u += unit_step) {
      if (u < nvec) {
        const int64_t c = u * N;
        P yv = *reinterpret_cast<const P*>(y_row + c);
        P bv, rv;
        if constexpr (kBias) bv = *reinterpret_cast<const P*>(bias + c);
        if constexpr (kRes) rv = *reinterpret_cast<const P*>(res_row + c);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          yv.v[k] = add_one<T, kBias, kRes>(yv.v[k], kBias ? bv.v[k] : T(), kRes ? rv.v[k] : T());
        }
        *reinterpret_cast<P*>(y_row + c) = yv;
      } else {
        const int64_t c = nvec * N + (u - nvec);
        y_row[c] = add_one<T, kBias, kRes>(y_row[c], kBias ? bias[c] : T(), kRes ? res_row[c] : T());
      }
    }
  }
}

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error("tpext::kernels::launch_bias_residual_add: " + what);
}

using numeric::aligned16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
using KernelFn = void (*)(T*, int64_t, const T*, const T*, int64_t, int64_t, int64_t);

// One full wave of `kernel` on device `dev`: SMs x resident blocks per SM. Queried once per (device,
// kernel) and cached: the occupancy query costs microseconds of host time, as much as the launch itself
// for small outputs, and its answer never changes within a process. Each instantiation of the kernel
// (dtype x vector width x operands) is its own entry.
int64_t resident_blocks(const void* kernel, int dev) {
  struct Entry {
    const void* kernel;
    int dev;
    int64_t wave;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;  // a few dozen entries at most: a linear scan beats hashing
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache) {
      if (e.kernel == kernel && e.dev == dev) return e.wave;
    }
  }
  int sms = 0, blocks_per_sm = 0;
  TPEXT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  TPEXT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  const int64_t wave = std::max<int64_t>(1, static_cast<int64_t>(sms) * std::max(1, blocks_per_sm));
  std::lock_guard<std::mutex> lock(mu);
  cache.push_back({kernel, dev, wave});
  return wave;
}

// Block: kThreads threads, as wide in x as a row has units (a power of two in [32, kThreads]), the rest
// stacked in y so that narrow matrices still fill the block with rows. Grid: one full wave of resident
// blocks (SMs x blocks per SM for this very kernel), split between units and rows; the grid-stride
// loops do the rest. The occupancy comes from the runtime, not from an assumed 2048 / kThreads: ptxas
// (nvcc 13.0, sm_90a) gives the 16-bit vector kernels 27-31 registers (8 blocks per SM), while it
// unrolls the fp32 / fp64 vector loops 4x at 40-60 registers (5-6 blocks per SM).
template <typename T>
void launch_config(KernelFn<T> kernel, int64_t rows, int64_t units, dim3* grid, dim3* block) {
  int bx = 32;
  while (bx < kThreads && bx < units) bx *= 2;
  const int by = kThreads / bx;

  int dev = 0;
  TPEXT_CUDA_CHECK(cudaGetDevice(&dev));
  const int64_t wave = resident_blocks(reinterpret_cast<const void*>(kernel), dev);

  const int64_t gx = std::min(ceil_div(units, bx), wave);
  const int64_t gy = std::min({ceil_div(rows, by), std::max<int64_t>(1, wave / gx), int64_t{65535}});
  *grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
  *block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), 1);
}

template <typename T, int N>
void launch_packed(const BiasResidualParams& p, cudaStream_t stream) {
  auto* y = static_cast<T*>(p.y);
  const auto* b = static_cast<const T*>(p.bias);
  const auto* r = static_cast<const T*>(p.residual);
  const KernelFn<T> kernel = b && r ? bias_residual_add_kernel<T, N, true, true>
                             : b    ? bias_residual_add_kernel<T, N, true, false>
                                    : bias_residual_add_kernel<T, N, false, true>;
  const int64_t nvec = p.cols / N;
  dim3 grid, block;
  launch_config<T>(kernel, p.rows, nvec + (p.cols - nvec * N), &grid, &block);
  kernel<<<grid, block, 0, stream>>>(y, p.ld_y, b, r, p.ld_residual, p.rows, p.cols);
  TPEXT_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_typed(const BiasResidualParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  // Every row start must be 16-byte aligned: the base pointers, and (when there is more than one row)
  // the row strides in whole packs. The bias is one contiguous row, so its base alone matters.
  const bool strides_ok = p.rows <= 1 || (p.ld_y % kVec == 0 && (!p.residual || p.ld_residual % kVec == 0));
  const bool ptrs_ok = aligned16(p.y) && (!p.bias || aligned16(p.bias)) && (!p.residual || aligned16(p.residual));
  if (strides_ok && ptrs_ok) {
    launch_packed<T, kVec>(p, stream);
  } else {
    launch_packed<T, 1>(p, stream);
  }
}

}  // namespace

void launch_bias_residual_add(const BiasResidualParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0) {
    std::ostringstream m;
    m << "rows and cols must be >= 0, got rows=" << p.rows << ", cols=" << p.cols;
    fail(m.str());
  }
  const auto dt = static_cast<int32_t>(p.dtype);
  if (dt < 0 || dt > 3) fail("dtype must be kFloat32, kFloat16, kBFloat16 or kFloat64, got " + std::to_string(dt));
  if (p.rows == 0 || p.cols == 0) return;  // empty tensors may carry null pointers: nothing to touch
  if (p.y == nullptr)
    fail("y is nullptr for a non-empty [" + std::to_string(p.rows) + ", " + std::to_string(p.cols) + "] output");
  if (p.rows > 1 && p.ld_y < p.cols) {
    fail("ld_y must be >= cols = " + std::to_string(p.cols) + " when rows > 1, got " + std::to_string(p.ld_y));
  }
  if (p.residual && p.rows > 1 && p.ld_residual < p.cols) {
    fail("ld_residual must be >= cols = " + std::to_string(p.cols) + " when rows > 1, got " +
         std::to_string(p.ld_residual));
  }
  if (!p.bias && !p.residual) return;  // y += 0

  numeric::dispatch(p.dtype, [&](auto t) { launch_typed<decltype(t)>(p, stream); });
}

}  // namespace tpext::kernels
