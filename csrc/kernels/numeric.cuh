// Numerics shared by tpext's kernels: the accumulation type of each storage type, the conversions to
// and from it, the 16-byte vector of the fast paths, and the host-side dtype dispatch and alignment
// test of their launchers. Header-only, torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "epilogue.h"  // DType

namespace tpext::kernels::numeric {

// Accumulation type: fp32 for every storage type but fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// One rounding, to nearest even, from the accumulation type to the storage type.
template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive elements moved as one access. With N * sizeof(T) == 16 the compiler emits a single
// 128-bit LDG/STG (ld.global.v4 in PTX); the caller guarantees the alignment.
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

// Host: calls f(T{}) with T the storage type of `dtype` (launchers validate dtype before).
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat64: f(double{}); break;
  }
}

// Host: whether p allows 16-byte vector accesses (nullptr, an absent operand, does).
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace tpext::kernels::numeric
