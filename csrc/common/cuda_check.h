// TPEXT_CUDA_CHECK: check a CUDA runtime call and throw on failure.
//
// Library code never calls exit() (design rule: errors are a feature): a failed call becomes a
// std::runtime_error carrying where it happened, the expression text and CUDA's own description, so the
// Python side sees a RuntimeError on the rank that failed instead of a dead process. Plain C++: usable
// from host code compiled by g++ as well as by nvcc, and torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <stdexcept>

namespace tpext::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  std::ostringstream msg;
  msg << "tpext: CUDA error at " << file << ":" << line << ": `" << expr << "` returned " << cudaGetErrorName(err)
      << " (" << static_cast<int>(err) << "): " << cudaGetErrorString(err);
  throw std::runtime_error(msg.str());
}

}  // namespace tpext::detail

// Evaluates `expr` exactly once. Wrapped in do/while so it is one statement after an unbraced if.
#define TPEXT_CUDA_CHECK(expr)                                                       \
  do {                                                                               \
    const cudaError_t tpext_cuda_err_ = (expr);                                      \
    if (tpext_cuda_err_ != cudaSuccess) {                                            \
      ::tpext::detail::throw_cuda_error(tpext_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)
