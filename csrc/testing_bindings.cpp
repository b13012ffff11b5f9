// The test-only ops, in their own library namespace (torch.ops.tpext_testing.*), so the public tpext
// schema (csrc/torch_bindings.cpp) holds only what users call. Virtual ranks: R ranks' inputs in one
// process and on one device, the real kernels and schedules between them (comm/virtual.h), which is how
// the multi-rank code is tested on one GPU, and without spawning processes on CPU. Fake kernels:
// tpext/ops/testing.py.
#include <torch/library.h>

#include "ops/p2p.h"
#include "ops/virtual_ranks.h"

namespace {

// run_on_virtual_ranks with the ranks' outputs flattened, rank-major (a schema cannot return a list of
// lists): rank r's outputs are [r * n, (r + 1) * n) with n = len(result) / len(xs).
std::vector<at::Tensor> run_on_virtual_ranks(const std::string& op, at::TensorList xs, at::TensorList ws,
                                             at::TensorList biases, at::TensorList residuals, int64_t chunks,
                                             int64_t algorithm) {
  std::vector<at::Tensor> flat;
  for (auto& rank_outputs :
       tpext::ops::run_on_virtual_ranks(op, xs.vec(), ws.vec(), biases.vec(), residuals.vec(), chunks, algorithm)) {
    for (auto& t : rank_outputs) flat.push_back(std::move(t));
  }
  return flat;
}

void register_kernels(torch::Library& m) {
  m.impl("p2p_virtual_all_reduce", &tpext::ops::p2p_virtual_all_reduce);
  m.impl("p2p_virtual_reduce_scatter", &tpext::ops::p2p_virtual_reduce_scatter);
  m.impl("p2p_virtual_all_gather", &tpext::ops::p2p_virtual_all_gather);
  m.impl("p2p_virtual_all_reduce_residual_rmsnorm", &tpext::ops::p2p_virtual_all_reduce_residual_rmsnorm);
  m.impl("run_on_virtual_ranks", &run_on_virtual_ranks);
}

}  // namespace

TORCH_LIBRARY(tpext_testing, m) {
  // P2P all-reduce on virtual ranks (algorithm 1 one-shot, 2 two-shot): every output is the sum of xs.
  m.def("p2p_virtual_all_reduce(Tensor[] xs, int algorithm) -> Tensor[]");
  // Virtual-rank reduce-scatter: output r is block r of the sum.
  m.def("p2p_virtual_reduce_scatter(Tensor[] xs) -> Tensor[]");
  // Virtual-rank all-gather: every output is cat(xs).
  m.def("p2p_virtual_all_gather(Tensor[] xs) -> Tensor[]");
  // Virtual-rank fused all-reduce + bias + residual + RMSNorm: (outs, new_residuals).
  m.def("p2p_virtual_all_reduce_residual_rmsnorm(Tensor[] xs, Tensor? residual, Tensor? bias, Tensor weight, "
        "float eps) -> (Tensor[], Tensor[])");
  // A GEMM op ("gemm_all_reduce", "gemm_reduce_scatter" or "all_gather_gemm") on len(xs) virtual ranks,
  // one host thread (and CUDA stream) each; rank r gets xs[r], ws[r], biases[r], residuals[r] (empty
  // lists: none). Every rank's outputs, flattened rank-major. The ranks run without the GIL.
  m.def("run_on_virtual_ranks(str op, Tensor[] xs, Tensor[] ws, Tensor[] biases, Tensor[] residuals, int chunks, "
        "int algorithm) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(tpext_testing, CPU, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(tpext_testing, CUDA, m) { register_kernels(m); }
