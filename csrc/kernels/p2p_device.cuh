// Device helpers shared by the P2P kernels (p2p_collectives.cu, p2p_norm.cu): dtype conversions,
// 16-byte packs, the cross-rank block barrier, and a deterministic block reduction.
//
// Memory-ordering argument of the barrier (device sync). Block b of rank r, at barrier k of its e-th
// launch (e = the block's epoch counter, read at kernel start, advanced by one at kernel end; block b
// of every rank takes part in the same launches, so the counters agree across ranks):
//   1. __syncthreads(): every access of this block before the barrier happens-before what thread t
//      does next (bar.sync orders at CTA scope, and causality order is transitive).
//   2. thread t < R: st.release.sys of value v = 4e + k into slot [b][r] of rank t's signal area.
//      Release at system scope: all of this block's earlier reads and writes (step 1) are ordered
//      before the flag becomes visible, on any GPU and to the host.
//   3. thread t: ld.acquire.sys of slot [b][t] of this rank's area until it reaches v (wrap-safe
//      compare; a peer may already be at a later barrier and have written a larger value).
//      Acquire: rank t's block b accesses before its release are visible to this thread's later ones.
//   4. __syncthreads(): the acquire of thread t happens-before every later access of the block.
// So after the barrier, block b of every rank sees everything block b of every other rank did before
// it, and no block b passes the barrier before all blocks b finished their earlier accesses (reads too:
// a peer's next copy-in cannot overwrite data still being read). Work is split between blocks
// identically on every rank (same grid, same loops), so block b only ever depends on blocks b of its
// peers, and per-block flags suffice: no grid-wide barrier, no host round trip. Values grow by one per
// barrier and never repeat within 2^31 barriers, so stale flags of earlier launches never satisfy a wait.
//
// Bounded waits. A waiting thread checks the clock (%globaltimer, ns) and its rank's abort word only
// every kPollSpins spins, and only once its first look found the peer absent: a barrier whose peers are
// already there costs what it did without the bound. The outcome is made uniform over the block by
// __syncthreads_or, so either every thread of the block passes the barrier or every thread returns.
// A block that gives up never advances its epoch: the group is unusable afterwards (p2p.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "numeric.cuh"
#include "p2p.h"

