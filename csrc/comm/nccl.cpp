// NcclComm (RAII over ncclComm_t), the Communicator over it, and the registry keyed by group name.
#ifdef TPEXT_WITH_CUDA

#include "comm/nccl.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <nccl.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include "common/cuda_streams.h"
#include "common/nccl_check.h"

// ncclConfig_t (blocking) and ncclCommFinalize exist since NCCL 2.14; its cgaClusterSize, minCTAs and
// maxCTAs since 2.17.
#define TPEXT_NCCL_HAS_CONFIG (NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0))
#define TPEXT_NCCL_HAS_CTA_CONFIG (NCCL_VERSION_CODE >= NCCL_VERSION(2, 17, 0))

namespace tpext::comm {
namespace {

ncclDataType_t nccl_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    default: break;
  }
  TORCH_CHECK(false, "tpext: the NCCL communicator reduces float32, float16, bfloat16 or float64 tensors, got ",
              t.scalar_type());
  return ncclFloat32;
}

// The unique id crosses the group once, at creation, through the group's own store (the rendezvous
// store every c10d group holds): rank 0 makes it and sets it, the others wait for the key. A collective
// would do too, but on a pure "nccl" group it would create a second NCCL communicator just to move 128
// bytes. `generation` counts this group's communicators in this process (every rank creates them in the
// same order, as creation is collective), so a re-made communicator never reads an earlier id.
ncclUniqueId exchange_unique_id(c10d::ProcessGroup& pg, int64_t generation) {
  const c10::intrusive_ptr<c10d::Store> store = pg.getStore();
  TORCH_CHECK(store, "tpext: group '", pg.getGroupName(),
              "' has no store to exchange the NCCL unique id "
              "through; create it with torch.distributed.new_group or init_process_group");
  const std::string key = "tpext/nccl_unique_id/" + std::to_string(generation);
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (pg.getRank() == 0) {
    TPEXT_NCCL_CHECK(ncclGetUniqueId(&id));
    const auto* bytes = reinterpret_cast<const uint8_t*>(&id);
    store->set(key, std::vector<uint8_t>(bytes, bytes + sizeof(id)));
  } else {
    const std::vector<uint8_t> got = store->get(key);  // waits up to the store's timeout
    TORCH_CHECK(got.size() == sizeof(id), "tpext: the NCCL unique id in the store of group '", pg.getGroupName(),
                "' has ", got.size(), " bytes, expected ", sizeof(id));
    std::memcpy(&id, got.data(), sizeof(id));
  }
  return id;
}

