// Epilogue of the row-parallel linear layer: y += bias + residual, once, after the reduction.
//
// Why a separate epilogue. In a row-parallel GEMM every rank r computes a partial product
// y_r = x_shard_k(r) @ w_shard_k(r)^T over its slice of the K dimension, and the full output is the
// all-reduce sum over ranks. The bias (and the residual of a transformer block) belongs to the full
// output, so it must be added exactly once: folding it into each rank's GEMM would add it R times, and
// adding it on one rank only would make the ranks' inputs to the reduction asymmetric. It is therefore
// added after the all-reduce (or after the reduce-scatter, on the local sequence shard), where every
// rank holds the same reduced rows and applies the same arithmetic, so results stay bitwise identical
// across ranks. Fusing bias and residual into one pass reads y once instead of twice: the op is purely
// memory-bound (3 tensor passes: read y, read residual, write y), and this kernel targets the
// device-to-device copy bandwidth.
//
// Contract (host side; plain C++, no device code here, so g++ can include it):
//  * y is [rows, cols] row-major with row stride ld_y elements and is updated in place;
//    residual is [rows, cols] with row stride ld_residual; bias is a contiguous [cols] vector.
//  * bias and residual may each be nullptr (then that term is skipped; with both null nothing is
//    launched); neither may overlap y. The row strides are only read when rows > 1, and must then be
//    >= cols.
//  * Arithmetic: acc = float(y) + float(bias) + float(residual), left to right, then one rounding to
//    the storage type: fp16/bf16 are widened to fp32, kFloat64 accumulates in fp64 (fp32 and fp64 data
//    round at each add, as any sum in their own precision). Adds only, so no FMA contraction can creep
//    in: every rank and every launch configuration gives identical bits.
//  * rows * cols == 0 launches nothing. Indexing is 64-bit throughout.
//  * Fast path: 16-byte vector loads/stores when y, residual and bias are 16-byte aligned and ld_y and
//    ld_residual are multiples of the vector width (16 bytes / element size); a cols tail that is not a
//    multiple of the width is handled element-wise. Otherwise an element-wise kernel runs (still
//    correct, just slower).
//  * Runs asynchronously on `stream`, on the current CUDA device (the caller sets it). Throws
//    std::runtime_error (never exits) on a bad argument or a CUDA launch error; no synchronisation.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tpext::kernels {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct BiasResidualParams {
  void* y;
  int64_t ld_y;      // [rows, cols] row-major, row stride ld_y elements; updated in place
  const void* bias;  // [cols] or nullptr
  const void* residual;
  int64_t ld_residual;  // [rows, cols] or nullptr
  int64_t rows, cols;
  DType dtype;
};

// y += bias (broadcast over rows) + residual, in place. Accumulates in fp32 (fp64 for kFloat64), one rounding.
// Throws std::runtime_error (never exits) on a bad argument or a CUDA error.
void launch_bias_residual_add(const BiasResidualParams& p, cudaStream_t stream);

}  // namespace tpext::kernels
