// The three overlapped GEMM + collective ops (gemm_collectives.cpp), registered for CPU and CUDA alike
// in csrc/torch_bindings.cpp.
//
// `algorithm` is a schedule::Algorithm value (0 sequential, 1 chunked pipeline, 2 chunked pipeline on
// two compute streams); `residual`, where taken, has the output's shape and is added once with the bias.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace tpext::ops {

at::Tensor gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const std::string& group_name, int64_t chunks, int64_t algorithm,
                           const std::optional<at::Tensor>& residual);

at::Tensor gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const std::string& group_name, int64_t chunks, int64_t algorithm,
                               const std::optional<at::Tensor>& residual);

std::tuple<at::Tensor, at::Tensor> all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& bias, const std::string& group_name,
                                                   int64_t chunks, int64_t algorithm);

}  // namespace tpext::ops