class NcclComm {
 public:
  NcclComm(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, c10::DeviceIndex device, const NcclOptions& options,
           int64_t generation)
      : pg_(pg),
        device_(device),
        rank_(pg->getRank()),
        size_(pg->getSize()),
        options_(options),
        stream_(cuda::comm_stream(device)) {
    const ncclUniqueId id = exchange_unique_id(*pg, generation);
    c10::cuda::CUDAGuard guard(device);
#if TPEXT_NCCL_HAS_CTA_CONFIG
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 1;
    if (options.max_ctas > 0) {
      config.minCTAs = 1;
      config.maxCTAs = static_cast<int>(options.max_ctas);
    }
    if (options.cga_cluster_size > 0) config.cgaClusterSize = static_cast<int>(options.cga_cluster_size);
    TPEXT_NCCL_CHECK(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config));
#else
    TORCH_CHECK(options.max_ctas == 0 && options.cga_cluster_size == 0,
                "tpext: max_ctas / cga_cluster_size need NCCL >= 2.17, this build has ", NCCL_VERSION_CODE);
    TPEXT_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
#endif
  }

  // Graceful (finalize, then destroy) unless abort() was called or NCCL reports an asynchronous error
  // (a peer failed, a network error): then ncclCommAbort, which never waits for peers. A destructor
  // cannot throw: failures are reported as warnings.
  ~NcclComm() {
    c10::cuda::CUDAGuard guard(device_);
    if (!abort_ && async_error() == ncclSuccess) {
#if TPEXT_NCCL_HAS_CONFIG
      // Finalize flushes the collectives still queued on the communication stream. With blocking
      // communicators it waits for every peer to finalize too: a peer that is gone makes it wait, which
      // is what abort_nccl_communicators is for (call it when a peer failed).
      const ncclResult_t fin = ncclCommFinalize(comm_);
      const ncclResult_t after = async_error();
      if (fin == ncclSuccess && after == ncclSuccess) {
        if (ncclCommDestroy(comm_) != ncclSuccess) TORCH_WARN("tpext: ncclCommDestroy failed");
        return;
      }
      TORCH_WARN("tpext: ncclCommFinalize of a ", size_, "-rank communicator returned ", ncclGetErrorString(fin),
                 ", asynchronous error ", ncclGetErrorString(after), " (", ncclGetLastError(comm_),
                 "); aborting it instead");
#else
      if (ncclCommDestroy(comm_) != ncclSuccess) TORCH_WARN("tpext: ncclCommDestroy failed");
      return;
#endif
    }
    const ncclResult_t res = ncclCommAbort(comm_);
    if (res != ncclSuccess) TORCH_WARN("tpext: ncclCommAbort returned ", ncclGetErrorString(res));
  }

  // The next destruction aborts instead of finalizing.
  void abort() { abort_ = true; }

  // ncclCommGetAsyncError's state (ncclSuccess, or the error a peer failure or the network left);
  // a failing query counts as an error.
  ncclResult_t async_error() const {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t res = ncclCommGetAsyncError(comm_, &state);
    return res != ncclSuccess ? res : state;
  }

  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  bool serves(const c10d::ProcessGroup* pg) const { return pg_.lock().get() == pg; }
  c10::DeviceIndex device() const { return device_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  const NcclOptions& options() const { return options_; }
  ncclComm_t get() const { return comm_; }
  const c10::cuda::CUDAStream& stream() const { return stream_; }

 private:
  c10::weak_intrusive_ptr<c10d::ProcessGroup> pg_;  // identity only: a re-made group reusing the name is a new comm
  c10::DeviceIndex device_;
  int rank_, size_;
  NcclOptions options_;
  c10::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> abort_{false};
};

class NcclPending final : public Pending {
 public:
  NcclPending(std::unique_ptr<c10::cuda::CUDAEvent> done, c10::DeviceIndex device)
      : done_(std::move(done)), device_(device) {}
  void wait() override {
    done_->block(c10::cuda::getCurrentCUDAStream(device_));
    waited_ = true;
  }
  // Dropped without wait() (a schedule unwinding after an error): the current stream, on which the
  // caller frees the collective's buffers, still waits for it, so the caching allocator does not hand
  // them out to new work while NCCL reads or writes them.
  ~NcclPending() override {
    if (waited_) return;
    try {
      wait();
    } catch (...) {  // NOLINT(bugprone-empty-catch): a destructor cannot report; the first error is propagating
    }
  }

