// The ranks of one benchmark process, their streams and their collectives.
//
// Two modes, one interface, so an op's schedule is written once:
//  * NCCL (--gpus N): one process drives N local GPUs, rank r on device r, one communicator per GPU
//    from ncclCommInitAll, each collective issued for all ranks inside one ncclGroupStart/End (the
//    nccl-tests pattern for one thread driving several devices).
//  * Virtual ranks (--virtual-ranks R): R ranks whose buffers all live on the current GPU; collectives
//    are tpext's P2P kernels through their launch_p2p_*_virtual launchers (kernels/p2p.h): every rank's
//    phase on one stream, stream order as the barrier. This measures the kernels and the schedule on
//    one GPU (the R ranks' GEMMs share its SMs), not NVLink.
//
// Per device, the streams of docs/cuda.md: two compute lanes (lane 0 plays the caller's stream) and a
// communication stream at the device's highest priority, each lane with its own cuBLAS handle (no
// workspace shared between concurrently running GEMMs). Between streams only events: fork() makes
// lane 1 and the comm stream wait for lane 0's earlier work, join() makes lane 0 wait for both, so
// everything an op enqueues between them is ordered between lane 0's work before and after. Nothing
// here synchronises the host except sync().
#pragma once

#include "common/cublas_check.h"
#include "common/cuda_check.h"
#include "common/nccl_check.h"
#include "dtype.cuh"
#include "gemm.cuh"
#include "kernels/p2p.h"
#include "options.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <string>
#include <utility>
#include <vector>

