// P2P backend: symmetric buffers of a process group on one node, and the registry that finds them by
// group name (the communicator of csrc/comm/communicator.h stays the generic path, and the fallback).
//
// Lifecycle (driven by tpext/p2p.py, collectively, on every rank of the group):
//   1. p2p_create(name, rank, world, capacity, device): this rank allocates its data buffer plus its
//      signal area (cudaMalloc, signals zeroed) and returns its CUDA IPC handle as 64 bytes.
//   2. Python exchanges the handles through the group itself (torch.distributed all_gather_object,
//      so no store of our own), and checks that all ranks are on one host.
//   3. p2p_open(name, handles, max_blocks, timeout_ns): maps every peer's buffer and registers the
//      buffers under the group name, with the launch grid cap and the wait budget all ranks agreed on
//      (min of every rank's p2p_max_blocks, max of the asked timeouts). Any failure leaves nothing
//      registered; Python then agrees with the other ranks and records the reason
//      (p2p_mark_unavailable), so all ranks fall back together.
// The registry owns the buffers (RAII: peers' mappings closed, own allocation freed on release). An
// entry is dropped by p2p_release(name), or on the first lookup after the process group it was made
// for is destroyed (the name then resolves to another group, or to none), or when the name is
// registered again. A dropped entry is not destroyed there: destruction synchronises the device and
// unmaps peer memory, which must not happen under the registry lock, inside an op, or inside a CUDA
// graph capture. It goes to a graveyard that p2p_release / p2p_drain (enable, release, teardown) empty
// outside the lock, when the current stream is not capturing. Entries left at exit are not released:
// the driver reclaims them with the process's CUDA context.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#ifdef TPEXT_WITH_CUDA
#include "kernels/p2p.h"
#endif

namespace tpext::comm {

#ifdef TPEXT_WITH_CUDA
// One rank's view of a group's symmetric buffers. Owns: its own allocation (data + signals), the
// mappings of the peers' allocations, a host-mapped abort word (p2p.h), and an event and a stream for
// ordering stream switches and storing refusals. Not copyable; shared by the registry and in-flight ops.
class SymmetricBuffers {
 public:
  SymmetricBuffers(int rank, int world, int64_t capacity, int device);
  ~SymmetricBuffers();
  SymmetricBuffers(const SymmetricBuffers&) = delete;
  SymmetricBuffers& operator=(const SymmetricBuffers&) = delete;

  std::string local_handle() const;  // cudaIpcMemHandle_t bytes of the own allocation
  // handles[p] from rank p (own one ignored); max_blocks (1..64) and timeout_ns (> 0) agreed by all ranks.
  void open_peers(const std::vector<std::string>& handles, int max_blocks, uint64_t timeout_ns);

  // The pointer table of every launch (the barrier epochs live in the signal areas, on the device).
  kernels::P2PGroup table() const;
  void* local_data() const { return data_[rank_]; }
  void* peer_data(int peer) const { return data_[peer]; }
  int64_t capacity() const { return capacity_; }
  int device() const { return device_; }
  int rank() const { return rank_; }
  int world() const { return world_; }

  // Held by an op from its last check through its launch, so this process's launches on the group
  // are one sequence. Throws, naming `op` and `group`, when the group's kernels were aborted (timeout
  // or a peer's refusal: the buffers are unusable until made anew) or the stream cannot be used.
  // Streams: eager launches must be ordered (a call on another stream could copy its input in while
  // peers still read the previous call's, and would race on the barrier epochs). The first eager
  // stream is pinned; an eager call on another stream is ordered after all work already queued on the
  // pinned one (event, no host sync) and becomes the pinned stream. A stream being captured into a CUDA
  // graph is never pinned: torch.cuda.graph synchronises the device on entry, and replays are ordered
  // with eager calls by the caller (replay on the stream of the eager calls, as torch does by default).
  std::unique_lock<std::mutex> begin_launch(cudaStream_t stream, const std::string& group, const char* op);
  // Throws as begin_launch does when the group's kernels were aborted (an explicit, cheap check: one
  // read of host memory, no synchronisation).
  void check_health(const std::string& group, const char* op);
  // '' while usable, else why not (the decoded abort).
  std::string aborted(const std::string& group);
  // For a rank-local refusal after this rank's peers may have launched `op`: stores a refusal code in
  // every rank's abort word, so their waiting blocks return now instead of at the timeout, and marks
  // the buffers unusable here. Best effort, never throws (the caller is about to throw).
  void refuse(kernels::P2POp op) noexcept;

