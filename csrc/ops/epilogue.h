// Epilogues applied to finished output rows (tensors in, CUDA kernel or ATen out).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace tpext::ops {

// y_rows[r, :] += bias + residual_rows[r, :], in place, either term optional. CUDA tensors use the
// hand-written kernel in csrc/kernels (one fused, vectorised pass: y is read and written once); CPU
// tensors (and layouts the kernel does not take) use ATen.
void add_bias_residual_(at::Tensor& y_rows, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual_rows);

}  // namespace tpext::ops
