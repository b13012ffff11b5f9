#ifdef TPEXT_WITH_CUDA

#include "common/cuda_streams.h"

#include <array>
#include <mutex>

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include "common/cuda_check.h"

namespace tpext::cuda {
namespace {

constexpr int kMaxDevices = 64;  // c10's own bound on devices per process (C10_COMPILE_TIME_MAX_GPUS)

enum class Kind { kComm = 0, kCompute = 1 };

c10::cuda::CUDAStream owned_stream(c10::DeviceIndex device, Kind kind) {
  static std::mutex mu;
  static std::array<std::array<cudaStream_t, 2>, kMaxDevices> streams{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "tpext: CUDA device index ", static_cast<int>(device),
              " out of range [0, ", kMaxDevices, ")");
  std::lock_guard<std::mutex> lock(mu);
  cudaStream_t& s = streams[device][static_cast<int>(kind)];
  if (s == nullptr) {
    c10::cuda::CUDAGuard guard(device);
    int least = 0, greatest = 0;
    TPEXT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    TPEXT_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, kind == Kind::kComm ? greatest : least));
  }
  return c10::cuda::getStreamFromExternal(s, device);
}

}  // namespace

c10::cuda::CUDAStream comm_stream(c10::DeviceIndex device) { return owned_stream(device, Kind::kComm); }

c10::cuda::CUDAStream side_compute_stream(c10::DeviceIndex device) { return owned_stream(device, Kind::kCompute); }

}  // namespace tpext::cuda

#endif  // TPEXT_WITH_CUDA
