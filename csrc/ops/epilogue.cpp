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

}  // namespace
#endif

void add_bias_(at::Tensor& y_rows, const at::Tensor& bias) {
#ifdef TPEXT_WITH_CUDA
  kernels::DType dtype;
  if (y_rows.is_cuda() && y_rows.stride(1) == 1 && bias.is_contiguous() && kernel_dtype(y_rows.scalar_type(), &dtype)) {
    kernels::BiasResidualParams p{};
    p.y = y_rows.data_ptr();
    p.ld_y = y_rows.stride(0);
    p.bias = bias.data_ptr();
    p.residual = nullptr;
    p.ld_residual = 0;
    p.rows = y_rows.size(0);
    p.cols = y_rows.size(1);
    p.dtype = dtype;
    kernels::launch_bias_residual_add(p, c10::cuda::getCurrentCUDAStream(y_rows.get_device()).stream());
    return;
  }
#endif
  y_rows.add_(bias);
}

}  // namespace tpext::ops
