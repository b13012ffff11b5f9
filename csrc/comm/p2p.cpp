// Symmetric buffers over CUDA IPC, their registry by group name, and the fallback log (see p2p.h).
#include "comm/p2p.h"

#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <ATen/core/Tensor.h>

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "common/cuda_check.h"
#endif

namespace tpext::comm {
namespace {

// The process group a registry entry was made for; null when it could not be resolved at the time.
c10::intrusive_ptr<c10d::ProcessGroup> try_resolve(const std::string& name) {
  try {
    return c10d::resolve_process_group(name);
  } catch (const std::exception&) {
    return {};
  }
}

struct Entry {
#ifdef TPEXT_WITH_CUDA
  std::shared_ptr<SymmetricBuffers> buffers;  // null when `unavailable` is set
#endif
  c10::weak_intrusive_ptr<c10d::ProcessGroup> group{c10::intrusive_ptr<c10d::ProcessGroup>()};
  std::string unavailable;  // why P2P cannot serve this group (agreed by all its ranks)
};

struct Registry {
  std::mutex mu;
  std::map<std::string, Entry> entries;
#ifdef TPEXT_WITH_CUDA
  std::map<std::string, std::shared_ptr<SymmetricBuffers>> pending;  // created, handles not yet exchanged
  // Dropped buffers not yet destroyed (p2p.h: destroyed by drain_graveyard, outside the lock).
  std::vector<std::shared_ptr<SymmetricBuffers>> graveyard;
#endif
  std::set<std::string> warned;
};

// Leaked on purpose: its buffers hold CUDA IPC mappings, which must not be released during static
// destruction, after the CUDA runtime may be gone (the driver reclaims them with the context).
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

// Moves the entry of `name`, if any, out of the map; its buffers go to the graveyard (buffers being
// created for the name, in `pending`, are not touched). Caller holds the lock.
void drop_locked(Registry& r, const std::string& name) {
  auto it = r.entries.find(name);
  if (it == r.entries.end()) return;
#ifdef TPEXT_WITH_CUDA
  if (it->second.buffers) r.graveyard.push_back(std::move(it->second.buffers));
#endif
  r.entries.erase(it);
}

void register_entry(const std::string& name, Entry e) {
  e.group = c10::weak_intrusive_ptr<c10d::ProcessGroup>(try_resolve(name));
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  drop_locked(r, name);
  r.entries.emplace(name, std::move(e));
}

}  // namespace

void warn_fallback_once(const std::string& group_name, const char* op, const std::string& reason) {
  auto& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (!r.warned.insert(group_name + "\n" + reason).second) return;
  }
  TORCH_WARN("tpext.", op, ": P2P kernels not used for group '", group_name, "': ", reason,
             " (this is said once per group and reason)");
}

#ifdef TPEXT_WITH_CUDA
namespace {

// An entry outlives its group when the group is destroyed (or its name is reused by a new group):
// then it must not serve the name any more. Caller holds the lock.
bool stale(const Entry& e, const std::string& name) {
  auto current = try_resolve(name);
  auto made_for = e.group.lock();
  return !current || !made_for || current.get() != made_for.get();
}

std::string no_entry_reason(const std::string& name) {
  return "no symmetric buffers are registered for group '" + name +
         "' (call tpext.p2p.enable(group) on every rank first)";
}

// Destroys the graveyard's buffers (device synchronisation, IPC unmapping) outside the registry lock,
// unless the current stream is being captured (then they wait for the next safe point). Returns how
// many were destroyed.
int drain_graveyard() {
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.graveyard.empty()) return 0;  // no CUDA call: safe in a process without a device
  }
  int device = 0;
  TPEXT_CUDA_CHECK(cudaGetDevice(&device));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TPEXT_CUDA_CHECK(
      cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)), &capture));
  if (capture != cudaStreamCaptureStatusNone) return 0;
  std::vector<std::shared_ptr<SymmetricBuffers>> dead;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    dead.swap(r.graveyard);
  }
  const int n = static_cast<int>(dead.size());
  dead.clear();  // an op still holding one destroys it when it finishes
  return n;
}
}  // namespace

std::shared_ptr<SymmetricBuffers> find_symmetric_buffers(const std::string& group_name, std::string* reason) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.entries.find(group_name);
  if (it == r.entries.end()) {
    *reason = no_entry_reason(group_name);
    return nullptr;
  }
  if (stale(it->second, group_name)) {
    drop_locked(r, group_name);  // destroyed at the next safe point (drain_graveyard), not here
    *reason = "the process group the buffers were made for was destroyed; " + no_entry_reason(group_name);
    return nullptr;
  }
  if (!it->second.buffers) *reason = it->second.unavailable;
  return it->second.buffers;
}
#endif

