// Compute lanes: the streams the chunk GEMMs of one schedule run on.
//
// Lane 0 is the caller's current stream; with two lanes on a CUDA device, lane 1 is tpext's side compute
// stream (csrc/common/cuda_streams.h) and chunk j runs on lane j % 2. The GEMM of one chunk rarely fills
// whole waves of CTAs: its partial last wave leaves SMs idle, and the next chunk's GEMM, on the other
// lane, fills them (wave quantization). On CPU tensors, or with one lane, every call here is a no-op and
// the schedule runs on the caller's thread exactly as before.
//
// Ordering contract (no host synchronisation anywhere, so the whole schedule is CUDA-graph capturable):
//  * construction forks: lane 1 waits for everything already queued on the caller's stream;
//  * join() makes the caller's stream wait for lane 1, so everything after the op is ordered after all
//    of its GEMMs. Every buffer lane 1 or the communication stream touches must be allocated on the
//    caller's stream before the fork and stay referenced until after join(): the caching allocator then
//    only hands the memory out again to work ordered after the join.
#pragma once

#include <cstdint>
#include <memory>

#include <c10/core/Device.h>

namespace tpext::schedule {

class ComputeLanes {
 public:
  ComputeLanes(const c10::Device& device, int64_t lanes);
  ~ComputeLanes();
  ComputeLanes(const ComputeLanes&) = delete;
  ComputeLanes& operator=(const ComputeLanes&) = delete;

  // While the returned guard lives, the current stream is chunk j's lane.
  class Guard {
   public:
    virtual ~Guard() = default;
  };
  std::unique_ptr<Guard> enter(int64_t j);

  // The caller's stream waits for every lane (idempotent; the destructor joins too).
  void join();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;  // null: a single lane, or CPU
};

}  // namespace tpext::schedule
