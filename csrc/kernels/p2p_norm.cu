// Fused all-reduce + bias + residual + RMSNorm over peer memory, and the RMSNorm backward (contract:
// p2p.h; barrier: p2p_device.cuh).
//
// One block per token row (grid-stride over rows, at most the group's max_blocks blocks, so that all
// blocks are resident while they wait on their peers). The block reads the row from every rank, sums it in
// rank order, adds bias and residual, rounds once (the new residual), accumulates the sum of squares of
// the rounded values, reduces it over the block with a fixed tree (the same bits on every rank), then
// rescales its own elements. A thread re-reads only the new-residual elements it wrote itself, so the
// second pass needs no extra synchronisation. Decode rows (hidden 4096-16384) are 8-32 KB in bf16, one
// row per block keeps all of it in flight at once.
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

// Most threads per block; a launch uses ceil(units / 32) warps up to this. The fused kernel holds a
// 16-byte pack of every peer in flight (8 ranks x 4 registers) beside its fp32 accumulators: at 1024
// threads (64 registers a thread) ptxas spilled 20 of its 64 variants (bf16: up to 148 B stored and
// 396 B loaded per thread); at 512 (128 registers) none spills (tools/cuda_compile_check.sh reports
// spills). A decode row of 16384 bf16 is 2048 packs: 4 per thread.
constexpr int kNormThreads = 512;
constexpr int kBackwardThreads = 1024;  // local kernel, no peer packs: no spills at 1024
constexpr int64_t kBackwardMaxBlocks = 256;

// Threads per block for a row of `units` units: whole warps (block_sum relies on it), at most `cap`.
unsigned norm_threads(int64_t units, int cap) {
  return static_cast<unsigned>(std::clamp<int64_t>((units + 31) / 32 * 32, 32, cap));
}

template <typename T, int N, bool kSync, bool kBias, bool kRes>
__global__ void __launch_bounds__(kNormThreads)
    ar_rmsnorm_kernel(const P2PGroup g, const T* residual, const T* bias, const T* weight, T* out, T* new_res,
                      int64_t rows, int64_t hidden, double eps) {
  using A = typename AccOf<T>::type;
  constexpr P2POp kOp = P2POp::kResidualRMSNorm;
  __shared__ A scratch[32];
  const int64_t nvec = hidden / N, units = nvec + (hidden - nvec * N);
  uint32_t epoch;
  if (!launch_begin<kSync>(g, &epoch)) return;
  if (!block_barrier<kSync>(g, epoch, 1, kOp)) return;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * hidden;
    A sumsq = 0;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      if (u < nvec) {
        const int64_t c = u * N;
        A acc[N];
        sum_peers<T, N>(g, base + c, acc);
        if constexpr (kBias) {
          const Pack<T, N> b = load_pack<T, N>(bias + c);
#pragma unroll
          for (int k = 0; k < N; ++k) acc[k] += to_acc(b.v[k]);
        }
        if constexpr (kRes) {
          const Pack<T, N> r = load_pack<T, N>(residual + base + c);
#pragma unroll
          for (int k = 0; k < N; ++k) acc[k] += to_acc(r.v[k]);
        }
        Pack<T, N> h;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          h.v[k] = from_acc<T>(acc[k]);
          const A hf = to_acc(h.v[k]);
          sumsq += hf * hf;
        }
        store_pack<T, N>(new_res + base + c, h);
      } else {
        const int64_t c = nvec * N + (u - nvec);
        A acc[1];
        sum_peers<T, 1>(g, base + c, acc);
        if constexpr (kBias) acc[0] += to_acc(bias[c]);
        if constexpr (kRes) acc[0] += to_acc(residual[base + c]);
        const T h = from_acc<T>(acc[0]);
        const A hf = to_acc(h);
        sumsq += hf * hf;
        new_res[base + c] = h;
      }
    }
    const A rstd = inv_sqrt(block_sum(sumsq, scratch) / static_cast<A>(hidden) + static_cast<A>(eps));
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      if (u < nvec) {
        const int64_t c = u * N;
        const Pack<T, N> h = load_pack<T, N>(new_res + base + c);
        const Pack<T, N> w = load_pack<T, N>(weight + c);
        Pack<T, N> o;
#pragma unroll
        for (int k = 0; k < N; ++k) o.v[k] = from_acc<T>(to_acc(h.v[k]) * rstd * to_acc(w.v[k]));
        store_pack<T, N>(out + base + c, o);
      } else {
        const int64_t c = nvec * N + (u - nvec);
        out[base + c] = from_acc<T>(to_acc(new_res[base + c]) * rstd * to_acc(weight[c]));
      }
    }
  }
  if (!block_barrier<kSync>(g, epoch, 2, kOp)) return;  // every rank is done reading the buffers
  finish_epoch<kSync>(g, epoch);
}

