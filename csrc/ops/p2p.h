// The P2P ops (registered in csrc/torch_bindings.cpp) and the host references they share.
//
// `algorithm` (a P2PAlgorithm value, decided by tpext/p2p.py): kCollective = the group's own collective
// (c10d: NCCL or gloo), then the epilogue in ATen; kOneShot / kTwoShot = the one-shot / two-shot P2P
// kernel. With a P2P kernel, CPU tensors run the host reference of the kernels (all-gather over c10d, then
// the kernels' arithmetic: rank-order sum in fp32, fp64 for fp64), and CUDA tensors whose group has no
// usable symmetric buffers fall back to kCollective; both say why once per group and reason. Groups of
// size 1 never communicate.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#ifdef TPEXT_WITH_CUDA
#include "kernels/p2p.h"
#endif

namespace tpext::ops {

// How a P2P op communicates. The values are the ops' `int algorithm` argument (the schemas keep an int,
// as they do for schedule::Algorithm); tpext.p2p.P2PAlgorithm mirrors them.
enum class P2PAlgorithm : int64_t {
  kCollective = 0,  // the group's collective (c10d), no symmetric buffers
  kOneShot = 1,     // every rank reads every peer's whole buffer and reduces: one round, latency-bound sizes
  kTwoShot = 2,     // reduce-scatter then all-gather over the buffers: two rounds, 1/R of the reads each
};

at::Tensor p2p_all_reduce(const at::Tensor& x, const std::string& group_name, int64_t algorithm);
at::Tensor p2p_reduce_scatter(const at::Tensor& x, const std::string& group_name, int64_t algorithm);
at::Tensor p2p_all_gather(const at::Tensor& x, const std::string& group_name, int64_t algorithm);
std::tuple<at::Tensor, at::Tensor> p2p_all_reduce_residual_rmsnorm(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& weight, double eps,
                                                                   const std::string& group_name, int64_t algorithm);
std::tuple<at::Tensor, at::Tensor> p2p_rmsnorm_backward(const at::Tensor& grad_out,
                                                        const std::optional<at::Tensor>& grad_residual,
                                                        const at::Tensor& h, const at::Tensor& weight, double eps);

// Virtual ranks: xs[r] is rank r's input, all on one device; the result holds every rank's output.
std::vector<at::Tensor> p2p_virtual_all_reduce(at::TensorList xs, int64_t algorithm);
std::vector<at::Tensor> p2p_virtual_reduce_scatter(at::TensorList xs);
std::vector<at::Tensor> p2p_virtual_all_gather(at::TensorList xs);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> p2p_virtual_all_reduce_residual_rmsnorm(
    at::TensorList xs, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& bias,
    const at::Tensor& weight, double eps);

namespace p2p_ref {

// Accumulation type of the kernels for storage type t: fp64 for fp64, fp32 otherwise.
at::ScalarType acc_type(at::ScalarType t);
// parts[0] + parts[1] + ... in that order, in acc_type (a new tensor; the parts are not modified).
at::Tensor ordered_sum(const std::vector<at::Tensor>& parts);
// The fused epilogue on the reduced sum `acc` (acc_type): h = round(acc + bias + residual),
// out = round(float(h) * rstd * float(weight)). Returns (out, h) in `dtype`. Consumes `acc`.
std::tuple<at::Tensor, at::Tensor> residual_rmsnorm(at::Tensor acc, const std::optional<at::Tensor>& residual,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& weight,
                                                    double eps, at::ScalarType dtype);
// Backward of out = rms_norm(h) * weight: (grad_h [+ grad_residual], grad_weight).
std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(const at::Tensor& grad_out,
                                                    const std::optional<at::Tensor>& grad_residual, const at::Tensor& h,
                                                    const at::Tensor& weight, double eps);

// Argument checks, naming the argument, before any collective.
void check_dtype(const char* op, const char* arg, const at::Tensor& t);
// `algorithm` as a P2PAlgorithm; raises, naming `op`, when it is none.
P2PAlgorithm check_algorithm(const char* op, int64_t algorithm);
void check_norm_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& bias, const at::Tensor& weight, double eps);
void check_virtual(const char* op, at::TensorList xs);
// t itself when 16-byte aligned, else an aligned copy (fresh allocations are): the fused norm kernel picks
// its vector width, and with it its reduction tree, from its operands' alignment.
at::Tensor aligned(const at::Tensor& t);

#ifdef TPEXT_WITH_CUDA
kernels::DType kernel_dtype(at::ScalarType t);
#endif

}  // namespace p2p_ref
}  // namespace tpext::ops
