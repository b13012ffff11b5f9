// Epilogues applied to finished output rows (tensors in, CUDA kernel or ATen out).
#pragma once

#include <ATen/core/Tensor.h>

namespace tpext::ops {

// y_rows[r, :] += bias, in place. CUDA tensors use the hand-written kernel in csrc/kernels (one
// vectorised pass); CPU tensors use ATen.
void add_bias_(at::Tensor& y_rows, const at::Tensor& bias);

}  // namespace tpext::ops
