// All-reduce (one-shot, two-shot), reduce-scatter and all-gather over peer memory (contract: p2p.h;
// memory-ordering argument of the barrier: p2p_device.cuh).
//
// Work split. A range of `len` elements is cut into "units": len / N packs of N elements (16 bytes),
// then the len % N trailing elements one by one. Global thread i of the grid handles units i,
// i + G, i + 2G, ... (G = grid threads). The grid depends only on the sizes, so it is the same on every
// rank; in the two-shot all-reduce unit u of segment s is therefore reduced (phase 1, on rank s) and
// gathered (phase 2, on every rank) by the same block index, which is why the per-block barrier of
// p2p_device.cuh is enough between the phases.
#include "p2p.h"
#include "p2p_device.cuh"

#include "../common/cuda_check.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace tpext::kernels {
namespace {

using namespace p2p_detail;
using numeric::aligned16;
using numeric::dispatch;

constexpr int kThreads = 512;

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// dst[i] = sum_q buffers[q][begin + i] for i in [0, len).
template <typename T, int N>
__device__ __forceinline__ void reduce_range(const P2PGroup& g, int64_t begin, int64_t len, T* dst) {
  using A = typename AccOf<T>::type;
  const int64_t nvec = len / N, units = nvec + (len - nvec * N);
  for (int64_t u = global_thread(); u < units; u += grid_threads()) {
    if (u < nvec) {
      A acc[N];
      sum_peers<T, N>(g, begin + u * N, acc);
      Pack<T, N> r;
#pragma unroll
      for (int k = 0; k < N; ++k) r.v[k] = from_acc<T>(acc[k]);
      store_pack<T, N>(dst + u * N, r);
    } else {
      const int64_t i = nvec * N + (u - nvec);
      A acc[1];
      sum_peers<T, 1>(g, begin + i, acc);
      dst[i] = from_acc<T>(acc[0]);
    }
  }
}

// dst[i] = src[i] for i in [0, len), same unit split as reduce_range.
template <typename T, int N>
__device__ __forceinline__ void copy_range(const T* src, int64_t len, T* dst) {
  const int64_t nvec = len / N, units = nvec + (len - nvec * N);
  for (int64_t u = global_thread(); u < units; u += grid_threads()) {
    if (u < nvec) {
      store_pack<T, N>(dst + u * N, load_pack<T, N>(src + u * N));
    } else {
      const int64_t i = nvec * N + (u - nvec);
      dst[i] = src[i];
    }
  }
}

// [begin, begin + len) of segment s when numel is cut into segments of `seg` elements.
__device__ __forceinline__ void segment(int64_t numel, int64_t seg, int s, int64_t* begin, int64_t* len) {
  *begin = std::min<int64_t>(numel, s * seg);
  *len = std::min<int64_t>(numel, *begin + seg) - *begin;
}

template <typename T, int N, bool kSync>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(const P2PGroup g, T* out, int64_t numel) {
  constexpr P2POp kOp = P2POp::kAllReduceOneShot;
  uint32_t epoch;
  if (!launch_begin<kSync>(g, &epoch)) return;
  if (!block_barrier<kSync>(g, epoch, 1, kOp)) return;  // every rank's input is in its buffer
  reduce_range<T, N>(g, 0, numel, out);
  if (!block_barrier<kSync>(g, epoch, 2, kOp)) return;  // every rank is done reading: buffers may be overwritten
  finish_epoch<kSync>(g, epoch);
}

constexpr int kReducePhase = 1, kGatherPhase = 2;

// Phase 1: this rank's segment, reduced over all ranks, written back in place into its own buffer (no
// peer reads that segment of this buffer in phase 1). Phase 2: every segment from its owner's buffer.
template <typename T, int N, bool kSync, int kPhases>
__global__ void __launch_bounds__(kThreads) two_shot_kernel(const P2PGroup g, T* out, int64_t numel, int64_t seg) {
  constexpr P2POp kOp = P2POp::kAllReduceTwoShot;
  int64_t begin, len;
  uint32_t epoch;
  if (!launch_begin<kSync>(g, &epoch)) return;
  if constexpr ((kPhases & kReducePhase) != 0) {
    if (!block_barrier<kSync>(g, epoch, 1, kOp)) return;
    segment(numel, seg, g.rank, &begin, &len);
    reduce_range<T, N>(g, begin, len, static_cast<T*>(g.buffers[g.rank]) + begin);
    if (!block_barrier<kSync>(g, epoch, 2, kOp)) return;  // every segment is reduced
  }
  if constexpr ((kPhases & kGatherPhase) != 0) {
    for (int s = 0; s < g.world; ++s) {
      segment(numel, seg, s, &begin, &len);
      copy_range<T, N>(static_cast<const T*>(g.buffers[s]) + begin, len, out + begin);
    }
    if (!block_barrier<kSync>(g, epoch, 3, kOp)) return;
  }
  finish_epoch<kSync>(g, epoch);
}

template <typename T, int N, bool kSync>
__global__ void __launch_bounds__(kThreads) reduce_scatter_kernel(const P2PGroup g, T* out, int64_t seg) {
  constexpr P2POp kOp = P2POp::kReduceScatter;
  uint32_t epoch;
  if (!launch_begin<kSync>(g, &epoch)) return;
  if (!block_barrier<kSync>(g, epoch, 1, kOp)) return;
  reduce_range<T, N>(g, g.rank * seg, seg, out);
  if (!block_barrier<kSync>(g, epoch, 2, kOp)) return;
  finish_epoch<kSync>(g, epoch);
}

template <typename T, int N, bool kSync>
__global__ void __launch_bounds__(kThreads) all_gather_kernel(const P2PGroup g, T* out, int64_t numel) {
  constexpr P2POp kOp = P2POp::kAllGather;
  uint32_t epoch;
  if (!launch_begin<kSync>(g, &epoch)) return;
  if (!block_barrier<kSync>(g, epoch, 1, kOp)) return;
  for (int s = 0; s < g.world; ++s) copy_range<T, N>(static_cast<const T*>(g.buffers[s]), numel, out + s * numel);
  if (!block_barrier<kSync>(g, epoch, 2, kOp)) return;
  finish_epoch<kSync>(g, epoch);
}

// ---- host side ----------------------------------------------------------------------------------

[[noreturn]] void fail(const char* fn, const std::string& what) {
  throw std::runtime_error(std::string("tpext::kernels::") + fn + ": " + what);
}

// The grid depends on the sizes and the group's agreed cap only (never on the device), so every rank
// launches the same grid.
unsigned grid_for(int64_t units, const P2PGroup& g) {
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, max_blocks(g)));
}