namespace tpext::kernels::p2p_detail {

using numeric::AccOf;
using numeric::from_acc;
using numeric::Pack;
using numeric::to_acc;

// IEEE 1/sqrt (sqrt and division are correctly rounded by default): the same rstd on every rank and
// as close as possible to the host references.
__device__ __forceinline__ float inv_sqrt(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ double inv_sqrt(double x) { return 1.0 / sqrt(x); }

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// acc[k] = sum_{q = 0..R-1} buffers[q][off + k], in that order. Loads of all peers are issued before
// the adds, so the R remote reads are in flight together (latency, not bandwidth, rules small messages).
template <typename T, int N>
__device__ __forceinline__ void sum_peers(const P2PGroup& g, int64_t off, typename AccOf<T>::type (&acc)[N]) {
  Pack<T, N> v[kP2PMaxRanks];
#pragma unroll
  for (int q = 0; q < kP2PMaxRanks; ++q) {
    if (q < g.world) v[q] = load_pack<T, N>(static_cast<const T*>(g.buffers[q]) + off);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = to_acc(v[0].v[k]);
#pragma unroll
  for (int q = 1; q < kP2PMaxRanks; ++q) {
    if (q < g.world) {
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] += to_acc(v[q].v[k]);
    }
  }
}

__device__ __forceinline__ void st_release_sys(uint32_t* addr, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* addr) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_relaxed_sys(const uint32_t* addr) {
  uint32_t v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_sys(uint32_t* addr, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

constexpr uint32_t kPollSpins = 1024;  // spins between two looks at the clock and the abort word

// Stores `code` as the group's abort: into every rank's abort word when this rank's is still clear (the
// first code wins where the stores do not race), and into this rank's host-mapped word. Any thread.
__device__ __forceinline__ void record_abort(const P2PGroup& g, uint32_t code) {
  if (ld_relaxed_sys(g.signals[g.rank] + kP2PAbortWord) == 0) {
    for (int q = 0; q < g.world; ++q) st_relaxed_sys(g.signals[q] + kP2PAbortWord, code);
  }
  if (g.host_abort != nullptr && ld_relaxed_sys(g.host_abort) == 0) st_relaxed_sys(g.host_abort, code);
  __threadfence_system();
}

// The slow path of a wait: 0 once `mine` reaches v, else the abort code to give up with (this rank's
// abort word when another block or rank set it, or a timeout of this wait).
__device__ __forceinline__ uint32_t wait_slow(const P2PGroup& g, const uint32_t* mine, uint32_t v, int peer, int k,
                                              P2POp op) {
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    if (static_cast<int32_t>(ld_acquire_sys(mine) - v) >= 0) return 0;
    if (spins % kPollSpins == 0) {
      const uint32_t seen = ld_relaxed_sys(g.signals[g.rank] + kP2PAbortWord);
      if (seen != 0) return seen;
      if (g.timeout_ns != 0 && global_timer_ns() - start > g.timeout_ns) {
        return p2p_abort::encode(p2p_abort::kTimeout, op, g.rank, peer, k, static_cast<int>(blockIdx.x));
      }
    }
  }
}

// Start of a launch: this block's epoch counter (device sync), written only by this block's own earlier
// launches, which precede this one in stream order, so a plain load sees it (0 in virtual mode, unused
// there). False when the group was aborted: the block must return (the code is copied to host_abort).
template <bool kSync>
__device__ __forceinline__ bool launch_begin(const P2PGroup& g, uint32_t* epoch) {
  *epoch = 0;
  if constexpr (kSync) {
    *epoch = g.signals[g.rank][kP2PFlagWords + blockIdx.x];
    // One thread reads the word, and the block decides together: a peer may set it while threads read.
    const uint32_t aborted = threadIdx.x == 0 ? ld_relaxed_sys(g.signals[g.rank] + kP2PAbortWord) : 0u;
    if (__syncthreads_or(aborted != 0) != 0) {
      if (aborted != 0) record_abort(g, aborted);
      return false;
    }
  }
  return true;
}

// Advances the counter; call after the last barrier (whose trailing __syncthreads orders every
// thread's read of the counter before this write).
template <bool kSync>
__device__ __forceinline__ void finish_epoch(const P2PGroup& g, uint32_t epoch) {
  if constexpr (kSync) {
    if (threadIdx.x == 0) g.signals[g.rank][kP2PFlagWords + blockIdx.x] = epoch + 1;
  }
}

// Barrier k (1..3) of this launch among blocks blockIdx.x of all ranks (see the argument above). True
// when passed; false when the block gave up (timeout or abort, recorded): the block must return.
// kSync = false (virtual ranks): a no-op, stream order is the barrier.
template <bool kSync>
__device__ __forceinline__ bool block_barrier(const P2PGroup& g, uint32_t epoch, int k, P2POp op) {
  if constexpr (kSync) {
    const uint32_t v = epoch * 4u + static_cast<uint32_t>(k);
    __syncthreads();
    const int t = static_cast<int>(threadIdx.x);
    uint32_t abort = 0;
    if (t < g.world) {
      const int64_t slot = static_cast<int64_t>(blockIdx.x) * kP2PMaxRanks;
      st_release_sys(g.signals[t] + slot + g.rank, v);
      const uint32_t* mine = g.signals[g.rank] + slot + t;
      if (static_cast<int32_t>(ld_acquire_sys(mine) - v) < 0) abort = wait_slow(g, mine, v, t, k, op);
    }
    if (__syncthreads_or(abort != 0) != 0) {
      if (abort != 0) record_abort(g, abort);
      return false;
    }
  }
  return true;
}

// The grid cap of device-synchronised launches (P2PGroup::max_blocks; 0 = kP2PMaxBlocks).
inline int64_t max_blocks(const P2PGroup& g) { return g.max_blocks > 0 ? g.max_blocks : kP2PMaxBlocks; }

// Fewest blocks per SM of any device-synchronised fused-norm kernel at its largest block (p2p_norm.cu).
int norm_min_blocks_per_sm();

// Sum of `x` over the block, the same tree for the same blockDim: deterministic, and identical on
// every rank. Ends with the result in every thread. `scratch` holds >= 32 values.
template <typename A>
__device__ __forceinline__ A block_sum(A x, A* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warps = static_cast<int>(blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : A(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace tpext::kernels::p2p_detail
