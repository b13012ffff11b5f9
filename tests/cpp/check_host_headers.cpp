// Compiled by the host C++ compiler alone (never nvcc): the headers that csrc/ops/*.cpp includes next to
// torch must stay plain C++ (no __global__, no device-only types). CMake builds this as part of the
// tpext_header_check object library, so a device construct creeping into them fails the compile check.
#include "common/cuda_check.h"
#include "kernels/epilogue.h"

#include <type_traits>

namespace {
using tpext::kernels::BiasResidualParams;
using tpext::kernels::DType;

// The params struct crosses from C++ op code into the kernels library by value: keep it a POD.
static_assert(std::is_trivially_copyable_v<BiasResidualParams>, "params must be POD");
static_assert(std::is_standard_layout_v<BiasResidualParams>, "params must be POD");
static_assert(static_cast<int>(DType::kFloat64) == 3, "DType values are part of the contract");

[[maybe_unused]] void check_signature() {
  void (*launch)(const BiasResidualParams&, cudaStream_t) = &tpext::kernels::launch_bias_residual_add;
  (void)launch;
  // The check macro must be usable from host code as one statement.
  if (false) TPEXT_CUDA_CHECK(cudaSuccess);
}
}  // namespace