// Element-wise (the backward is local and far from the decode latency path; no vector variant).
// Thread t owns columns t, t + blockDim, ... of every row it handles, so its grad_weight partials are
// plain read-modify-writes of its own slots: no atomics, deterministic.
template <typename T, bool kGradIn>
__global__ void __launch_bounds__(kBackwardThreads)
    rmsnorm_backward_kernel(const T* grad_out, const T* grad_h_in, const T* h, const T* weight, T* grad_h,
                            typename AccOf<T>::type* dw_part, int64_t rows, int64_t hidden, double eps) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[32];
  A* dw = dw_part + static_cast<int64_t>(blockIdx.x) * hidden;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) dw[c] = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * hidden;
    A sumsq = 0, gh = 0;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      const A hf = to_acc(h[base + c]);
      sumsq += hf * hf;
      gh += to_acc(grad_out[base + c]) * to_acc(weight[c]) * hf;
    }
    const A rstd = inv_sqrt(block_sum(sumsq, scratch) / static_cast<A>(hidden) + static_cast<A>(eps));
    const A mean_gn = block_sum(gh, scratch) * rstd / static_cast<A>(hidden);  // mean_j(g_j * n_j)
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      const A dy = to_acc(grad_out[base + c]);
      const A n = to_acc(h[base + c]) * rstd;
      A d = rstd * (dy * to_acc(weight[c]) - n * mean_gn);
      if constexpr (kGradIn) d += to_acc(grad_h_in[base + c]);
      grad_h[base + c] = from_acc<T>(d);
      dw[c] += dy * n;
    }
  }
}

[[noreturn]] void fail(const char* fn, const std::string& what) {
  throw std::runtime_error(std::string("tpext::kernels::") + fn + ": " + what);
}

void check_dtype(const char* fn, DType dtype) {
  const auto dt = static_cast<int32_t>(dtype);
  if (dt < 0 || dt > 3) fail(fn, "dtype must be kFloat32, kFloat16, kBFloat16 or kFloat64, got " + std::to_string(dt));
}

template <typename T, int N, bool kSync>
void launch_norm_rank(const P2PResidualRMSNormParams& p, const P2PGroup& g, void* out, void* new_res, unsigned grid,
                      unsigned threads, cudaStream_t stream) {
  const T* res = static_cast<const T*>(p.residual);
  const T* bias = static_cast<const T*>(p.bias);
  const T* w = static_cast<const T*>(p.weight);
  T* o = static_cast<T*>(out);
  T* nr = static_cast<T*>(new_res);
  auto k = bias && res ? ar_rmsnorm_kernel<T, N, kSync, true, true>
           : bias      ? ar_rmsnorm_kernel<T, N, kSync, true, false>
           : res       ? ar_rmsnorm_kernel<T, N, kSync, false, true>
                       : ar_rmsnorm_kernel<T, N, kSync, false, false>;
  k<<<grid, threads, 0, stream>>>(g, res, bias, w, o, nr, p.rows, p.hidden, p.eps);
  TPEXT_CUDA_CHECK(cudaGetLastError());
}

void norm_impl(const P2PResidualRMSNormParams& p, void* const* outs, void* const* new_residuals, cudaStream_t stream) {
  const bool sync = outs == nullptr;
  const char* fn = sync ? "launch_p2p_all_reduce_residual_rmsnorm" : "launch_p2p_all_reduce_residual_rmsnorm_virtual";
  const P2PGroup& g = p.group;
  if (g.world < 1 || g.world > kP2PMaxRanks) fail(fn, "world must be in [1, 8], got " + std::to_string(g.world));
  if (sync && (g.rank < 0 || g.rank >= g.world)) fail(fn, "rank must be in [0, world), got " + std::to_string(g.rank));
  if (p.rows < 0 || p.hidden < 0) {
    fail(fn,
         "rows and hidden must be >= 0, got rows=" + std::to_string(p.rows) + ", hidden=" + std::to_string(p.hidden));
  }
  check_dtype(fn, p.dtype);
  if (p.rows == 0 || p.hidden == 0) return;
  if (p.weight == nullptr) fail(fn, "weight is nullptr");
  bool ptrs_ok = aligned16(p.residual) && aligned16(p.bias) && aligned16(p.weight);
  // As launch_p2p_all_reduce: with device sync the launch shape may depend only on what all ranks share.
  if (sync && !(ptrs_ok && aligned16(p.out) && aligned16(p.new_residual))) {
    fail(fn, "residual, bias, weight, out and new_residual must be 16-byte aligned with device synchronisation "
             "(a rank-local misalignment would give this rank another launch shape than its peers)");
  }
  for (int q = 0; q < g.world; ++q) {
    if (g.buffers[q] == nullptr) fail(fn, "buffers[" + std::to_string(q) + "] is nullptr");
    if (sync && g.signals[q] == nullptr) fail(fn, "signals[" + std::to_string(q) + "] is nullptr (device sync)");
    ptrs_ok = ptrs_ok && aligned16(g.buffers[q]);
  }
  for (int r = 0; r < (sync ? 1 : g.world); ++r) {
    void* o = sync ? p.out : outs[r];
    void* nr = sync ? p.new_residual : new_residuals[r];
    if (o == nullptr || nr == nullptr) fail(fn, "out / new_residual of rank " + std::to_string(r) + " is nullptr");
    if (!sync && p.residual != nullptr && (nr == p.residual || o == p.residual)) {
      fail(fn, std::string(nr == p.residual ? "new_residuals[" : "outs[") + std::to_string(r) +
                   "] is the shared "
                   "residual: with virtual ranks the ranks run one after another, and the later ones would read rank " +
                   std::to_string(r) + "'s output");
    }
    ptrs_ok = ptrs_ok && aligned16(o) && aligned16(nr);
  }
  if (g.max_blocks < 0 || g.max_blocks > kP2PMaxBlocks) {
    fail(fn, "max_blocks must be in [0, " + std::to_string(kP2PMaxBlocks) + "], got " + std::to_string(g.max_blocks));
  }
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.rows, max_blocks(g)));
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    const bool vec = ptrs_ok && p.hidden % V == 0;  // every row start 16-byte aligned
    const unsigned threads = norm_threads(vec ? p.hidden / V : p.hidden, kNormThreads);
    for (int r = 0; r < (sync ? 1 : g.world); ++r) {
      P2PGroup gr = g;
      if (!sync) gr.rank = r;
      void* o = sync ? p.out : outs[r];
      void* nr = sync ? p.new_residual : new_residuals[r];
      if (sync && vec) launch_norm_rank<T, V, true>(p, gr, o, nr, grid, threads, stream);
      if (sync && !vec) launch_norm_rank<T, 1, true>(p, gr, o, nr, grid, threads, stream);
      if (!sync && vec) launch_norm_rank<T, V, false>(p, gr, o, nr, grid, threads, stream);
      if (!sync && !vec) launch_norm_rank<T, 1, false>(p, gr, o, nr, grid, threads, stream);
    }
  });
}

}  // namespace

