// The one schema file: every tpext op is declared here, with its implementations, and the pybind11
// module tpext._C (build information, the NCCL communicator options, the P2P registry of
// csrc/p2p_bindings.cpp). The test-only ops are torch.ops.tpext_testing.* (csrc/testing_bindings.cpp).
//
// Conventions for every op: w is [N, K] (nn.Linear layout); x is [*, K] and "dim0" is its flattened
// token dimension; the group crosses in as its registered name. `algorithm` is a
// schedule::Algorithm value (tpext.ops.Algorithm): 0 sequential (chunks must be 1), 1 chunked
// pipeline, 2 chunked pipeline with the chunk GEMMs on two CUDA streams (1 on CPU); the default 1
// with chunks = 1 is the sequential schedule. Any schedule gives the same result up to rounding.
#include <ATen/autocast_mode.h>
#include <torch/extension.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops/gemm_collectives.h"
#include "ops/p2p.h"
#include "p2p_bindings.h"

#ifdef TPEXT_WITH_CUDA
#include "comm/nccl.h"
#endif

TORCH_LIBRARY(tpext, m) {
  // all_reduce(x @ w.T) + bias + residual, both added once after the reduction. Row-parallel forward.
  m.def("gemm_all_reduce(Tensor x, Tensor w, Tensor? bias, str group_name, int chunks, int algorithm=1, "
        "Tensor? residual=None) -> Tensor");
  // This rank's dim-0 block of reduce_scatter(x @ w.T) + bias + residual. Row-parallel forward with SP.
  m.def("gemm_reduce_scatter(Tensor x, Tensor w, Tensor? bias, str group_name, int chunks, int algorithm=1, "
        "Tensor? residual=None) -> Tensor");
  // (all_gather(x_shard) @ w.T + bias, all_gather(x_shard)). Column-parallel forward with SP; the
  // gathered input comes back for the weight gradient (drop it to re-gather in backward instead).
  m.def("all_gather_gemm(Tensor x_shard, Tensor w, Tensor? bias, str group_name, int chunks, int algorithm=1) "
        "-> (Tensor, Tensor)");
  // P2P ops (csrc/ops/p2p.h): algorithm is an ops::P2PAlgorithm (tpext.p2p.P2PAlgorithm): 0 = the group's
  // collective, 1 = one-shot, 2 = two-shot kernel.
  // sum over ranks of x, every rank the same bits on the P2P path. Small-message all-reduce.
  m.def("p2p_all_reduce(Tensor x, str group_name, int algorithm) -> Tensor");
  // This rank's dim-0 block of the sum over ranks of x ([R*m, *] -> [m, *]).
  m.def("p2p_reduce_scatter(Tensor x, str group_name, int algorithm) -> Tensor");
  // Every rank's x stacked along dim 0 ([m, *] -> [R*m, *]).
  m.def("p2p_all_gather(Tensor x, str group_name, int algorithm) -> Tensor");
  // (rms_norm(h) * weight, h) with h = all_reduce(x) + bias + residual, one fused pass. Decode epilogue.
  m.def("p2p_all_reduce_residual_rmsnorm(Tensor x, Tensor? residual, Tensor? bias, Tensor weight, float eps, "
        "str group_name, int algorithm) -> (Tensor, Tensor)");
  // (grad_h + grad_residual, grad_weight) of out = rms_norm(h) * weight; local, no communication.
  m.def("p2p_rmsnorm_backward(Tensor grad_out, Tensor? grad_residual, Tensor h, Tensor weight, float eps) "
        "-> (Tensor, Tensor)");
}

