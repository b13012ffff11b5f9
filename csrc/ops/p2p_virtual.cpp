// Virtual-rank P2P ops: R ranks' inputs on one device, one result per rank. On CUDA the inputs are
// copied into R scratch buffers that form the pointer table of the real kernels, which then run with
// stream order as their barrier (cannot deadlock, see csrc/kernels/p2p.h); on CPU they run the host
// reference. This is how the kernels are tested on a single GPU, against the same references.
#include "ops/p2p.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace tpext::ops {
namespace {

std::vector<at::Tensor> contiguous_all(at::TensorList xs) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& x : xs) out.push_back(x.contiguous());
  return out;
}

std::vector<at::Tensor> copies(const at::Tensor& t, size_t n) {
  std::vector<at::Tensor> out;
  for (size_t r = 0; r < n; ++r) out.push_back(t.clone());
  return out;
}

#ifdef TPEXT_WITH_CUDA
// Scratch buffers (fresh allocations: 16-byte aligned) holding the inputs, and their pointer table.
kernels::P2PGroup virtual_group(const std::vector<at::Tensor>& xs, std::vector<at::Tensor>* scratch) {
  kernels::P2PGroup g{};
  g.world = static_cast<int32_t>(xs.size());
  for (size_t r = 0; r < xs.size(); ++r) {
    scratch->push_back(xs[r].clone());
    g.buffers[r] = scratch->back().data_ptr();
  }
  return g;
}

std::vector<at::Tensor> empties(const at::Tensor& like, at::IntArrayRef sizes, size_t n, std::vector<void*>* ptrs) {
  std::vector<at::Tensor> out;
  for (size_t r = 0; r < n; ++r) {
    out.push_back(at::empty(sizes, like.options()));
    ptrs->push_back(out.back().data_ptr());
  }
  return out;
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// Runs a virtual-rank kernel on the R inputs xs: `p` with the scratch group, numel and dtype filled in,
// launched as launch(p, outs, stream) into R fresh outputs of `sizes`, which it returns.
template <typename Params, typename Launch>
std::vector<at::Tensor> run_virtual(const std::vector<at::Tensor>& xs, at::IntArrayRef sizes, Params p, Launch launch) {
  std::vector<at::Tensor> scratch;
  std::vector<void*> ptrs;
  auto outs = empties(xs[0], sizes, xs.size(), &ptrs);
  p.group = virtual_group(xs, &scratch);
  p.numel = xs[0].numel();
  p.dtype = p2p_ref::kernel_dtype(xs[0].scalar_type());
  launch(p, ptrs.data(), stream_of(xs[0]));
  return outs;
}
#endif

}  // namespace

std::vector<at::Tensor> p2p_virtual_all_reduce(at::TensorList xs_in, int64_t algorithm) {
  const char* op = "p2p_virtual_all_reduce";
  p2p_ref::check_virtual(op, xs_in);
  TORCH_CHECK(algorithm == static_cast<int64_t>(P2PAlgorithm::kOneShot) ||
                  algorithm == static_cast<int64_t>(P2PAlgorithm::kTwoShot),
              "tpext.", op, ": algorithm must be 1 (one-shot) or 2 (two-shot), got ", algorithm);
  c10::DeviceGuard guard(xs_in[0].device());
  const auto xs = contiguous_all(xs_in);
#ifdef TPEXT_WITH_CUDA
  if (xs[0].is_cuda()) {
    kernels::P2PAllReduceParams p{};
    p.algo = static_cast<P2PAlgorithm>(algorithm) == P2PAlgorithm::kOneShot ? kernels::P2PAlgo::kOneShot
                                                                            : kernels::P2PAlgo::kTwoShot;
    return run_virtual(xs, xs[0].sizes(), p, kernels::launch_p2p_all_reduce_virtual);
  }
#endif
  return copies(p2p_ref::ordered_sum(xs).to(xs[0].scalar_type()), xs.size());
}