void check_common(const char* fn, const P2PGroup& g, bool device_sync, const void* out, int64_t numel, DType dtype) {
  if (g.world < 1 || g.world > kP2PMaxRanks) fail(fn, "world must be in [1, 8], got " + std::to_string(g.world));
  if (device_sync && (g.rank < 0 || g.rank >= g.world)) {
    fail(fn, "rank must be in [0, " + std::to_string(g.world) + "), got " + std::to_string(g.rank));
  }
  if (numel < 0) fail(fn, "numel must be >= 0, got " + std::to_string(numel));
  if (g.max_blocks < 0 || g.max_blocks > kP2PMaxBlocks) {
    fail(fn, "max_blocks must be in [0, " + std::to_string(kP2PMaxBlocks) + "], got " + std::to_string(g.max_blocks));
  }
  const auto dt = static_cast<int32_t>(dtype);
  if (dt < 0 || dt > 3) fail(fn, "dtype must be kFloat32, kFloat16, kBFloat16 or kFloat64, got " + std::to_string(dt));
  for (int q = 0; q < g.world; ++q) {
    if (numel > 0 && g.buffers[q] == nullptr) fail(fn, "buffers[" + std::to_string(q) + "] is nullptr");
    if (device_sync && g.signals[q] == nullptr) fail(fn, "signals[" + std::to_string(q) + "] is nullptr (device sync)");
  }
  if (numel > 0 && out == nullptr) fail(fn, "out is nullptr for numel = " + std::to_string(numel));
  // The launch shape (vector width, grid, two-shot segments) must be the same on every rank, or blocks
  // wait for peers that never run: with device sync it may depend only on what all ranks share.
  if (device_sync && numel > 0 && !aligned16(out)) {
    fail(fn, "out must be 16-byte aligned with device synchronisation (a rank-local misalignment would give "
             "this rank another launch shape than its peers)");
  }
}

bool buffers_aligned(const P2PGroup& g) {
  for (int q = 0; q < g.world; ++q) {
    if (!aligned16(g.buffers[q])) return false;
  }
  return true;
}

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

// Launches `kernel` for each rank in `ranks` with that rank's group copy and output. Device sync:
// one rank (this one); virtual: all of them, in rank order, on one stream.
template <typename Launch>
void for_ranks(const P2PGroup& g, bool device_sync, void* out, void* const* outs, Launch&& launch) {
  if (device_sync) {
    launch(g, out);
    return;
  }
  for (int r = 0; r < g.world; ++r) {
    P2PGroup gr = g;
    gr.rank = r;
    launch(gr, outs[r]);
  }
}