namespace {

// One host implementation per op serves CPU and CUDA tensors (below).
void register_kernels(torch::Library& m) {
  m.impl("gemm_all_reduce", &tpext::ops::gemm_all_reduce);
  m.impl("gemm_reduce_scatter", &tpext::ops::gemm_reduce_scatter);
  m.impl("all_gather_gemm", &tpext::ops::all_gather_gemm);
  m.impl("p2p_all_reduce", &tpext::ops::p2p_all_reduce);
  m.impl("p2p_reduce_scatter", &tpext::ops::p2p_reduce_scatter);
  m.impl("p2p_all_gather", &tpext::ops::p2p_all_gather);
  m.impl("p2p_all_reduce_residual_rmsnorm", &tpext::ops::p2p_all_reduce_residual_rmsnorm);
  m.impl("p2p_rmsnorm_backward", &tpext::ops::p2p_rmsnorm_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(tpext, CPU, m) { register_kernels(m); }

// Called directly (outside tpext.nn's autograd Functions) with inputs that require grad, the ops run
// below autograd and return outputs whose backward raises "not implemented", instead of failing inside
// an out= GEMM; tpext.nn provides the differentiable layers.
TORCH_LIBRARY_IMPL(tpext, Autograd, m) {
  m.impl("gemm_all_reduce", torch::autograd::autogradNotImplementedFallback());
  m.impl("gemm_reduce_scatter", torch::autograd::autogradNotImplementedFallback());
  m.impl("all_gather_gemm", torch::autograd::autogradNotImplementedFallback());
}

namespace {

// Under torch.autocast the GEMM ops follow aten::linear's policy: their floating-point tensors are cast to
// the device's autocast dtype (weights through autocast's cache, as nn.Linear's are) and the op runs again
// below autocast, so torch.ops.tpext.* mix with autocast code exactly as the layers they replace do. A
// residual of another dtype is added after the op instead, as `linear(...) + residual` would be: in the
// wider dtype (an fp32 residual stream is not rounded to bf16).
template <c10::DeviceType kDevice>
void autocast_lower_precision(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::optional<at::Tensor> wide_residual;
  for (size_t i = 0; i < arguments.size(); ++i) {
    auto& arg = (*stack)[first + i];
    if (!arg.isTensor()) continue;
    const at::Tensor t = arg.toTensor();
    if (arguments[i].name() == "residual" && t.is_floating_point() && t.scalar_type() != dtype) {
      wide_residual = t;
      arg = c10::IValue();
    } else {
      arg = at::autocast::cached_cast(dtype, t, kDevice);
    }
  }
  {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
    op.callBoxed(stack);
  }
  if (wide_residual.has_value()) stack->back() = stack->back().toTensor() + *wide_residual;
}

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  for (const char* name : {"gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_lower_precision<kDevice>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(tpext, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tpext, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

// The same host code drives CUDA tensors: in a CUDA build the collectives run on tpext's own NCCL
// communicator and streams (comm/nccl.h) and the epilogue is the kernel in csrc/kernels; a CPU build
// falls back to the group's c10d backend and ATen.
TORCH_LIBRARY_IMPL(tpext, CUDA, m) { register_kernels(m); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "tpext native extension: build information (the ops are torch.ops.tpext.*)";
#ifdef TPEXT_WITH_CUDA
  m.attr("cuda_compiled") = true;
  namespace py = pybind11;
  using tpext::comm::NcclOptions;
  auto options_dict = [](const NcclOptions& o) {
    py::dict d;
    d["max_ctas"] = o.max_ctas;
    d["cga_cluster_size"] = o.cga_cluster_size;
    d["local_fast_path"] = o.local_fast_path;
    return d;
  };
  // NCCL communicator options of a group (tpext.ops.set_nccl_options documents them).
  m.def("_set_nccl_options",
        [](const std::string& group_name, int64_t max_ctas, int64_t cga_cluster_size, bool local_fast_path) {
    tpext::comm::set_nccl_options(group_name, NcclOptions{max_ctas, cga_cluster_size, local_fast_path});
  });
  m.def("_nccl_options", [options_dict](const std::string& g) { return options_dict(tpext::comm::nccl_options(g)); });
  m.def("_nccl_comm_info", [options_dict](const std::string& g) {
    const auto info = tpext::comm::nccl_comm_info(g);
    py::dict d;
    d["created"] = info.created;
    d["rank"] = info.rank;
    d["size"] = info.size;
    d["device"] = info.device;
    d["options"] = options_dict(info.options);
    return d;
  });
  m.def("_nccl_version", &tpext::comm::nccl_runtime_version);
  m.def("_destroy_nccl_communicators", &tpext::comm::destroy_nccl_communicators);
  m.def("_abort_nccl_communicators", &tpext::comm::abort_nccl_communicators);
#else
  m.attr("cuda_compiled") = false;
#endif
  m.attr("built_with_torch") = TPEXT_TORCH_VERSION;  // set by setup.py; must match torch at import
  tpext::bind_p2p(m);                                // p2p_*: symmetric buffers of a group (tpext/p2p.py drives them)
}