 private:
  std::unique_ptr<c10::cuda::CUDAEvent> done_;
  c10::DeviceIndex device_;
  bool waited_ = false;
};

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<NcclComm> comm) : comm_(std::move(comm)) {}

  int rank() const override { return comm_->rank(); }
  int size() const override { return comm_->size(); }

  PendingPtr all_reduce(at::Tensor& buf) override {
    check(buf, "all_reduce buffer");
    return enqueue([&](cudaStream_t s) {
      TPEXT_NCCL_CHECK(
          ncclAllReduce(buf.data_ptr(), buf.data_ptr(), buf.numel(), nccl_dtype(buf), ncclSum, comm_->get(), s));
    });
  }

  PendingPtr reduce_scatter(at::Tensor& out, at::Tensor& in) override {
    check(out, "reduce_scatter output");
    check(in, "reduce_scatter input");
    TORCH_CHECK(in.numel() == out.numel() * size(), "tpext: reduce_scatter input has ", in.numel(),
                " elements, expected ", size(), " x ", out.numel());
    return enqueue([&](cudaStream_t s) {
      TPEXT_NCCL_CHECK(
          ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), nccl_dtype(out), ncclSum, comm_->get(), s));
    });
  }

  // Outputs that tile one buffer in rank order (the sequential schedule) take one ncclAllGather
  // straight into it. Outputs spread at a fixed stride over one buffer (the chunked all_gather_gemm:
  // rows [b, b+h) of every rank's block of x_full) take one ncclAllGather into a [R, numel] staging
  // buffer and one strided copy out of it, on the communication stream: two launches per chunk where
  // a broadcast per source rank made R NCCL operations. Any other outputs get a copy each.
  PendingPtr all_gather(std::vector<at::Tensor>& outs, at::Tensor& in) override {
    check(in, "all_gather input");
    TORCH_CHECK(static_cast<int>(outs.size()) == size(), "tpext: all_gather needs ", size(), " outputs, got ",
                outs.size());
    for (int r = 0; r < size(); ++r) {
      check(outs[r], "all_gather output");
      TORCH_CHECK(outs[r].numel() == in.numel() && outs[r].scalar_type() == in.scalar_type(),
                  "tpext: all_gather output ", r, " has ", outs[r].numel(), " ", outs[r].scalar_type(),
                  " elements, the input ", in.numel(), " ", in.scalar_type());
    }
    const int64_t stride = block_stride(outs);  // elements from one output to the next; 0: none
    return enqueue([&](cudaStream_t s) {
      const ncclDataType_t dt = nccl_dtype(in);
      if (stride == in.numel()) {
        TPEXT_NCCL_CHECK(ncclAllGather(in.data_ptr(), outs[0].data_ptr(), in.numel(), dt, comm_->get(), s));
        return;
      }
      // Allocated and read while the communication stream is current: the caching allocator hands the
      // block out again only to work queued on that stream after the copy.
      c10::cuda::CUDAStreamGuard on_comm(comm_->stream());
      at::Tensor staging = at::empty({size(), in.numel()}, in.options());
      TPEXT_NCCL_CHECK(ncclAllGather(in.data_ptr(), staging.data_ptr(), in.numel(), dt, comm_->get(), s));
      if (stride > 0) {
        outs[0].as_strided({size(), in.numel()}, {stride, 1}).copy_(staging);
      } else {
        for (int r = 0; r < size(); ++r) outs[r].view(-1).copy_(staging[r]);
      }
    });
  }

 private:
  void check(const at::Tensor& t, const char* what) const {
    TORCH_CHECK(t.is_cuda() && t.get_device() == comm_->device(), "tpext: NCCL ", what,
                " must be on cuda:", static_cast<int>(comm_->device()), " (the group's communicator device), got ",
                t.device());
    TORCH_CHECK(t.is_contiguous(), "tpext: NCCL ", what, " must be contiguous, got strides ", t.strides());
  }

  // The distance in elements from each output to the next when they lie in one storage at one fixed
  // stride, without overlapping (outs[r] = outs[0] + r * stride); 0 otherwise.
  static int64_t block_stride(const std::vector<at::Tensor>& outs) {
    const int64_t numel = outs[0].numel();
    if (outs.size() == 1) return numel;
    if (!outs[1].storage().is_alias_of(outs[0].storage())) return 0;
    const int64_t stride = outs[1].storage_offset() - outs[0].storage_offset();
    if (stride < numel) return 0;
    for (size_t r = 2; r < outs.size(); ++r) {
      if (!outs[r].storage().is_alias_of(outs[0].storage()) ||
          outs[r].storage_offset() != outs[0].storage_offset() + static_cast<int64_t>(r) * stride) {
        return 0;
      }
    }
    return stride;
  }

  // ready (caller's stream) -> comm stream -> launch -> done (returned).
  template <typename Launch>
  PendingPtr enqueue(Launch&& launch) {
    const c10::DeviceIndex dev = comm_->device();
    c10::cuda::CUDAEvent ready;
    ready.record(c10::cuda::getCurrentCUDAStream(dev));
    ready.block(comm_->stream());
    launch(comm_->stream().stream());
    auto done = std::make_unique<c10::cuda::CUDAEvent>();
    done->record(comm_->stream());
    return std::make_unique<NcclPending>(std::move(done), dev);
  }

  std::shared_ptr<NcclComm> comm_;
};

// One entry per group name, never erased. `create` serialises the creation of that group's
// communicator only: creation is a collective that waits for the group's other ranks, and while one
// thread waits in it, ops on other groups (whose ranks may reach their own creation in another order)
// must not be held up, or two threads of one process could deadlock across processes.
struct Entry {
  std::mutex create;               // taken before Registry::mu, never while holding it
  int64_t generation = 0;          // guarded by `create`: communicators made for this name so far
  NcclOptions options;             // guarded by Registry::mu
  std::shared_ptr<NcclComm> comm;  // guarded by Registry::mu; null until the group's first op
};