 private:
  void check_health_locked(const std::string& group, const char* op);
  std::string describe_locked(const std::string& group);

  std::mutex mu_;  // guards stream_, stream_set_ and the launch sequence
  cudaStream_t stream_ = nullptr;
  bool stream_set_ = false;
  cudaEvent_t switch_event_ = nullptr;    // records the pinned stream's work at a stream switch
  cudaStream_t refuse_stream_ = nullptr;  // non-blocking: a refusal's stores never queue behind a kernel
  int rank_, world_, device_;
  int64_t capacity_;  // data bytes per rank; the signal area follows at an aligned offset
  int max_blocks_ = 0;
  uint64_t timeout_ns_ = 0;
  void* base_[kernels::kP2PMaxRanks] = {};  // allocation base of every rank, as mapped here
  void* data_[kernels::kP2PMaxRanks] = {};
  uint32_t* signals_[kernels::kP2PMaxRanks] = {};
  uint32_t* host_abort_ = nullptr;  // pinned, mapped: written by this rank's kernels, read here
  uint32_t* host_abort_dev_ = nullptr;
  bool opened_ = false;
};

// The registered buffers of `group_name`, or nullptr (then `reason` says why, for the fallback log).
std::shared_ptr<SymmetricBuffers> find_symmetric_buffers(const std::string& group_name, std::string* reason);
#endif

// Warns (Python UserWarning through TORCH_WARN) the first time a (group, reason) pair is seen in this
// process; later calls are silent. `op` names the calling op.
void warn_fallback_once(const std::string& group_name, const char* op, const std::string& reason);

// The registry's entry points, which tpext/p2p.py drives collectively through tpext._C.p2p_*
// (csrc/p2p_bindings.cpp binds them under those names). In a CPU build those that need CUDA raise,
// check does nothing, drain returns 0 and status says the build has no CUDA.
// p2p_create: allocates this rank's buffer for the group, returns its CUDA IPC handle (64 bytes).
std::string create_symmetric_buffers(const std::string& name, int rank, int world, int64_t capacity, int device);
// p2p_max_blocks: the largest device-synchronised P2P grid whose blocks are all resident at once.
int max_coresident_blocks(int device);
// p2p_open: maps every peer's buffer and registers the group's buffers (grid cap and wait budget agreed).
void open_symmetric_buffers(const std::string& name, const std::vector<std::string>& handles, int max_blocks,
                            uint64_t timeout_ns);
// p2p_check: raises if the group's P2P kernels were aborted (timeout, or a rank's refusal); no sync.
void check_symmetric_buffers(const std::string& name);
// p2p_drain: destroys dropped buffers (synchronises the device), not while the current stream captures;
// returns how many.
int drain_symmetric_buffers();
// p2p_copy_to_local / p2p_copy_from_peer: stream-ordered copies into this rank's buffer / out of a
// peer's (first dst.nbytes() bytes), for tests.
void copy_to_local(const std::string& name, const at::Tensor& src);
void copy_from_peer(const std::string& name, int peer, at::Tensor& dst);
// p2p_release: drops the group's buffers (or its unavailability record) and destroys dropped buffers.
void release_symmetric_buffers(const std::string& name);
// p2p_mark_unavailable: records why P2P cannot serve the group (the ops then fall back, saying so once).
void mark_unavailable(const std::string& name, const std::string& reason);
// p2p_status: '' when the group's buffers are ready, else why not.
std::string symmetric_buffers_status(const std::string& name);
// p2p_reset_warnings: forgets which fallback reasons were already logged (tests).
void reset_fallback_warnings();

}  // namespace tpext::comm
