// The op implementations registered in csrc/torch_bindings.cpp (CPU and CUDA share them).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace tpext::ops {

at::Tensor gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const std::string& group_name, int64_t chunks);

at::Tensor gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w,
                               const std::optional<at::Tensor>& bias, const std::string& group_name,
                               int64_t chunks);

std::tuple<at::Tensor, at::Tensor> all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::string& group_name, int64_t chunks);

}  // namespace tpext::ops
