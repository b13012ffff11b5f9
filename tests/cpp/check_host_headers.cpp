// Compiled by the host C++ compiler alone (never nvcc): the headers that csrc/ops/*.cpp includes next to
// torch must stay plain C++ (no __global__, no device-only types). CMake builds this as part of the
// tpext_header_check object library, so a device construct creeping into them fails the compile check.
#include "common/cuda_check.h"
#include "kernels/epilogue.h"
#include "kernels/p2p.h"

#include <cstdint>
#include <type_traits>

namespace {
using tpext::kernels::BiasResidualParams;
using tpext::kernels::DType;

// The params struct crosses from C++ op code into the kernels library by value: keep it a POD.
static_assert(std::is_trivially_copyable_v<BiasResidualParams>, "params must be POD");
static_assert(std::is_standard_layout_v<BiasResidualParams>, "params must be POD");
static_assert(static_cast<int>(DType::kFloat64) == 3, "DType values are part of the contract");

// P2P abort codes (kernels/p2p.h): written by the kernels, decoded by the host; every field round-trips
// at its extremes, and a code is never 0 (0 means "not aborted").
namespace ab = tpext::kernels::p2p_abort;
using tpext::kernels::P2POp;
constexpr uint32_t kMax = ab::encode(ab::kTimeout, P2POp::kResidualRMSNorm, 7, 7, 3, 63);
static_assert(ab::kind(kMax) == ab::kTimeout && ab::op(kMax) == P2POp::kResidualRMSNorm, "abort code kind/op");
static_assert(ab::rank(kMax) == 7 && ab::peer(kMax) == 7 && ab::barrier(kMax) == 3 && ab::block(kMax) == 63,
              "abort code rank/peer/barrier/block");
constexpr uint32_t kMin = ab::encode(ab::kRefused, P2POp::kAllReduceOneShot, 0, 0, 0, 0);
static_assert(kMin != 0 && ab::kind(kMin) == ab::kRefused && ab::rank(kMin) == 0 && ab::block(kMin) == 0,
              "a refusal of rank 0 is still a non-zero code");
static_assert(ab::peer(ab::encode(ab::kTimeout, P2POp::kAllGather, 3, 5, 2, 17)) == 5 &&
                  ab::block(ab::encode(ab::kTimeout, P2POp::kAllGather, 3, 5, 2, 17)) == 17,
              "fields do not bleed into each other");
static_assert(std::is_trivially_copyable_v<tpext::kernels::P2PGroup>, "P2PGroup crosses to the kernels by value");

[[maybe_unused]] void check_signature() {
  void (*launch)(const BiasResidualParams&, cudaStream_t) = &tpext::kernels::launch_bias_residual_add;
  (void)launch;
  // The check macro must be usable from host code as one statement.
  if (false) TPEXT_CUDA_CHECK(cudaSuccess);
}
}  // namespace