#ifdef TPEXT_WITH_CUDA
std::string create_symmetric_buffers(const std::string& name, int rank, int world, int64_t capacity, int device) {
  auto buf = std::make_shared<SymmetricBuffers>(rank, world, capacity, device);
  std::string handle = buf->local_handle();
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto& slot = r.pending[name];
  if (slot) r.graveyard.push_back(std::move(slot));  // an earlier enable that never opened
  slot = std::move(buf);
  return handle;
}

int max_coresident_blocks(int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return kernels::p2p_max_coresident_blocks(device);
}

void open_symmetric_buffers(const std::string& name, const std::vector<std::string>& handles, int max_blocks,
                            uint64_t timeout_ns) {
  std::shared_ptr<SymmetricBuffers> buf;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.pending.find(name);
    TORCH_CHECK(it != r.pending.end(), "tpext.p2p_open: no buffers were created for group '", name, "'");
    buf = std::move(it->second);
    r.pending.erase(it);
  }
  buf->open_peers(handles, max_blocks, timeout_ns);  // throws: buf (and any peer mapping) is released here
  Entry e;
  e.buffers = std::move(buf);
  register_entry(name, std::move(e));
}

void check_symmetric_buffers(const std::string& name) {
  std::string reason;
  if (auto buf = find_symmetric_buffers(name, &reason)) buf->check_health(name, "p2p.check");
}

int drain_symmetric_buffers() { return drain_graveyard(); }

void copy_to_local(const std::string& name, const at::Tensor& src) {
  std::string reason;
  auto buf = find_symmetric_buffers(name, &reason);
  TORCH_CHECK(buf, "tpext.p2p_copy_to_local: ", reason);
  TORCH_CHECK(src.is_cuda() && src.is_contiguous() && src.nbytes() <= static_cast<size_t>(buf->capacity()),
              "tpext.p2p_copy_to_local: src must be a contiguous CUDA tensor of at most ", buf->capacity(), " bytes");
  auto stream = c10::cuda::getCurrentCUDAStream(src.get_device());
  TPEXT_CUDA_CHECK(cudaMemcpyAsync(buf->local_data(), src.data_ptr(), src.nbytes(), cudaMemcpyDeviceToDevice, stream));
}

void copy_from_peer(const std::string& name, int peer, at::Tensor& dst) {
  std::string reason;
  auto buf = find_symmetric_buffers(name, &reason);
  TORCH_CHECK(buf, "tpext.p2p_copy_from_peer: ", reason);
  TORCH_CHECK(peer >= 0 && peer < buf->world(), "tpext.p2p_copy_from_peer: peer must be in [0, ", buf->world(),
              "), got ", peer);
  TORCH_CHECK(dst.is_cuda() && dst.is_contiguous() && dst.nbytes() <= static_cast<size_t>(buf->capacity()),
              "tpext.p2p_copy_from_peer: dst must be a contiguous CUDA tensor of at most ", buf->capacity(), " bytes");
  auto stream = c10::cuda::getCurrentCUDAStream(dst.get_device());
  TPEXT_CUDA_CHECK(
      cudaMemcpyAsync(dst.data_ptr(), buf->peer_data(peer), dst.nbytes(), cudaMemcpyDeviceToDevice, stream));
}
#else
namespace {
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "tpext was built without CUDA: symmetric buffers need a CUDA build of tpext");
}
}  // namespace

std::string create_symmetric_buffers(const std::string&, int, int, int64_t, int) { no_cuda(); }
int max_coresident_blocks(int) { no_cuda(); }
void open_symmetric_buffers(const std::string&, const std::vector<std::string>&, int, uint64_t) { no_cuda(); }
void check_symmetric_buffers(const std::string&) {}
int drain_symmetric_buffers() { return 0; }
void copy_to_local(const std::string&, const at::Tensor&) { no_cuda(); }
void copy_from_peer(const std::string&, int, at::Tensor&) { no_cuda(); }
#endif

void release_symmetric_buffers(const std::string& name) {
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    drop_locked(r, name);
#ifdef TPEXT_WITH_CUDA
    auto pending = r.pending.find(name);
    if (pending != r.pending.end()) {
      r.graveyard.push_back(std::move(pending->second));
      r.pending.erase(pending);
    }
#endif
  }
#ifdef TPEXT_WITH_CUDA
  drain_graveyard();
#endif
}

void mark_unavailable(const std::string& name, const std::string& reason) {
  Entry e;
  e.unavailable = reason;
  register_entry(name, std::move(e));
}

std::string symmetric_buffers_status(const std::string& name) {
#ifdef TPEXT_WITH_CUDA
  std::string reason;
  auto buf = find_symmetric_buffers(name, &reason);
  return buf ? buf->aborted(name) : reason;
#else
  (void)name;
  return "tpext was built without CUDA";
#endif
}

void reset_fallback_warnings() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.warned.clear();
}

}  // namespace tpext::comm
