// What the kernel tests (tests/cpp/test_*.cu) share: host conversions between the storage types and fp64
// for the oracles, each storage type's DType, tolerance scales and name, and the tests' main.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>

#include "kernels/epilogue.h"  // DType

namespace tpext::testing {

// The cuda_fp16 / cuda_bf16 conversions are host-callable too.
inline double to_f64(float x) { return x; }
inline double to_f64(double x) { return x; }
inline double to_f64(__half x) { return static_cast<double>(__half2float(x)); }
inline double to_f64(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }

// One rounding, to nearest even (through fp32 for the 16-bit types: exact for any fp32 input).
template <typename T>
T from_f64(double x) {
  return static_cast<T>(x);
}
template <>
inline __half from_f64<__half>(double x) {
  return __float2half_rn(static_cast<float>(x));
}
template <>
inline __nv_bfloat16 from_f64<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}

// kEps: twice the unit roundoff of the storage type (one rounding of the result is <= kEps/2
// relative); kAcc: the same for its accumulation type (fp32, or fp64 for fp64).
template <typename T>
struct Traits;

#define TPEXT_TEST_TRAITS(T, dtype, eps, acc, name)          \
  template <>                                                \
  struct Traits<T> {                                         \
    static constexpr ::tpext::kernels::DType kDtype = dtype; \
    static constexpr double kEps = eps, kAcc = acc;          \
    static constexpr const char* kName = name;               \
  }

TPEXT_TEST_TRAITS(float, ::tpext::kernels::DType::kFloat32, 0x1p-23, 0x1p-23, "fp32");
TPEXT_TEST_TRAITS(double, ::tpext::kernels::DType::kFloat64, 0x1p-52, 0x1p-52, "fp64");
TPEXT_TEST_TRAITS(__half, ::tpext::kernels::DType::kFloat16, 0x1p-10, 0x1p-23, "fp16");
TPEXT_TEST_TRAITS(__nv_bfloat16, ::tpext::kernels::DType::kBFloat16, 0x1p-7, 0x1p-23, "bf16");

#undef TPEXT_TEST_TRAITS

// f(T{}) for each storage type in turn (fp32, fp16, bf16, fp64); the sum of what it returns.
template <typename F>
int sum_over_dtypes(F&& f) {
  int sum = f(float{});
  sum += f(__half{});
  sum += f(__nv_bfloat16{});
  sum += f(double{});
  return sum;
}

// A kernel test's main: runs `body`, which returns how many of its `what`s (cases, checks) failed, and
// prints "<name>: OK" or "<name>: FAILED (n failing <what>s)". Exit status 0 only when all passed; 1 on
// failures and where there is no CUDA device (a test run where it cannot test must not report success),
// 2 on an exception.
template <typename F>
int test_main(const char* name, const char* what, F&& body) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("%s: no CUDA device, nothing run\n", name);
    return 1;
  }
  try {
    const int failures = body();
    std::printf("%s: %s (%d failing %s%s)\n", name, failures ? "FAILED" : "OK", failures, what,
                failures == 1 ? "" : "s");
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::printf("%s: error: %s\n", name, e.what());
    return 2;
  }
}

}  // namespace tpext::testing
