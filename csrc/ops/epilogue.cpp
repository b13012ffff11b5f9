#include "ops/epilogue.h"

#include <c10/util/Exception.h>

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "kernels/epilogue.h"
#endif

namespace tpext::ops {

#ifdef TPEXT_WITH_CUDA
namespace {

bool kernel_dtype(at::ScalarType t, kernels::DType* out) {
  switch (t) {
    case at::kFloat: *out = kernels::DType::kFloat32; return true;
    case at::kHalf: *out = kernels::DType::kFloat16; return true;
    case at::kBFloat16: *out = kernels::DType::kBFloat16; return true;
    case at::kDouble: *out = kernels::DType::kFloat64; return true;
    default: return false;
  }
}

// Rows with unit column stride are what the kernel indexes (row stride free).
bool kernel_layout(const at::Tensor& t) { return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1); }

}  // namespace
#endif

void add_bias_residual_(at::Tensor& y_rows, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual_rows) {
  if (!bias && !residual_rows) return;
#ifdef TPEXT_WITH_CUDA
  kernels::DType dtype;
  if (y_rows.is_cuda() && kernel_layout(y_rows) && (!bias || bias->is_contiguous()) &&
      (!residual_rows || kernel_layout(*residual_rows)) && kernel_dtype(y_rows.scalar_type(), &dtype)) {
    kernels::BiasResidualParams p{};
    p.y = y_rows.data_ptr();
    p.ld_y = y_rows.stride(0);
    p.bias = bias ? bias->data_ptr() : nullptr;
    p.residual = residual_rows ? residual_rows->data_ptr() : nullptr;
    p.ld_residual = residual_rows ? residual_rows->stride(0) : 0;
    p.rows = y_rows.size(0);
    p.cols = y_rows.size(1);
    p.dtype = dtype;
    kernels::launch_bias_residual_add(p, c10::cuda::getCurrentCUDAStream(y_rows.get_device()).stream());
    return;
  }
#endif
  // Same order as the kernel (y + bias, then + residual), so both paths round alike in fp32/fp64; in
  // fp16/bf16 this path rounds after each add, the kernel once.
  if (bias) y_rows.add_(*bias);
  if (residual_rows) y_rows.add_(*residual_rows);
}

}  // namespace tpext::ops
