// SymmetricBuffers (comm/p2p.h): one rank's allocation and its peers' mappings over CUDA IPC, the
// stream discipline of their launches, and the abort word that bounds every wait (kernels/p2p.h).
#ifdef TPEXT_WITH_CUDA

#include "comm/p2p.h"

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "common/cuda_check.h"

namespace tpext::comm {
namespace {

constexpr int64_t kAlign = 256;

int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

const char* op_name(kernels::P2POp op) {
  switch (op) {
    case kernels::P2POp::kAllReduceOneShot: return "p2p_all_reduce (one-shot)";
    case kernels::P2POp::kAllReduceTwoShot: return "p2p_all_reduce (two-shot)";
    case kernels::P2POp::kReduceScatter: return "p2p_reduce_scatter";
    case kernels::P2POp::kAllGather: return "p2p_all_gather";
    case kernels::P2POp::kResidualRMSNorm: return "p2p_all_reduce_residual_rmsnorm";
  }
  return "an unknown P2P op";
}

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
  // Flags, epoch counters and the abort word start at zero, before the handle leaves this process:
  // peers write flags only after the exchange. The destructor does not run for a constructor that
  // throws, so a failure here frees what was made so far.
  try {
    TPEXT_CUDA_CHECK(cudaMemset(signals_[rank], 0, kernels::kP2PSignalBytes));
    TPEXT_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_abort_), sizeof(uint32_t),
                                   cudaHostAllocMapped | cudaHostAllocPortable));
    *host_abort_ = 0;
    TPEXT_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_abort_dev_), host_abort_, 0));
    TPEXT_CUDA_CHECK(cudaEventCreateWithFlags(&switch_event_, cudaEventDisableTiming));
    TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&refuse_stream_, cudaStreamNonBlocking));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    if (refuse_stream_ != nullptr) cudaStreamDestroy(refuse_stream_);
    if (switch_event_ != nullptr) cudaEventDestroy(switch_event_);
    if (host_abort_ != nullptr) cudaFreeHost(host_abort_);
    cudaFree(base_[rank]);
    throw;
  }
}

SymmetricBuffers::~SymmetricBuffers() {
  // No throwing here: a failure at teardown (e.g. after the CUDA context is gone at exit) is ignored.
  const int prev = [] {
    int d = 0;
    return cudaGetDevice(&d) == cudaSuccess ? d : -1;
  }();
  cudaSetDevice(device_);
  // Kernels of this device may still read peers' buffers: unmapping them under a running kernel faults.
  // Bounded: every wait of those kernels is (timeout_ns_).
  cudaDeviceSynchronize();
  for (int p = 0; p < world_; ++p) {
    if (p != rank_ && base_[p] != nullptr) cudaIpcCloseMemHandle(base_[p]);
  }
  if (base_[rank_] != nullptr) cudaFree(base_[rank_]);
  if (host_abort_ != nullptr) cudaFreeHost(host_abort_);
  if (switch_event_ != nullptr) cudaEventDestroy(switch_event_);
  if (refuse_stream_ != nullptr) cudaStreamDestroy(refuse_stream_);
  if (prev >= 0) cudaSetDevice(prev);
}

std::string SymmetricBuffers::describe_locked(const std::string& group) {
  const uint32_t code = __atomic_load_n(host_abort_, __ATOMIC_ACQUIRE);
  if (code == 0) return "";
  namespace ab = kernels::p2p_abort;
  std::ostringstream msg;
  msg << "the P2P kernels of group '" << group << "' were aborted (seen on rank " << rank_ << "): ";
  if (ab::kind(code) == ab::kTimeout) {
    msg << "block " << ab::block(code) << " of " << op_name(ab::op(code)) << " on rank " << ab::rank(code)
        << " waited more than " << static_cast<double>(timeout_ns_) * 1e-9 << " s at barrier " << ab::barrier(code)
        << " for rank " << ab::peer(code) << ", which never got there (it failed or refused the op, runs "
        << "other work, launched a different sequence of P2P ops, or its blocks could not all be resident)";
  } else if (ab::kind(code) == ab::kRefused) {
    msg << "rank " << ab::rank(code) << " refused a " << op_name(ab::op(code)) << " call after its peers may "
        << "have launched it (its own error says why)";
  } else {
    msg << "unknown abort code 0x" << std::hex << code;
  }
  msg << ". The outputs of this group's P2P ops since then are undefined and its buffers unusable: "
         "call tpext.p2p.release(group) and tpext.p2p.enable(group) on every rank, or end the processes";
  return msg.str();
}

