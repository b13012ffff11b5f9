// P2P backend: symmetric buffers of a process group on one node, and the registry that finds them by
// group name (the communicator of csrc/comm/communicator.h stays the generic path, and the fallback).
//
// Lifecycle (driven by tpext/p2p.py, collectively, on every rank of the group):
//   1. p2p_create(name, rank, world, capacity, device): this rank allocates its data buffer plus its
//      signal area (cudaMalloc, signals zeroed) and returns its CUDA IPC handle as 64 bytes.
//   2. Python exchanges the handles through the group itself (torch.distributed all_gather_object,
//      so no store of our own), and checks that all ranks are on one host.
//   3. p2p_open(name, handles): maps every peer's buffer (cudaIpcOpenMemHandle) and registers the
//      buffers under the group name. Any failure leaves nothing registered; Python then agrees with
//      the other ranks and records the reason (p2p_mark_unavailable), so all ranks fall back together.
// The registry owns the buffers (RAII: peers' mappings closed, own allocation freed on release). An
// entry is dropped, and so released, by p2p_release(name), or on the first lookup after the process
// group it was made for is destroyed (the name then resolves to another group, or to none). Entries
// left at exit are not released: the driver reclaims them with the process's CUDA context.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

#ifdef TPEXT_WITH_CUDA
#include "kernels/p2p.h"
#endif

namespace tpext::comm {

#ifdef TPEXT_WITH_CUDA
// One rank's view of a group's symmetric buffers. Owns: its own allocation (data + signals) and the
// mappings of the peers' allocations. Not copyable; shared by the registry and in-flight ops.
class SymmetricBuffers {
 public:
  SymmetricBuffers(int rank, int world, int64_t capacity, int device);
  ~SymmetricBuffers();
  SymmetricBuffers(const SymmetricBuffers&) = delete;
  SymmetricBuffers& operator=(const SymmetricBuffers&) = delete;

  std::string local_handle() const;                     // cudaIpcMemHandle_t bytes of the own allocation
  void open_peers(const std::vector<std::string>& handles);  // handles[p] from rank p (own one ignored)

  // The pointer table of every launch (the barrier epochs live in the signal areas, on the device).
  kernels::P2PGroup table() const;
  void* local_data() const { return data_[rank_]; }
  void* peer_data(int peer) const { return data_[peer]; }
  int64_t capacity() const { return capacity_; }
  int device() const { return device_; }
  int rank() const { return rank_; }
  int world() const { return world_; }

  // Every launch on this group's buffers must use one stream: a call on another stream could copy its
  // input in while peers still read the previous call's, and would share its barrier epochs. Checked
  // per call (the first call picks the stream).
  void check_stream(cudaStream_t stream, const char* op);

 private:
  cudaStream_t stream_ = nullptr;
  bool stream_set_ = false;
  int rank_, world_, device_;
  int64_t capacity_;  // data bytes per rank; the signal area follows at an aligned offset
  void* base_[kernels::kP2PMaxRanks] = {};  // allocation base of every rank, as mapped here
  void* data_[kernels::kP2PMaxRanks] = {};
  uint32_t* signals_[kernels::kP2PMaxRanks] = {};
  bool opened_ = false;
};

// The registered buffers of `group_name`, or nullptr (then `reason` says why, for the fallback log).
std::shared_ptr<SymmetricBuffers> find_symmetric_buffers(const std::string& group_name, std::string* reason);
#endif

// Warns (Python UserWarning through TORCH_WARN) the first time a (group, reason) pair is seen in this
// process; later calls are silent. `op` names the calling op.
void warn_fallback_once(const std::string& group_name, const char* op, const std::string& reason);

// Python-side entry points (tpext._C.p2p_*), registered by csrc/torch_bindings.cpp.
void bind_p2p(pybind11::module_& m);

}  // namespace tpext::comm
