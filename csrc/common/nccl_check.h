// TPEXT_NCCL_CHECK: check an NCCL call and throw on failure (common/check.h; never exit()).
//
// The message names file:line, the expression, NCCL's result code and its description. For more detail on
// a failed communicator call NCCL also keeps ncclGetLastError(comm); callers that hold the comm may append
// it. Communicators created non-blocking return ncclInProgress from most calls: that is not an error there,
// and such callers must poll ncclCommGetAsyncError themselves instead of using this macro.
#pragma once

#include <nccl.h>

#include <string>

#include "check.h"

namespace tpext::detail {

inline std::string nccl_status(ncclResult_t res) {
  return std::to_string(static_cast<int>(res)) + ": " + ncclGetErrorString(res);
}

}  // namespace tpext::detail

#define TPEXT_NCCL_CHECK(expr) \
  TPEXT_CHECK_STATUS(ncclResult_t, ncclSuccess, "NCCL", ::tpext::detail::nccl_status, expr, #expr)
