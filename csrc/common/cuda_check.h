// TPEXT_CUDA_CHECK: check a CUDA runtime call and throw on failure (common/check.h), e.g.
// "... returned cudaErrorInvalidValue (1): invalid argument". Usable from host code compiled by g++ as
// well as by nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "check.h"

namespace tpext::detail {

inline std::string cuda_status(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + std::to_string(static_cast<int>(err)) +
         "): " + cudaGetErrorString(err);
}

}  // namespace tpext::detail

#define TPEXT_CUDA_CHECK(expr) \
  TPEXT_CHECK_STATUS(cudaError_t, cudaSuccess, "CUDA", ::tpext::detail::cuda_status, expr, #expr)