namespace tpext::bench {

constexpr int kMaxChunkEvents = 64;  // --chunks accepts at most 64

struct DeviceCtx {
  int device = 0;
  cudaStream_t lanes[2] = {nullptr, nullptr};
  cudaStream_t comm = nullptr;
  cublasHandle_t blas[2] = {nullptr, nullptr};
  cudaEvent_t fork = nullptr, lane1_done = nullptr, comm_done = nullptr;
  cudaEvent_t chunk[kMaxChunkEvents] = {};
  ncclComm_t nccl = nullptr;
};

class Ranks {
 public:
  Ranks(const Options& o, const DtypeInfo& dt) : dt_(dt), p2p_algo_(o.p2p_algo) {
    int visible = 0;
    TPEXT_CUDA_CHECK(cudaGetDeviceCount(&visible));
    virtual_ = o.virtual_ranks > 0;
    if (virtual_) {
      world_ = o.virtual_ranks;
      int dev = 0;
      TPEXT_CUDA_CHECK(cudaGetDevice(&dev));
      devs_.resize(1);
      devs_[0].device = dev;
    } else {
      world_ = o.gpus > 0 ? o.gpus : visible;
      if (world_ > visible) {
        throw std::runtime_error("--gpus " + std::to_string(world_) + ": only " + std::to_string(visible) +
                                 " GPUs are visible (check CUDA_VISIBLE_DEVICES)");
      }
      devs_.resize(static_cast<size_t>(world_));
      for (int d = 0; d < world_; ++d) devs_[d].device = d;
    }
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      int least = 0, greatest = 0;
      TPEXT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      TPEXT_CUDA_CHECK(cudaStreamCreateWithPriority(&c.comm, cudaStreamNonBlocking, greatest));
      for (int l = 0; l < 2; ++l) {
        TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&c.lanes[l], cudaStreamNonBlocking));
        TPEXT_CUBLAS_CHECK(cublasCreate(&c.blas[l]));
        TPEXT_CUBLAS_CHECK(cublasSetStream(c.blas[l], c.lanes[l]));
      }
      for (cudaEvent_t* e : {&c.fork, &c.lane1_done, &c.comm_done}) {
        TPEXT_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
      }
      for (cudaEvent_t& e : c.chunk) TPEXT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    if (!virtual_) {
      std::vector<ncclComm_t> comms(devs_.size());
      std::vector<int> ids(devs_.size());
      for (size_t d = 0; d < devs_.size(); ++d) ids[d] = devs_[d].device;
      TPEXT_NCCL_CHECK(ncclCommInitAll(comms.data(), world_, ids.data()));
      for (size_t d = 0; d < devs_.size(); ++d) devs_[d].nccl = comms[d];
    }
  }

  Ranks(const Ranks&) = delete;
  Ranks& operator=(const Ranks&) = delete;

  // Cleanup must not throw: errors are ignored here, the run has reported its results already.
  ~Ranks() {
    release();
    for (DeviceCtx& c : devs_) {
      cudaSetDevice(c.device);
      if (c.nccl != nullptr) ncclCommDestroy(c.nccl);
      for (int l = 0; l < 2; ++l) {
        if (c.blas[l] != nullptr) cublasDestroy(c.blas[l]);
        if (c.lanes[l] != nullptr) cudaStreamDestroy(c.lanes[l]);
      }
      if (c.comm != nullptr) cudaStreamDestroy(c.comm);
      for (cudaEvent_t e : {c.fork, c.lane1_done, c.comm_done})
        if (e != nullptr) cudaEventDestroy(e);
      for (cudaEvent_t e : c.chunk)
        if (e != nullptr) cudaEventDestroy(e);
    }
  }

  int world() const { return world_; }
  bool is_virtual() const { return virtual_; }
  const DtypeInfo& dtype() const { return dt_; }
  std::vector<DeviceCtx>& devices() { return devs_; }
  int ranks_per_device() const { return virtual_ ? world_ : 1; }
  DeviceCtx& ctx(int r) { return virtual_ ? devs_[0] : devs_[static_cast<size_t>(r)]; }
  void set_device(int r) { TPEXT_CUDA_CHECK(cudaSetDevice(ctx(r).device)); }

  // Device buffer of rank r, freed by release() (between shapes) or the destructor.
  void* alloc(int r, size_t bytes) {
    set_device(r);
    void* p = nullptr;
    TPEXT_CUDA_CHECK(cudaMalloc(&p, bytes > 0 ? bytes : 16));
    allocs_.emplace_back(ctx(r).device, p);
    return p;
  }
  // One buffer of `elems` elements of the bench dtype per rank.
  std::vector<void*> alloc_each(int64_t elems) {
    std::vector<void*> bufs(static_cast<size_t>(world()));
    for (int r = 0; r < world(); ++r) bufs[r] = alloc(r, static_cast<size_t>(elems) * dt_.size);
    return bufs;
  }
  // Rank r's bufs[r] (elems elements) filled with bench inputs (fill_inputs) of tensor id stride * r + offset,
  // on the rank's first lane.
  void fill_each(const std::vector<void*>& bufs, int64_t elems, uint32_t stride, uint32_t offset) {
    for (int r = 0; r < world(); ++r) {
      set_device(r);
      fill_inputs(dt_, bufs[r], elems, stride * static_cast<uint32_t>(r) + offset, ctx(r).lanes[0]);
    }
  }

  void release() {
    sync_noexcept();
    for (auto& [dev, p] : allocs_) {
      cudaSetDevice(dev);
      cudaFree(p);
    }
    allocs_.clear();
  }

  void fork() {
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      TPEXT_CUDA_CHECK(cudaEventRecord(c.fork, c.lanes[0]));
      TPEXT_CUDA_CHECK(cudaStreamWaitEvent(c.lanes[1], c.fork, 0));
      TPEXT_CUDA_CHECK(cudaStreamWaitEvent(c.comm, c.fork, 0));
    }
  }
  void join() {
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      TPEXT_CUDA_CHECK(cudaEventRecord(c.lane1_done, c.lanes[1]));
      TPEXT_CUDA_CHECK(cudaEventRecord(c.comm_done, c.comm));
      TPEXT_CUDA_CHECK(cudaStreamWaitEvent(c.lanes[0], c.lane1_done, 0));
      TPEXT_CUDA_CHECK(cudaStreamWaitEvent(c.lanes[0], c.comm_done, 0));
    }
  }
  // Chunk j's GEMMs were enqueued on `lane` of every device: the comm stream waits for them.
  void comm_waits_lane(int j, int lane) {
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      TPEXT_CUDA_CHECK(cudaEventRecord(c.chunk[j], c.lanes[lane]));
      TPEXT_CUDA_CHECK(cudaStreamWaitEvent(c.comm, c.chunk[j], 0));
    }
  }
  // Chunk j's collective was enqueued on the comm stream: mark it, for lane_waits_comm(j, lane).
  void mark_comm(int j) {
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      TPEXT_CUDA_CHECK(cudaEventRecord(c.chunk[j], c.comm));
    }
  }
  void lane_waits_comm(int j, int lane) {
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      TPEXT_CUDA_CHECK(cudaStreamWaitEvent(c.lanes[lane], c.chunk[j], 0));
    }
  }

  void gemm(int r, int lane, const GemmArgs& g) {
    set_device(r);
    tpext::bench::gemm(ctx(r).blas[lane], dt_, g);
  }

  // Collectives over all ranks on the comm streams; send[r] / recv[r] are rank r's buffers.
  void all_reduce(const std::vector<void*>& send, const std::vector<void*>& recv, int64_t count) {
    if (virtual_) {
      tpext::kernels::P2PAllReduceParams p{
          group(send), nullptr, count, dt_.p2p,
          p2p_algo_ == 1 ? tpext::kernels::P2PAlgo::kOneShot : tpext::kernels::P2PAlgo::kTwoShot};
      set_device(0);
      tpext::kernels::launch_p2p_all_reduce_virtual(p, recv.data(), devs_[0].comm);
      return;
    }
    TPEXT_NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < world_; ++r) {
      TPEXT_NCCL_CHECK(
          ncclAllReduce(send[r], recv[r], static_cast<size_t>(count), dt_.nccl, ncclSum, ctx(r).nccl, ctx(r).comm));
    }
    TPEXT_NCCL_CHECK(ncclGroupEnd());
  }
  // send[r] holds world * recv_count elements, block q destined to rank q.
  void reduce_scatter(const std::vector<void*>& send, const std::vector<void*>& recv, int64_t recv_count) {
    if (virtual_) {
      tpext::kernels::P2PScatterGatherParams p{group(send), nullptr, recv_count * world_, dt_.p2p};
      set_device(0);
      tpext::kernels::launch_p2p_reduce_scatter_virtual(p, recv.data(), devs_[0].comm);
      return;
    }
    TPEXT_NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < world_; ++r) {
      TPEXT_NCCL_CHECK(ncclReduceScatter(send[r], recv[r], static_cast<size_t>(recv_count), dt_.nccl, ncclSum,
                                         ctx(r).nccl, ctx(r).comm));
    }
    TPEXT_NCCL_CHECK(ncclGroupEnd());
  }
  // recv[r] receives world * send_count elements, rank q's block at q * send_count.
  void all_gather(const std::vector<void*>& send, const std::vector<void*>& recv, int64_t send_count) {
    if (virtual_) {
      tpext::kernels::P2PScatterGatherParams p{group(send), nullptr, send_count, dt_.p2p};
      set_device(0);
      tpext::kernels::launch_p2p_all_gather_virtual(p, recv.data(), devs_[0].comm);
      return;
    }
    TPEXT_NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < world_; ++r) {
      TPEXT_NCCL_CHECK(
          ncclAllGather(send[r], recv[r], static_cast<size_t>(send_count), dt_.nccl, ctx(r).nccl, ctx(r).comm));
    }
    TPEXT_NCCL_CHECK(ncclGroupEnd());
  }

  // recv[r][q] (rank r's copy of rank q's block) <- send[q], count elements each: the all-gather as
  // tpext's schedule issues it for rows spread over a rank-major buffer. NCCL: one broadcast per source
  // rank, all in one group (csrc/comm/nccl.cpp); virtual ranks: one copy per pair on the comm stream,
  // as tpext's virtual hub makes them.
  void gather_into(const std::vector<void*>& send, const std::vector<std::vector<void*>>& recv, int64_t count) {
    if (virtual_) {
      set_device(0);
      const size_t bytes = static_cast<size_t>(count) * dt_.size;
      for (int r = 0; r < world_; ++r) {
        for (int q = 0; q < world_; ++q) {
          TPEXT_CUDA_CHECK(cudaMemcpyAsync(recv[r][q], send[q], bytes, cudaMemcpyDeviceToDevice, devs_[0].comm));
        }
      }
      return;
    }
    TPEXT_NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < world_; ++q) {  // every communicator sees the roots in the same order
      for (int r = 0; r < world_; ++r) {
        TPEXT_NCCL_CHECK(
            ncclBroadcast(send[r], recv[r][q], static_cast<size_t>(count), dt_.nccl, q, ctx(r).nccl, ctx(r).comm));
      }
    }
    TPEXT_NCCL_CHECK(ncclGroupEnd());
  }

  void sync() {
    for (DeviceCtx& c : devs_) {
      TPEXT_CUDA_CHECK(cudaSetDevice(c.device));
      TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }

  std::string describe() const {
    std::string names;
    for (const DeviceCtx& c : devs_) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, c.device) == cudaSuccess)
        names += (names.empty() ? "" : ", ") + std::string(prop.name);
    }
    if (virtual_) {
      return std::to_string(world_) + " virtual ranks on one " + names +
             " (tpext P2P kernels; measures the kernels and the schedule, not NVLink)";
    }
    return std::to_string(world_) + " GPUs, NCCL (" + names + ")";
  }

 private:
  tpext::kernels::P2PGroup group(const std::vector<void*>& send) const {
    tpext::kernels::P2PGroup g{};
    for (int r = 0; r < world_; ++r) g.buffers[r] = send[r];
    g.world = world_;
    g.rank = 0;
    return g;
  }
  void sync_noexcept() {
    for (DeviceCtx& c : devs_) {
      cudaSetDevice(c.device);
      cudaDeviceSynchronize();
    }
  }

  DtypeInfo dt_;
  int p2p_algo_;
  bool virtual_ = false;
  int world_ = 0;
  std::vector<DeviceCtx> devs_;
  std::vector<std::pair<int, void*>> allocs_;
};

}  // namespace tpext::bench
