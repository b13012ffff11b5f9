// Test driver: one op on R virtual ranks of one process (comm/virtual.h), one host thread per rank.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace tpext::ops {

// Calls `op` ("gemm_all_reduce", "gemm_reduce_scatter" or "all_gather_gemm") on rank r with xs[r],
// ws[r], biases[r] and residuals[r] (empty lists: none) in its own thread, each CUDA rank on its own
// stream, and returns every rank's outputs. On CUDA the caller's current stream is ordered after all
// ranks' work on return. A failing rank aborts the others; the first failure is rethrown.
std::vector<std::vector<at::Tensor>> run_on_virtual_ranks(const std::string& op, const std::vector<at::Tensor>& xs,
                                                          const std::vector<at::Tensor>& ws,
                                                          const std::vector<at::Tensor>& biases,
                                                          const std::vector<at::Tensor>& residuals, int64_t chunks,
                                                          int64_t algorithm);

}  // namespace tpext::ops