std::vector<at::Tensor> p2p_virtual_reduce_scatter(at::TensorList xs_in) {
  const char* op = "p2p_virtual_reduce_scatter";
  p2p_ref::check_virtual(op, xs_in);
  const int64_t world = static_cast<int64_t>(xs_in.size());
  TORCH_CHECK(xs_in[0].dim() >= 1 && xs_in[0].size(0) % world == 0, "tpext.", op,
              ": each input must be [R * m, *] with dim 0 divisible by R = ", world, ", got shape ", xs_in[0].sizes());
  c10::DeviceGuard guard(xs_in[0].device());
  const auto xs = contiguous_all(xs_in);
  std::vector<int64_t> sizes(xs[0].sizes().begin(), xs[0].sizes().end());
  sizes[0] /= world;
#ifdef TPEXT_WITH_CUDA
  if (xs[0].is_cuda()) {
    return run_virtual(xs, sizes, kernels::P2PScatterGatherParams{}, kernels::launch_p2p_reduce_scatter_virtual);
  }
#endif
  at::Tensor sum = p2p_ref::ordered_sum(xs).to(xs[0].scalar_type());
  std::vector<at::Tensor> outs;
  for (int64_t r = 0; r < world; ++r) outs.push_back(sum.narrow(0, r * sizes[0], sizes[0]).clone());
  return outs;
}

std::vector<at::Tensor> p2p_virtual_all_gather(at::TensorList xs_in) {
  const char* op = "p2p_virtual_all_gather";
  p2p_ref::check_virtual(op, xs_in);
  TORCH_CHECK(xs_in[0].dim() >= 1, "tpext.", op, ": each input must be [m, *] with at least 1 dim, got a 0-dim tensor");
  c10::DeviceGuard guard(xs_in[0].device());
  const auto xs = contiguous_all(xs_in);
  std::vector<int64_t> sizes(xs[0].sizes().begin(), xs[0].sizes().end());
  sizes[0] *= static_cast<int64_t>(xs.size());
#ifdef TPEXT_WITH_CUDA
  if (xs[0].is_cuda()) {
    return run_virtual(xs, sizes, kernels::P2PScatterGatherParams{}, kernels::launch_p2p_all_gather_virtual);
  }
#endif
  return copies(at::cat(xs, 0), xs.size());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> p2p_virtual_all_reduce_residual_rmsnorm(
    at::TensorList xs_in, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& bias,
    const at::Tensor& weight, double eps) {
  const char* op = "p2p_virtual_all_reduce_residual_rmsnorm";
  p2p_ref::check_virtual(op, xs_in);
  p2p_ref::check_norm_args(op, xs_in[0], residual, bias, weight, eps);
  c10::DeviceGuard guard(xs_in[0].device());
  const auto xs = contiguous_all(xs_in);
#ifdef TPEXT_WITH_CUDA
  if (xs[0].is_cuda()) {
    std::vector<at::Tensor> scratch;
    std::vector<void*> out_ptrs, res_ptrs;
    auto outs = empties(xs[0], xs[0].sizes(), xs.size(), &out_ptrs);
    auto new_res = empties(xs[0], xs[0].sizes(), xs.size(), &res_ptrs);
    // Aligned as p2p_all_reduce_residual_rmsnorm's: the same vector width, block size and reduction tree.
    at::Tensor res_c = residual.has_value() ? p2p_ref::aligned(residual->contiguous()) : at::Tensor();
    at::Tensor bias_c = bias.has_value() ? p2p_ref::aligned(bias->contiguous()) : at::Tensor();
    at::Tensor w_c = p2p_ref::aligned(weight.contiguous());
    kernels::P2PResidualRMSNormParams p{};
    p.group = virtual_group(xs, &scratch);
    p.residual = res_c.defined() ? res_c.data_ptr() : nullptr;
    p.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
    p.weight = w_c.data_ptr();
    p.hidden = xs[0].dim() > 0 ? xs[0].size(-1) : 0;
    p.rows = p.hidden > 0 ? xs[0].numel() / p.hidden : 0;
    p.eps = eps;
    p.dtype = p2p_ref::kernel_dtype(xs[0].scalar_type());
    kernels::launch_p2p_all_reduce_residual_rmsnorm_virtual(p, out_ptrs.data(), res_ptrs.data(), stream_of(xs[0]));
    return {outs, new_res};
  }
#endif
  auto [out, h] = p2p_ref::residual_rmsnorm(p2p_ref::ordered_sum(xs), residual, bias, weight, eps, xs[0].scalar_type());
  return {copies(out, xs.size()), copies(h, xs.size())};
}

}  // namespace tpext::ops
