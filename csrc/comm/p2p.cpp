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
#include <torch/extension.h>

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
#endif
  std::set<std::string> warned;
};

// Leaked on purpose: its buffers hold CUDA IPC mappings, which must not be released during static
// destruction, after the CUDA runtime may be gone (the driver reclaims them with the context).
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

void register_entry(const std::string& name, Entry e) {
  e.group = c10::weak_intrusive_ptr<c10d::ProcessGroup>(try_resolve(name));
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.entries.erase(name);
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
constexpr int64_t kAlign = 256;

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

int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }
}  // namespace

SymmetricBuffers::SymmetricBuffers(int rank, int world, int64_t capacity, int device)
    : rank_(rank), world_(world), device_(device), capacity_(capacity) {
  TORCH_CHECK(world >= 1 && world <= kernels::kP2PMaxRanks, "tpext.p2p: world must be in [1, 8], got ", world);
  TORCH_CHECK(rank >= 0 && rank < world, "tpext.p2p: rank must be in [0, ", world, "), got ", rank);
  TORCH_CHECK(capacity > 0, "tpext.p2p: capacity_bytes must be > 0, got ", capacity);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const int64_t signal_offset = round_up(capacity, kAlign);
  TPEXT_CUDA_CHECK(cudaMalloc(&base_[rank], static_cast<size_t>(signal_offset) + kernels::kP2PSignalBytes));
  data_[rank] = base_[rank];
  signals_[rank] = reinterpret_cast<uint32_t*>(static_cast<char*>(base_[rank]) + signal_offset);
  // Flags and epoch counters start at zero, before the handle leaves this process: peers write flags
  // only after the exchange.
  try {
    TPEXT_CUDA_CHECK(cudaMemset(signals_[rank], 0, kernels::kP2PSignalBytes));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    cudaFree(base_[rank]);  // the destructor does not run for a constructor that throws
    throw;
  }
}

SymmetricBuffers::~SymmetricBuffers() {
  // No throwing here: a failure at teardown (e.g. after the CUDA context is gone at exit) is ignored.
  const int prev = [] { int d = 0; return cudaGetDevice(&d) == cudaSuccess ? d : -1; }();
  cudaSetDevice(device_);
  // Kernels of this device may still read peers' buffers: unmapping them under a running kernel faults.
  cudaDeviceSynchronize();
  for (int p = 0; p < world_; ++p) {
    if (p != rank_ && base_[p] != nullptr) cudaIpcCloseMemHandle(base_[p]);
  }
  if (base_[rank_] != nullptr) cudaFree(base_[rank_]);
  if (prev >= 0) cudaSetDevice(prev);
}

void SymmetricBuffers::check_stream(cudaStream_t stream, const char* op) {
  if (!stream_set_) {
    stream_ = stream;
    stream_set_ = true;
  }
  if (stream != stream_) {
    // A CUDA-graph capture runs on its own stream; torch.cuda.graph synchronises the device on entry, so
    // no eager call is in flight beside it. The stream stays pinned for eager calls, and replays must
    // be ordered with them by the caller (replay on the pinned stream, as torch does by default).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TPEXT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture == cudaStreamCaptureStatusActive) return;
  }
  TORCH_CHECK(stream == stream_, "tpext.", op, ": the P2P buffers of this group are used on one CUDA stream, ",
              "the one of their first call; this call is on another. Run the group's P2P ops on one stream, ",
              "or release and enable the group again");
}

std::string SymmetricBuffers::local_handle() const {
  cudaIpcMemHandle_t h;
  TPEXT_CUDA_CHECK(cudaIpcGetMemHandle(&h, base_[rank_]));
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void SymmetricBuffers::open_peers(const std::vector<std::string>& handles) {
  TORCH_CHECK(!opened_, "tpext.p2p: the peers of these buffers are already open");
  TORCH_CHECK(static_cast<int>(handles.size()) == world_, "tpext.p2p: expected ", world_, " IPC handles (one per rank), got ",
              handles.size());
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const int64_t signal_offset = round_up(capacity_, kAlign);
  for (int p = 0; p < world_; ++p) {
    if (p == rank_) continue;
    TORCH_CHECK(handles[p].size() == sizeof(cudaIpcMemHandle_t), "tpext.p2p: IPC handle of rank ", p, " has ",
                handles[p].size(), " bytes, expected ", sizeof(cudaIpcMemHandle_t));
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles[p].data(), sizeof(h));
    const cudaError_t err = cudaIpcOpenMemHandle(&base_[p], h, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      base_[p] = nullptr;
      cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
      TORCH_CHECK(false, "tpext.p2p: rank ", rank_, " cannot map the buffer of rank ", p, " (cudaIpcOpenMemHandle: ",
                  cudaGetErrorName(err), ": ", cudaGetErrorString(err), "); the GPUs cannot access each other");
    }
    data_[p] = base_[p];
    signals_[p] = reinterpret_cast<uint32_t*>(static_cast<char*>(base_[p]) + signal_offset);
  }
  opened_ = true;
}

kernels::P2PGroup SymmetricBuffers::table() const {
  kernels::P2PGroup g{};
  for (int p = 0; p < world_; ++p) {
    g.buffers[p] = data_[p];
    g.signals[p] = signals_[p];
  }
  g.world = world_;
  g.rank = rank_;
  return g;
}