void SymmetricBuffers::check_health_locked(const std::string& group, const char* op) {
  const std::string why = describe_locked(group);
  TORCH_CHECK(why.empty(), "tpext.", op, ": ", why);
}

void SymmetricBuffers::check_health(const std::string& group, const char* op) {
  std::lock_guard<std::mutex> lock(mu_);
  check_health_locked(group, op);
}

std::string SymmetricBuffers::aborted(const std::string& group) {
  std::lock_guard<std::mutex> lock(mu_);
  return describe_locked(group);
}

std::unique_lock<std::mutex> SymmetricBuffers::begin_launch(cudaStream_t stream, const std::string& group,
                                                            const char* op) {
  std::unique_lock<std::mutex> lock(mu_);
  check_health_locked(group, op);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TPEXT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone || (stream_set_ && stream == stream_)) return lock;
  if (stream_set_) {
    // Order this stream after every launch already queued on the pinned one (no host sync). A pinned
    // stream under capture cannot be recorded from outside it: refused, the caller refuses the call.
    cudaStreamCaptureStatus old_capture = cudaStreamCaptureStatusNone;
    TPEXT_CUDA_CHECK(cudaStreamIsCapturing(stream_, &old_capture));
    TORCH_CHECK(old_capture == cudaStreamCaptureStatusNone, "tpext.", op, ": group '", group, "' has P2P work ",
                "on a stream that is being captured into a CUDA graph, and this eager call is on another stream; ",
                "make the eager call on the capturing stream, or after the capture ends");
    TPEXT_CUDA_CHECK(cudaEventRecord(switch_event_, stream_));
    TPEXT_CUDA_CHECK(cudaStreamWaitEvent(stream, switch_event_, 0));
  }
  stream_ = stream;
  stream_set_ = true;
  return lock;
}

void SymmetricBuffers::refuse(kernels::P2POp op) noexcept {
  if (!opened_) return;
  const uint32_t code = kernels::p2p_abort::encode(kernels::p2p_abort::kRefused, op, rank_, 0, 0, 0);
  uint32_t clear = 0;
  // Already aborted: every rank's abort word holds the first code, which a refusal must not overwrite.
  if (!__atomic_compare_exchange_n(host_abort_, &clear, code, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
  const int prev = [] {
    int d = 0;
    return cudaGetDevice(&d) == cudaSuccess ? d : -1;
  }();
  cudaSetDevice(device_);
  // Stores into peer memory on a stream of its own: they do not wait for this device's kernels, which
  // may themselves be waiting for the peers.
  for (int p = 0; p < world_; ++p) {
    cudaMemcpyAsync(signals_[p] + kernels::kP2PAbortWord, &code, sizeof(code), cudaMemcpyHostToDevice, refuse_stream_);
  }
  cudaStreamSynchronize(refuse_stream_);
  cudaGetLastError();  // best effort: a failure here leaves the peers to their timeout
  if (prev >= 0) cudaSetDevice(prev);
}

std::string SymmetricBuffers::local_handle() const {
  cudaIpcMemHandle_t h;
  TPEXT_CUDA_CHECK(cudaIpcGetMemHandle(&h, base_[rank_]));
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void SymmetricBuffers::open_peers(const std::vector<std::string>& handles, int max_blocks, uint64_t timeout_ns) {
  TORCH_CHECK(!opened_, "tpext.p2p: the peers of these buffers are already open");
  TORCH_CHECK(static_cast<int>(handles.size()) == world_, "tpext.p2p: expected ", world_,
              " IPC handles (one per rank), got ", handles.size());
  TORCH_CHECK(max_blocks >= 1 && max_blocks <= kernels::kP2PMaxBlocks, "tpext.p2p: max_blocks must be in [1, ",
              kernels::kP2PMaxBlocks, "], got ", max_blocks);
  TORCH_CHECK(timeout_ns > 0, "tpext.p2p: timeout_ns must be > 0, got ", timeout_ns);
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
      TORCH_CHECK(false, "tpext.p2p: rank ", rank_, " cannot map the buffer of rank ", p,
                  " (cudaIpcOpenMemHandle: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err),
                  "); the GPUs cannot access each other");
    }
    data_[p] = base_[p];
    signals_[p] = reinterpret_cast<uint32_t*>(static_cast<char*>(base_[p]) + signal_offset);
  }
  max_blocks_ = max_blocks;
  timeout_ns_ = timeout_ns;
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
  g.host_abort = host_abort_dev_;
  g.timeout_ns = timeout_ns_;
  g.max_blocks = max_blocks_;
  return g;
}

}  // namespace tpext::comm

#endif  // TPEXT_WITH_CUDA
