// TPEXT_NCCL_CHECK: check an NCCL call and throw on failure (never exit()).
//
// The message names file:line, the expression and NCCL's description. For more detail on a failed
// communicator call NCCL also keeps ncclGetLastError(comm); callers that hold the comm may append it.
// Communicators created non-blocking return ncclInProgress from most calls: that is not an error there,
// and such callers must poll ncclCommGetAsyncError themselves instead of using this macro.
#pragma once

#include <nccl.h>

#include <sstream>
#include <stdexcept>

namespace tpext::detail {

[[noreturn]] inline void throw_nccl_error(ncclResult_t res, const char* expr, const char* file, int line) {
  std::ostringstream msg;
  msg << "tpext: NCCL error at " << file << ":" << line << ": `" << expr << "` returned " << static_cast<int>(res)
      << ": " << ncclGetErrorString(res);
  throw std::runtime_error(msg.str());
}

}  // namespace tpext::detail

#define TPEXT_NCCL_CHECK(expr)                                                       \
  do {                                                                               \
    const ncclResult_t tpext_nccl_res_ = (expr);                                     \
    if (tpext_nccl_res_ != ncclSuccess) {                                            \
      ::tpext::detail::throw_nccl_error(tpext_nccl_res_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)
