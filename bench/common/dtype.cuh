// Storage types of the overlap benchmarks and their deterministic inputs.
//
// Inputs are generated on the device from a hash of (tensor id, element index), rounded once to the
// storage type; the host recomputes any element bit for bit from the same hash and the same
// round-to-nearest conversion, so the fp64 reference needs no copy of the (possibly multi-GB) inputs.
#pragma once

#include "common/cuda_check.h"
#include "kernels/epilogue.h"  // tpext::kernels::DType, the P2P kernels' type tag

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tpext::bench {

struct DtypeInfo {
  const char* name;
  size_t size;
  cudaDataType_t cuda;
  ncclDataType_t nccl;
  tpext::kernels::DType p2p;
  double unit_roundoff;  // of one rounding to this type: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32
};

inline DtypeInfo dtype_info(const std::string& s) {
  if (s == "bf16") return {"bf16", 2, CUDA_R_16BF, ncclBfloat16, tpext::kernels::DType::kBFloat16, 0x1p-8};
  if (s == "fp16") return {"fp16", 2, CUDA_R_16F, ncclFloat16, tpext::kernels::DType::kFloat16, 0x1p-11};
  if (s == "fp32") return {"fp32", 4, CUDA_R_32F, ncclFloat32, tpext::kernels::DType::kFloat32, 0x1p-24};
  throw std::runtime_error("dtype: expected bf16, fp16 or fp32, got '" + s + "'");
}

// p advanced by `elems` elements of dt.
inline void* advance(void* p, int64_t elems, const DtypeInfo& dt) {
  return static_cast<char*>(p) + elems * static_cast<int64_t>(dt.size);
}

// Uniform in [-1, 1) with 24 random bits: splitmix64 of (tensor, index).
__host__ __device__ inline float hash_uniform(uint32_t tensor, uint64_t i) {
  uint64_t z = i + (static_cast<uint64_t>(tensor) << 48) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-23f - 1.0f;
}

template <typename T>
__host__ __device__ inline T from_float(float x) {
  return x;
}
template <>
__host__ __device__ inline __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
__host__ __device__ inline double to_double(float x) { return x; }
__host__ __device__ inline double to_double(__half x) { return __half2float(x); }
__host__ __device__ inline double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

// Calls f(T{}) with T the storage type named by `dt`.
template <typename F>
void dispatch_dtype(const DtypeInfo& dt, F&& f) {
  switch (dt.cuda) {
    case CUDA_R_16BF: f(__nv_bfloat16{}); break;
    case CUDA_R_16F: f(__half{}); break;
    default: f(float{}); break;
  }
}

// The value the device stores at element i of tensor `tensor`, as the host sees it.
inline double input_value(const DtypeInfo& dt, uint32_t tensor, uint64_t i) {
  double v = 0;
  dispatch_dtype(dt, [&](auto tag) { v = to_double(from_float<decltype(tag)>(hash_uniform(tensor, i))); });
  return v;
}

template <typename T>
__global__ void fill_inputs_kernel(T* p, int64_t n, uint32_t tensor) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    p[i] = from_float<T>(hash_uniform(tensor, static_cast<uint64_t>(i)));
  }
}

// Fills p[0, n) (on the current device, on `stream`) with tensor `tensor`'s inputs.
inline void fill_inputs(const DtypeInfo& dt, void* p, int64_t n, uint32_t tensor, cudaStream_t stream) {
  if (n == 0) return;
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fill_inputs_kernel<T><<<1024, 256, 0, stream>>>(static_cast<T*>(p), n, tensor);
  });
  TPEXT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tpext::bench
