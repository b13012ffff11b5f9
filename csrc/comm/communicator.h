// The one small interface every communication backend implements: c10d (any ProcessGroup, comm/c10d.h),
// tpext's own NCCL communicator (comm/nccl.h, CUDA tensors), the virtual ranks of the tests
// (comm/virtual.h) and the local identity for groups of one; make_communicator (communicator.cpp) picks
// one. Schedules talk only to this. The P2P symmetric buffers (comm/p2p.h) are not a Communicator: the
// P2P ops drive their kernels directly and fall back to a c10d Communicator.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace tpext::comm {

// A collective in flight. wait() makes the caller's consumer ordered after it: on CPU (gloo) it
// blocks the host; on CUDA (NCCL) it only makes the *current* stream wait, so loops stay host-async.
// Call it at most once. On CUDA, destroying one that was never waited for (a schedule unwinding after
// an error) makes the current stream wait instead, so its buffers are never freed under the collective;
// on CPU the c10d Work keeps its tensors alive by itself.
class Pending {
 public:
  virtual ~Pending() = default;
  virtual void wait() = 0;
};
using PendingPtr = std::unique_ptr<Pending>;

// Every call is asynchronous and sum-reducing, and ordered after the work already queued by the caller
// (on CUDA: on the current stream at the call). Invariant the schedules rely on: every rank of the
// group issues the same calls, with the same sizes, in the same order.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // True for the group-of-one identity: no collective is ever made, so callers may skip them.
  virtual bool local() const { return false; }
  // In place: buf <- sum over ranks of buf.
  virtual PendingPtr all_reduce(at::Tensor& buf) = 0;
  // in: [size() * rows, ...] contiguous, block r destined to rank r; out: [rows, ...] contiguous.
  virtual PendingPtr reduce_scatter(at::Tensor& out, at::Tensor& in) = 0;
  // outs[r] <- rank r's `in`; each outs[r] contiguous and shaped like `in`.
  virtual PendingPtr all_gather(std::vector<at::Tensor>& outs, at::Tensor& in) = 0;
};

// The communicator an op on `device` uses, for the group of that registered name
// (ProcessGroup.group_name; `op` names the calling op in the error raised for an unknown name): a
// virtual group's rank (comm/virtual.h) for such a name; the local identity for a group of one (unless
// the group's NCCL options ask for the real path, see comm/nccl.h), tpext's cached NCCL communicator
// for CUDA tensors in a CUDA build, the c10d ProcessGroup otherwise.
std::unique_ptr<Communicator> make_communicator(const std::string& group_name, const char* op,
                                                const c10::Device& device);

}  // namespace tpext::comm