namespace p2p_detail {
int norm_min_blocks_per_sm() {
  int fewest = std::numeric_limits<int>::max();
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      constexpr int V = 16 / static_cast<int>(sizeof(T));
      for (const void* k : {reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, V, true, true, true>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, V, true, true, false>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, V, true, false, true>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, V, true, false, false>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, 1, true, true, true>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, 1, true, true, false>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, 1, true, false, true>),
                            reinterpret_cast<const void*>(ar_rmsnorm_kernel<T, 1, true, false, false>)}) {
        int n = 0;
        TPEXT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, kNormThreads, 0));
        fewest = std::min(fewest, n);
      }
    });
  }
  return fewest;
}
}  // namespace p2p_detail

void launch_p2p_all_reduce_residual_rmsnorm(const P2PResidualRMSNormParams& p, cudaStream_t stream) {
  norm_impl(p, nullptr, nullptr, stream);
}

void launch_p2p_all_reduce_residual_rmsnorm_virtual(const P2PResidualRMSNormParams& p, void* const* outs,
                                                    void* const* new_residuals, cudaStream_t stream) {
  if (outs == nullptr || new_residuals == nullptr) {
    fail("launch_p2p_all_reduce_residual_rmsnorm_virtual", "outs and new_residuals must not be nullptr");
  }
  norm_impl(p, outs, new_residuals, stream);
}

int64_t rmsnorm_backward_blocks(int64_t rows) { return std::clamp<int64_t>(rows, 1, kBackwardMaxBlocks); }

void launch_rmsnorm_backward(const RMSNormBackwardParams& p, cudaStream_t stream) {
  const char* fn = "launch_rmsnorm_backward";
  if (p.rows < 0 || p.hidden < 0) {
    fail(fn,
         "rows and hidden must be >= 0, got rows=" + std::to_string(p.rows) + ", hidden=" + std::to_string(p.hidden));
  }
  check_dtype(fn, p.dtype);
  if (p.hidden == 0) return;
  if (p.grad_weight_partial == nullptr || p.weight == nullptr)
    fail(fn, "grad_weight_partial and weight must not be nullptr");
  if (p.rows > 0 && (p.grad_out == nullptr || p.h == nullptr || p.grad_h == nullptr)) {
    fail(fn, "grad_out, h and grad_h must not be nullptr for rows > 0");
  }
  // rows == 0 still launches: the partials must come back zeroed.
  const unsigned grid = static_cast<unsigned>(rmsnorm_backward_blocks(p.rows));
  const unsigned threads = norm_threads(p.hidden, kBackwardThreads);
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const T* dy = static_cast<const T*>(p.grad_out);
    const T* din = static_cast<const T*>(p.grad_h_in);
    const T* h = static_cast<const T*>(p.h);
    const T* w = static_cast<const T*>(p.weight);
    T* dh = static_cast<T*>(p.grad_h);
    A* part = static_cast<A*>(p.grad_weight_partial);
    if (din)
      rmsnorm_backward_kernel<T, true><<<grid, threads, 0, stream>>>(dy, din, h, w, dh, part, p.rows, p.hidden, p.eps);
    else
      rmsnorm_backward_kernel<T, false><<<grid, threads, 0, stream>>>(dy, din, h, w, dh, part, p.rows, p.hidden, p.eps);
    TPEXT_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace tpext::kernels
