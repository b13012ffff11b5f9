// TPEXT_CUBLAS_CHECK: check a cuBLAS call and throw on failure (common/check.h; never exit()).
//
// cublasGetStatusName / cublasGetStatusString (cuBLAS >= 11.4) give the enum name and a description, so
// the message says e.g. "CUBLAS_STATUS_NOT_SUPPORTED: the functionality requested is not supported".
#pragma once

#include <cublas_v2.h>

#include <string>

#include "check.h"

namespace tpext::detail {

inline std::string cublas_status(cublasStatus_t st) {
  return std::string(cublasGetStatusName(st)) + ": " + cublasGetStatusString(st);
}

}  // namespace tpext::detail

#define TPEXT_CUBLAS_CHECK(expr) \
  TPEXT_CHECK_STATUS(cublasStatus_t, CUBLAS_STATUS_SUCCESS, "cuBLAS", ::tpext::detail::cublas_status, expr, #expr)