std::shared_ptr<SymmetricBuffers> find_symmetric_buffers(const std::string& group_name, std::string* reason) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.entries.find(group_name);
  if (it == r.entries.end()) {
    *reason = no_entry_reason(group_name);
    return nullptr;
  }
  if (stale(it->second, group_name)) {
    r.entries.erase(it);  // releases the buffers of the destroyed group
    *reason = "the process group the buffers were made for was destroyed; " + no_entry_reason(group_name);
    return nullptr;
  }
  if (!it->second.buffers) *reason = it->second.unavailable;
  return it->second.buffers;
}
#endif

void bind_p2p(pybind11::module_& m) {
  namespace py = pybind11;
#ifdef TPEXT_WITH_CUDA
  m.def("p2p_create", [](const std::string& name, int rank, int world, int64_t capacity, int device) {
    auto buf = std::make_shared<SymmetricBuffers>(rank, world, capacity, device);
    std::string handle = buf->local_handle();
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.pending[name] = std::move(buf);
    return py::bytes(handle);
  }, "Allocate this rank's symmetric buffer for group `name`; returns its CUDA IPC handle (bytes).");
  m.def("p2p_open", [](const std::string& name, const std::vector<std::string>& handles) {
    std::shared_ptr<SymmetricBuffers> buf;
    {
      auto& r = registry();
      std::lock_guard<std::mutex> lock(r.mu);
      auto it = r.pending.find(name);
      TORCH_CHECK(it != r.pending.end(), "tpext.p2p_open: no buffers were created for group '", name, "'");
      buf = std::move(it->second);
      r.pending.erase(it);
    }
    buf->open_peers(handles);  // throws: buf (and any peer mapping) is released here
    Entry e;
    e.buffers = std::move(buf);
    register_entry(name, std::move(e));
  }, "Map every peer's buffer and register the group's symmetric buffers.");
  m.def("p2p_copy_to_local", [](const std::string& name, const at::Tensor& src) {
    std::string reason;
    auto buf = find_symmetric_buffers(name, &reason);
    TORCH_CHECK(buf, "tpext.p2p_copy_to_local: ", reason);
    TORCH_CHECK(src.is_cuda() && src.is_contiguous() && src.nbytes() <= static_cast<size_t>(buf->capacity()),
                "tpext.p2p_copy_to_local: src must be a contiguous CUDA tensor of at most ", buf->capacity(), " bytes");
    auto stream = c10::cuda::getCurrentCUDAStream(src.get_device());
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(buf->local_data(), src.data_ptr(), src.nbytes(), cudaMemcpyDeviceToDevice, stream));
  }, "Copy a tensor's bytes into this rank's symmetric buffer (stream-ordered).");
  m.def("p2p_copy_from_peer", [](const std::string& name, int peer, at::Tensor& dst) {
    std::string reason;
    auto buf = find_symmetric_buffers(name, &reason);
    TORCH_CHECK(buf, "tpext.p2p_copy_from_peer: ", reason);
    TORCH_CHECK(peer >= 0 && peer < buf->world(), "tpext.p2p_copy_from_peer: peer must be in [0, ", buf->world(), "), got ", peer);
    TORCH_CHECK(dst.is_cuda() && dst.is_contiguous() && dst.nbytes() <= static_cast<size_t>(buf->capacity()),
                "tpext.p2p_copy_from_peer: dst must be a contiguous CUDA tensor of at most ", buf->capacity(), " bytes");
    auto stream = c10::cuda::getCurrentCUDAStream(dst.get_device());
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), buf->peer_data(peer), dst.nbytes(), cudaMemcpyDeviceToDevice, stream));
  }, "Copy the first dst.nbytes() bytes of a peer's symmetric buffer into dst (stream-ordered).");
#else
  auto no_cuda = [](py::args, py::kwargs) {
    TORCH_CHECK(false, "tpext was built without CUDA: symmetric buffers need a CUDA build of tpext");
  };
  for (const char* fn : {"p2p_create", "p2p_open", "p2p_copy_to_local", "p2p_copy_from_peer"}) m.def(fn, no_cuda);
#endif
  m.def("p2p_release", [](const std::string& name) {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
#ifdef TPEXT_WITH_CUDA
    r.pending.erase(name);
#endif
    r.entries.erase(name);
  }, "Drop the group's symmetric buffers (or its unavailability record).");
  m.def("p2p_mark_unavailable", [](const std::string& name, const std::string& reason) {
    Entry e;
    e.unavailable = reason;
    register_entry(name, std::move(e));
  }, "Record why P2P cannot serve group `name` (the ops then fall back and say so once).");
  m.def("p2p_status", [](const std::string& name) -> std::string {
#ifdef TPEXT_WITH_CUDA
    std::string reason;
    return find_symmetric_buffers(name, &reason) ? std::string() : reason;
#else
    (void)name;
    return "tpext was built without CUDA";
#endif
  }, "'' when the group's symmetric buffers are ready, else why not.");
  m.def("p2p_reset_warnings", [] {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.warned.clear();
  }, "Forget which fallback reasons were already logged (tests).");
}

}  // namespace tpext::comm
