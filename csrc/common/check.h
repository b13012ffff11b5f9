// TPEXT_CHECK_STATUS: the one check-and-throw that TPEXT_CUDA_CHECK, TPEXT_CUBLAS_CHECK and
// TPEXT_NCCL_CHECK share; each library's header supplies only its success value and how its status reads.
//
// Library code never calls exit() (design rule: errors are a feature): a failed call becomes a
// std::runtime_error "tpext: <library> error at <file>:<line>: `<expr>` returned <status>", so the Python
// side sees a RuntimeError on the rank that failed instead of a dead process. Plain C++, torch-free.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tpext::detail {

[[noreturn]] inline void throw_check_error(const char* library, const char* expr, const char* file, int line,
                                           const std::string& status) {
  std::ostringstream msg;
  msg << "tpext: " << library << " error at " << file << ":" << line << ": `" << expr << "` returned " << status;
  throw std::runtime_error(msg.str());
}

}  // namespace tpext::detail

// Evaluates `expr` exactly once; `text` is its spelling (#expr in the caller, so macros in it stay
// unexpanded). `describe(status)` is called only on failure. Wrapped in do/while so it is one statement
// after an unbraced if.
#define TPEXT_CHECK_STATUS(status_type, ok, library, describe, expr, text)                                  \
  do {                                                                                                      \
    const status_type tpext_check_status_ = (expr);                                                         \
    if (tpext_check_status_ != (ok)) {                                                                      \
      ::tpext::detail::throw_check_error(library, text, __FILE__, __LINE__, describe(tpext_check_status_)); \
    }                                                                                                       \
  } while (0)
