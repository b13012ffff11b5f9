#include "schedule/lanes.h"

#include <c10/util/Exception.h>

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_streams.h"
#endif

namespace tpext::schedule {

#ifdef TPEXT_WITH_CUDA
struct ComputeLanes::Impl {
  c10::cuda::CUDAStream caller;
  c10::cuda::CUDAStream side;
  bool joined = false;
};

namespace {

class StreamGuard final : public ComputeLanes::Guard {
 public:
  explicit StreamGuard(c10::cuda::CUDAStream s) : guard_(s) {}

 private:
  c10::cuda::CUDAStreamGuard guard_;
};

}  // namespace
#else
struct ComputeLanes::Impl {};
#endif

namespace {
class NoGuard final : public ComputeLanes::Guard {};
}  // namespace

ComputeLanes::ComputeLanes(const c10::Device& device, int64_t lanes) {
  TORCH_CHECK(lanes == 1 || lanes == 2, "tpext: compute lanes must be 1 or 2, got ", lanes);
#ifdef TPEXT_WITH_CUDA
  if (device.is_cuda() && lanes == 2) {
    auto caller = c10::cuda::getCurrentCUDAStream(device.index());
    auto side = cuda::side_compute_stream(device.index());
    c10::cuda::CUDAEvent fork;
    fork.record(caller);
    fork.block(side);
    impl_ = std::make_unique<Impl>(Impl{caller, side});
  }
#else
  (void)device;
#endif
}

ComputeLanes::~ComputeLanes() {
  // A schedule that threw part-way still leaves the caller's stream ordered after its lane-1 work, so
  // the buffers it allocated are not reused under a running GEMM. Errors here cannot be reported.
  try {
    join();
  } catch (...) {  // NOLINT(bugprone-empty-catch): the original exception is already propagating
  }
}

std::unique_ptr<ComputeLanes::Guard> ComputeLanes::enter(int64_t j) {
#ifdef TPEXT_WITH_CUDA
  if (impl_) return std::make_unique<StreamGuard>(j % 2 == 0 ? impl_->caller : impl_->side);
#else
  (void)j;
#endif
  return std::make_unique<NoGuard>();
}

void ComputeLanes::join() {
#ifdef TPEXT_WITH_CUDA
  if (!impl_ || impl_->joined) return;
  impl_->joined = true;
  c10::cuda::CUDAEvent done;
  done.record(impl_->side);
  done.block(impl_->caller);
#endif
}

}  // namespace tpext::schedule