void all_reduce_impl(const P2PAllReduceParams& p, void* const* outs, cudaStream_t stream) {
  const bool sync = outs == nullptr;
  const char* fn = sync ? "launch_p2p_all_reduce" : "launch_p2p_all_reduce_virtual";
  check_common(fn, p.group, sync, sync ? p.out : (outs ? outs[0] : nullptr), p.numel, p.dtype);
  if (p.algo != P2PAlgo::kOneShot && p.algo != P2PAlgo::kTwoShot) {
    fail(fn, "algo must be kOneShot (1) or kTwoShot (2), got " + std::to_string(static_cast<int32_t>(p.algo)));
  }
  if (p.numel == 0) return;
  const int world = p.group.world;
  bool ptrs_ok = buffers_aligned(p.group);
  for (int r = 0; r < (sync ? 1 : world); ++r) {
    void* o = sync ? p.out : outs[r];
    if (o == nullptr) fail(fn, "outs[" + std::to_string(r) + "] is nullptr");
    ptrs_ok = ptrs_ok && aligned16(o);
  }
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec_of<T>();
    const bool vec = ptrs_ok;
    const int N = vec ? V : 1;
    if (p.algo == P2PAlgo::kOneShot) {
      const unsigned grid = grid_for(p.numel / N + p.numel % N, p.group);
      for_ranks(p.group, sync, p.out, outs, [&](const P2PGroup& g, void* o) {
        T* out = static_cast<T*>(o);
        if (sync && vec) one_shot_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(g, out, p.numel);
        if (sync && !vec) one_shot_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(g, out, p.numel);
        if (!sync && vec) one_shot_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(g, out, p.numel);
        if (!sync && !vec) one_shot_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(g, out, p.numel);
        TPEXT_CUDA_CHECK(cudaGetLastError());
      });
      return;
    }
    // Segments are whole packs, so every segment starts 16-byte aligned when the buffers do.
    const int64_t seg = ((p.numel + world - 1) / world + N - 1) / N * N;
    const unsigned grid = grid_for(seg / N + seg % N, p.group);
    if (sync) {
      T* out = static_cast<T*>(p.out);
      if (vec) two_shot_kernel<T, V, true, 3><<<grid, kThreads, 0, stream>>>(p.group, out, p.numel, seg);
      else two_shot_kernel<T, 1, true, 3><<<grid, kThreads, 0, stream>>>(p.group, out, p.numel, seg);
      TPEXT_CUDA_CHECK(cudaGetLastError());
      return;
    }
    for (int phase : {kReducePhase, kGatherPhase}) {  // all ranks' phase 1, then all ranks' phase 2
      for_ranks(p.group, false, nullptr, outs, [&](const P2PGroup& g, void* o) {
        T* out = static_cast<T*>(o);
        if (phase == kReducePhase && vec)
          two_shot_kernel<T, V, false, kReducePhase><<<grid, kThreads, 0, stream>>>(g, out, p.numel, seg);
        if (phase == kReducePhase && !vec)
          two_shot_kernel<T, 1, false, kReducePhase><<<grid, kThreads, 0, stream>>>(g, out, p.numel, seg);
        if (phase == kGatherPhase && vec)
          two_shot_kernel<T, V, false, kGatherPhase><<<grid, kThreads, 0, stream>>>(g, out, p.numel, seg);
        if (phase == kGatherPhase && !vec)
          two_shot_kernel<T, 1, false, kGatherPhase><<<grid, kThreads, 0, stream>>>(g, out, p.numel, seg);
        TPEXT_CUDA_CHECK(cudaGetLastError());
      });
    }
  });
}

enum class SG { kReduceScatter, kAllGather };

