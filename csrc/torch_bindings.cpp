// The one schema file: every tpext op is declared here, with its implementations, and the pybind11
// module tpext._C (build information; later the C++ objects that are not ops).
//
// Conventions for every op: w is [N, K] (nn.Linear layout); x is [*, K] and "dim0" is its flattened
// token dimension; the group crosses in as its registered name; chunks = 1 is the sequential
// algorithm and any chunks >= 1 gives the same result up to rounding.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(tpext, m) {
  // all_reduce(x @ w.T) + bias, bias added once after the reduction. Row-parallel forward.
  m.def("gemm_all_reduce(Tensor x, Tensor w, Tensor? bias, str group_name, int chunks) -> Tensor");
  // This rank's dim-0 block of reduce_scatter(x @ w.T) + bias. Row-parallel forward with SP.
  m.def("gemm_reduce_scatter(Tensor x, Tensor w, Tensor? bias, str group_name, int chunks) -> Tensor");
  // (all_gather(x_shard) @ w.T + bias, all_gather(x_shard)). Column-parallel forward with SP; the
  // gathered input comes back for the weight gradient (drop it to re-gather in backward instead).
  m.def("all_gather_gemm(Tensor x_shard, Tensor w, Tensor? bias, str group_name, int chunks) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tpext, CPU, m) {
  m.impl("gemm_all_reduce", &tpext::ops::gemm_all_reduce);
  m.impl("gemm_reduce_scatter", &tpext::ops::gemm_reduce_scatter);
  m.impl("all_gather_gemm", &tpext::ops::all_gather_gemm);
}

// The same host code drives CUDA tensors: c10d (NCCL) runs the collectives on its own stream and
// the epilogue kernels come from csrc/kernels when they are compiled in.
TORCH_LIBRARY_IMPL(tpext, CUDA, m) {
  m.impl("gemm_all_reduce", &tpext::ops::gemm_all_reduce);
  m.impl("gemm_reduce_scatter", &tpext::ops::gemm_reduce_scatter);
  m.impl("all_gather_gemm", &tpext::ops::all_gather_gemm);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "tpext native extension: build information (the ops are torch.ops.tpext.*)";
#ifdef TPEXT_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.attr("built_with_torch") = TPEXT_TORCH_VERSION;  // set by setup.py; must match torch at import
}
