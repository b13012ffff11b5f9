// The one small interface every communication backend implements (c10d today; an own NCCL
// communicator and P2P symmetric buffers later). Schedules talk only to this.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace tpext::comm {

// A collective in flight. wait() makes the caller's consumer ordered after it: on CPU (gloo) it
// blocks the host; on CUDA (NCCL) it only makes the current stream wait, so loops stay host-async.
class Pending {
 public:
  virtual ~Pending() = default;
  virtual void wait() = 0;
};
using PendingPtr = std::unique_ptr<Pending>;

// Every call is asynchronous and sum-reducing. Invariant the schedules rely on: every rank of the
// group issues the same calls, with the same sizes, in the same order.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In place: buf <- sum over ranks of buf.
  virtual PendingPtr all_reduce(at::Tensor& buf) = 0;
  // in: [size() * rows, ...] contiguous, block r destined to rank r; out: [rows, ...] contiguous.
  virtual PendingPtr reduce_scatter(at::Tensor& out, at::Tensor& in) = 0;
  // outs[r] <- rank r's `in`; each outs[r] contiguous and shaped like `in`.
  virtual PendingPtr all_gather(std::vector<at::Tensor>& outs, at::Tensor& in) = 0;
};

// Resolves a torch.distributed group by its registered name (ProcessGroup.group_name). `op` names
// the calling op in the error raised for an unknown name.
std::unique_ptr<Communicator> make_c10d_communicator(const std::string& group_name, const char* op);

}  // namespace tpext::comm