// Never destroyed implicitly (see destroy_nccl_communicators).
struct Registry {
  std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<Entry>> entries;
};

Registry& registry() {
  static auto* r = new Registry();
  return *r;
}

std::shared_ptr<Entry> entry(const std::string& group_name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::shared_ptr<Entry>& e = r.entries[group_name];
  if (!e) e = std::make_shared<Entry>();
  return e;
}

bool same(const NcclOptions& a, const NcclOptions& b) {
  return a.max_ctas == b.max_ctas && a.cga_cluster_size == b.cga_cluster_size && a.local_fast_path == b.local_fast_path;
}

}  // namespace

void set_nccl_options(const std::string& group_name, const NcclOptions& options) {
  // NCCL runs at most MAXCHANNELS (64) CTAs per collective; a larger cap would only look like a setting.
  TORCH_CHECK(options.max_ctas >= 0 && options.max_ctas <= 64,
              "tpext: max_ctas must be in [0, 64] (0 = NCCL's "
              "default; NCCL runs at most 64 CTAs per collective), got ",
              options.max_ctas);
  TORCH_CHECK(options.cga_cluster_size >= 0 && options.cga_cluster_size <= 8,
              "tpext: cga_cluster_size must be in "
              "[0, 8] (0 = NCCL's default), got ",
              options.cga_cluster_size);
  const std::shared_ptr<Entry> e = entry(group_name);
  std::lock_guard<std::mutex> creating(e->create);  // a creation in flight finishes with the old options first
  std::shared_ptr<NcclComm> dropped;                // destroyed outside Registry::mu
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (same(e->options, options)) return;
  e->options = options;
  dropped = std::move(e->comm);
}

NcclOptions nccl_options(const std::string& group_name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.entries.find(group_name);
  return it == r.entries.end() ? NcclOptions{} : it->second->options;
}

std::unique_ptr<Communicator> make_nccl_communicator(const std::string& group_name,
                                                     const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                                     c10::DeviceIndex device) {
  const std::shared_ptr<Entry> e = entry(group_name);
  std::lock_guard<std::mutex> creating(e->create);
  Registry& r = registry();
  std::shared_ptr<NcclComm> comm;
  NcclOptions options;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    comm = e->comm;
    options = e->options;
  }
  if (!comm || !comm->serves(pg.get())) {
    // A group re-made under the same name gets a new communicator; the stale one is destroyed when
    // `comm` is reassigned here, after the new one exists, outside Registry::mu.
    auto made = std::make_shared<NcclComm>(pg, device, options, e->generation++);
    {
      std::lock_guard<std::mutex> lock(r.mu);
      e->comm = made;
    }
    comm = std::move(made);
  }
  TORCH_CHECK(comm->device() == device, "tpext: group '", group_name,
              "' has its NCCL communicator on cuda:", static_cast<int>(comm->device()),
              " but this op's tensors are on cuda:", static_cast<int>(device),
              "; use one device per group and process");
  return std::make_unique<NcclCommunicator>(std::move(comm));
}

NcclCommInfo nccl_comm_info(const std::string& group_name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  NcclCommInfo info;
  auto it = r.entries.find(group_name);
  if (it == r.entries.end() || !it->second->comm) return info;
  const NcclComm& comm = *it->second->comm;
  info.created = true;
  info.rank = comm.rank();
  info.size = comm.size();
  info.device = comm.device();
  info.options = comm.options();
  return info;
}

int nccl_runtime_version() {
  int v = 0;
  TPEXT_NCCL_CHECK(ncclGetVersion(&v));
  return v;
}

namespace {
// Moves every cached communicator out of the registry (the next op on a group creates a new one).
std::vector<std::shared_ptr<NcclComm>> take_communicators() {
  std::vector<std::shared_ptr<NcclComm>> comms;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (auto& kv : r.entries) {
    if (kv.second->comm) comms.push_back(std::move(kv.second->comm));
  }
  return comms;
}
}  // namespace

void destroy_nccl_communicators() {
  // Destroyed here, outside the lock (an op still holding one destroys it when it finishes).
  take_communicators().clear();
}

void abort_nccl_communicators() {
  std::vector<std::shared_ptr<NcclComm>> comms = take_communicators();
  for (auto& c : comms) c->abort();
  comms.clear();
}

}  // namespace tpext::comm

#endif  // TPEXT_WITH_CUDA