void scatter_gather_impl(SG kind, const P2PScatterGatherParams& p, void* const* outs, cudaStream_t stream) {
  const bool sync = outs == nullptr;
  const char* fn = kind == SG::kReduceScatter
                       ? (sync ? "launch_p2p_reduce_scatter" : "launch_p2p_reduce_scatter_virtual")
                       : (sync ? "launch_p2p_all_gather" : "launch_p2p_all_gather_virtual");
  check_common(fn, p.group, sync, sync ? p.out : (outs ? outs[0] : nullptr), p.numel, p.dtype);
  const int world = p.group.world;
  if (kind == SG::kReduceScatter && p.numel % world != 0) {
    fail(fn, "numel must be divisible by world = " + std::to_string(world) + ", got " + std::to_string(p.numel));
  }
  if (p.numel == 0) return;
  bool ptrs_ok = buffers_aligned(p.group);
  for (int r = 0; r < (sync ? 1 : world); ++r) {
    void* o = sync ? p.out : outs[r];
    if (o == nullptr) fail(fn, "outs[" + std::to_string(r) + "] is nullptr");
    ptrs_ok = ptrs_ok && aligned16(o);
  }
  // The per-rank length must be whole packs for the per-rank offsets to stay 16-byte aligned.
  const int64_t len = kind == SG::kReduceScatter ? p.numel / world : p.numel;
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec_of<T>();
    const bool vec = ptrs_ok && len % V == 0;
    const unsigned grid = grid_for(vec ? len / V : len, p.group);
    for_ranks(p.group, sync, p.out, outs, [&](const P2PGroup& g, void* o) {
      T* out = static_cast<T*>(o);
      if (kind == SG::kReduceScatter) {
        if (sync && vec) reduce_scatter_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(g, out, len);
        if (sync && !vec) reduce_scatter_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(g, out, len);
        if (!sync && vec) reduce_scatter_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(g, out, len);
        if (!sync && !vec) reduce_scatter_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(g, out, len);
      } else {
        if (sync && vec) all_gather_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(g, out, len);
        if (sync && !vec) all_gather_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(g, out, len);
        if (!sync && vec) all_gather_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(g, out, len);
        if (!sync && !vec) all_gather_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(g, out, len);
      }
      TPEXT_CUDA_CHECK(cudaGetLastError());
    });
  });
}

// Fewest blocks per SM of any device-synchronised collective kernel (kThreads each).
int collectives_min_blocks_per_sm() {
  int fewest = std::numeric_limits<int>::max();
  auto take = [&](const void* kernel) {
    int n = 0;
    TPEXT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    fewest = std::min(fewest, n);
  };
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      constexpr int V = vec_of<T>();
      for (const void* k : {reinterpret_cast<const void*>(one_shot_kernel<T, V, true>),
                            reinterpret_cast<const void*>(one_shot_kernel<T, 1, true>),
                            reinterpret_cast<const void*>(two_shot_kernel<T, V, true, 3>),
                            reinterpret_cast<const void*>(two_shot_kernel<T, 1, true, 3>),
                            reinterpret_cast<const void*>(reduce_scatter_kernel<T, V, true>),
                            reinterpret_cast<const void*>(reduce_scatter_kernel<T, 1, true>),
                            reinterpret_cast<const void*>(all_gather_kernel<T, V, true>),
                            reinterpret_cast<const void*>(all_gather_kernel<T, 1, true>)}) {
        take(k);
      }
    });
  }
  return fewest;
}

}  // namespace

int p2p_max_coresident_blocks(int device) {
  int sms = 0;
  TPEXT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int per_sm = std::min(collectives_min_blocks_per_sm(), p2p_detail::norm_min_blocks_per_sm());
  return static_cast<int>(std::min<int64_t>(static_cast<int64_t>(per_sm) * sms, kP2PMaxBlocks));
}

void launch_p2p_all_reduce(const P2PAllReduceParams& p, cudaStream_t stream) { all_reduce_impl(p, nullptr, stream); }

void launch_p2p_all_reduce_virtual(const P2PAllReduceParams& p, void* const* outs, cudaStream_t stream) {
  if (outs == nullptr) fail("launch_p2p_all_reduce_virtual", "outs is nullptr");
  all_reduce_impl(p, outs, stream);
}

void launch_p2p_reduce_scatter(const P2PScatterGatherParams& p, cudaStream_t stream) {
  scatter_gather_impl(SG::kReduceScatter, p, nullptr, stream);
}

void launch_p2p_reduce_scatter_virtual(const P2PScatterGatherParams& p, void* const* outs, cudaStream_t stream) {
  if (outs == nullptr) fail("launch_p2p_reduce_scatter_virtual", "outs is nullptr");
  scatter_gather_impl(SG::kReduceScatter, p, outs, stream);
}

void launch_p2p_all_gather(const P2PScatterGatherParams& p, cudaStream_t stream) {
  scatter_gather_impl(SG::kAllGather, p, nullptr, stream);
}

void launch_p2p_all_gather_virtual(const P2PScatterGatherParams& p, void* const* outs, cudaStream_t stream) {
  if (outs == nullptr) fail("launch_p2p_all_gather_virtual", "outs is nullptr");
  scatter_gather_impl(SG::kAllGather, p, outs, stream);
}

}  // namespace tpext::kernels
