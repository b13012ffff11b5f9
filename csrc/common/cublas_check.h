// TPEXT_CUBLAS_CHECK: check a cuBLAS call and throw on failure (never exit()).
//
// cublasGetStatusName / cublasGetStatusString (cuBLAS >= 11.4) give the enum name and a description, so
// the message says e.g. "CUBLAS_STATUS_NOT_SUPPORTED: the functionality requested is not supported".
#pragma once

#include <cublas_v2.h>

#include <sstream>
#include <stdexcept>

namespace tpext::detail {

[[noreturn]] inline void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  std::ostringstream msg;
  msg << "tpext: cuBLAS error at " << file << ":" << line << ": `" << expr << "` returned " << cublasGetStatusName(st)
      << ": " << cublasGetStatusString(st);
  throw std::runtime_error(msg.str());
}

}  // namespace tpext::detail

#define TPEXT_CUBLAS_CHECK(expr)                                                        \
  do {                                                                                  \
    const cublasStatus_t tpext_cublas_st_ = (expr);                                     \
    if (tpext_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                    \
      ::tpext::detail::throw_cublas_error(tpext_cublas_st_, #expr, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)
