// Collectives over peer memory (CUDA P2P / IPC) for small messages, and the fused all-reduce +
// bias + residual + RMSNorm of a transformer block (forward, and the RMSNorm backward for training).
//
// Why. NCCL is the right engine for large messages, but a decode step all-reduces a few KB to a few
// hundred KB per layer, where NCCL's fixed cost (tens of µs) dominates. With every rank's buffer
// mapped into every other rank's address space, one kernel can read all peers' data directly and sum
// it, with one flag write + one flag wait per block as the only synchronisation.
//
// Contract (host side; plain C++, no device code here, so g++ can include it):
//  * A P2PGroup is a table of R <= 8 symmetric buffers (buffers[p] = rank p's data buffer as this
//    process addresses it) plus, for device synchronisation, R signal areas of kSignalBytes each,
//    zeroed before first use. Inputs are in buffers[*] before the launch (the caller copies them in
//    on the same stream); outputs go to separate pointers that no peer reads.
//  * Two ways to synchronise the ranks, chosen by the launcher used:
//      - device (launch_p2p_*): one launch per rank, on its own GPU; blocks signal their peers through
//        the signal areas (st.release.sys / ld.acquire.sys), no host synchronisation. Every rank must
//        launch the same calls with the same sizes in the same order on one stream, or the kernels
//        wait for each other until the timeout (below). The barrier epochs live in device memory (one
//        counter per block, advanced by the kernel itself), so launches captured in a CUDA graph stay
//        correct on replay.
//      - host (launch_p2p_*_virtual): R "virtual ranks" whose buffers live on the current device; the
//        phases are launched one after another on one stream, so stream order is the barrier and no
//        kernel ever waits for another (cannot deadlock). Signals are unused.
//    Both run the same kernels with the same pointer tables; only the barrier differs.
//  * Arithmetic: every output element is sum_{p = 0..R-1} in[p] in that fixed order, accumulated in
//    fp32 (fp64 for kFloat64), rounded once to the storage type. Every rank sums in the same order
//    with the same grid, so all ranks get bitwise identical results.
//  * 16-byte vector accesses when every pointer (and, per op, the segment/row length) allows; else an
//    element-wise kernel. Lengths that are not multiples of the vector width are handled element-wise
//    at the end. Indexing is 64-bit.
//  * Bounded waits (device sync). A block that waits longer than group.timeout_ns for a peer gives up:
//    it stores an abort code (p2p_abort::encode: what, which op, rank, peer, barrier, block) into the
//    abort word of every rank's signal area, so every rank's blocks stop waiting too, and into
//    group.host_abort, a host-mapped word this rank's host reads without synchronising. A block that
//    finds its rank's abort word set (at launch, or while waiting) returns at once and copies the code
//    to host_abort. After an abort the outputs of the aborted launches are undefined and the signal
//    areas inconsistent: the group's buffers must be made anew (the host refuses them until then).
//  * Grid: at most group.max_blocks blocks (agreed by all ranks, at most what every rank's GPU holds at
//    once, p2p_max_coresident_blocks), so every block of a launch is resident while it waits.
//  * Throws std::runtime_error (never exits) on a bad argument or a CUDA error; no synchronisation.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "epilogue.h"  // DType

namespace tpext::kernels {

constexpr int kP2PMaxRanks = 8;
// Upper bound on the grid of every device-synchronised launch: each block owns one signal slot per
// peer. A block waits only on the blocks of the same index on the other ranks (other GPUs), never on
// another block of its own GPU, so progress needs only that each GPU runs its blocks in index order,
// not that all of them are resident at once.
constexpr int kP2PMaxBlocks = 64;
// One rank's signal area: [kP2PMaxBlocks][kP2PMaxRanks] flags (slot [b][q] is written by rank q's
// block b and read by this rank's block b), then [kP2PMaxBlocks] epoch counters (block b's launches so
// far, read and advanced only by this rank's block b), then the abort word (0, or the first abort code
// any rank stored into it).
constexpr size_t kP2PFlagWords = static_cast<size_t>(kP2PMaxBlocks) * kP2PMaxRanks;
constexpr size_t kP2PAbortWord = kP2PFlagWords + kP2PMaxBlocks;
constexpr size_t kP2PSignalBytes = sizeof(uint32_t) * (kP2PAbortWord + 1);

struct P2PGroup {
  void* buffers[kP2PMaxRanks];      // rank p's symmetric data buffer, as this process addresses it
  uint32_t* signals[kP2PMaxRanks];  // rank p's signal area (device sync only; nullptr in virtual mode)
  int32_t world;                    // R, 1..8
  int32_t rank;                     // this rank (device sync); ignored by the virtual launchers
  uint32_t* host_abort;             // device sync: device address of this rank's host-mapped abort word
  uint64_t timeout_ns;              // device sync: longest wait of one block for one peer; 0 = unbounded
  int32_t max_blocks;               // grid cap, 1..kP2PMaxBlocks, the same on every rank; 0 = kP2PMaxBlocks
};

// What the device-synchronised kernels report in an abort code.
enum class P2POp : uint32_t {
  kAllReduceOneShot = 1,
  kAllReduceTwoShot = 2,
  kReduceScatter = 3,
  kAllGather = 4,
  kResidualRMSNorm = 5,
};

#ifdef __CUDACC__
#define TPEXT_P2P_HD __host__ __device__
#else
#define TPEXT_P2P_HD
#endif

// Abort codes: bit 31 set; kind (bits 24-27), op (16-23), the rank that stored it (12-15), the peer it
// waited for (8-11), the barrier (6-7) and the block (0-5) of the wait that gave up. Decoded on the host.
namespace p2p_abort {
static_assert(kP2PMaxBlocks <= 64 && kP2PMaxRanks <= 16, "abort codes hold a block in 6 bits, a rank in 4");
constexpr uint32_t kTimeout = 1;  // a block waited timeout_ns for a peer
constexpr uint32_t kRefused = 2;  // a rank's host refused a call its peers may have launched (peer, barrier, block: 0)
TPEXT_P2P_HD constexpr uint32_t encode(uint32_t kind, P2POp op, int rank, int peer, int barrier, int block) {
  return 0x80000000u | ((kind & 0xFu) << 24) | ((static_cast<uint32_t>(op) & 0xFFu) << 16) |
         ((static_cast<uint32_t>(rank) & 0xFu) << 12) | ((static_cast<uint32_t>(peer) & 0xFu) << 8) |
         ((static_cast<uint32_t>(barrier) & 0x3u) << 6) | (static_cast<uint32_t>(block) & 0x3Fu);
}
constexpr uint32_t kind(uint32_t c) { return (c >> 24) & 0xFu; }
constexpr P2POp op(uint32_t c) { return static_cast<P2POp>((c >> 16) & 0xFFu); }
constexpr int rank(uint32_t c) { return static_cast<int>((c >> 12) & 0xFu); }
constexpr int peer(uint32_t c) { return static_cast<int>((c >> 8) & 0xFu); }
constexpr int barrier(uint32_t c) { return static_cast<int>((c >> 6) & 0x3u); }
constexpr int block(uint32_t c) { return static_cast<int>(c & 0x3Fu); }
}  // namespace p2p_abort

// The largest grid of a device-synchronised launch whose blocks are all resident at once on `device`
// (occupancy of every such kernel at its largest block x SM count), at most kP2PMaxBlocks. Sets no
// device state beyond the occupancy queries (the caller selects `device`).
int p2p_max_coresident_blocks(int device);

enum class P2PAlgo : int32_t {
  kOneShot = 1,  // each rank reads all R inputs in full: 1 barrier round trip, R x numel read per rank
  kTwoShot = 2,  // reduce-scatter then all-gather through the buffers: 2 rounds, 2 x numel read per rank
};

struct P2PAllReduceParams {
  P2PGroup group;
  void* out;  // [numel], this rank's result (virtual: out[r] given per launch, see below)
  int64_t numel;
  DType dtype;
  P2PAlgo algo;
};

// out[i] = sum_p buffers[p][i]. kTwoShot writes the reduced segment of this rank back into
// buffers[rank] (the buffers are scratch after the call).
void launch_p2p_all_reduce(const P2PAllReduceParams& p, cudaStream_t stream);
// Virtual ranks: outs[r] receives rank r's result, r = 0..world-1.
void launch_p2p_all_reduce_virtual(const P2PAllReduceParams& p, void* const* outs, cudaStream_t stream);

struct P2PScatterGatherParams {
  P2PGroup group;
  void* out;
  int64_t numel;  // reduce-scatter: numel of each input (R x the output); all-gather: of each input
  DType dtype;
};

// Reduce-scatter: out[i] = sum_p buffers[p][rank * numel / R + i], numel divisible by R.
void launch_p2p_reduce_scatter(const P2PScatterGatherParams& p, cudaStream_t stream);
void launch_p2p_reduce_scatter_virtual(const P2PScatterGatherParams& p, void* const* outs, cudaStream_t stream);
// All-gather: out[p * numel + i] = buffers[p][i].
void launch_p2p_all_gather(const P2PScatterGatherParams& p, cudaStream_t stream);
void launch_p2p_all_gather_virtual(const P2PScatterGatherParams& p, void* const* outs, cudaStream_t stream);

// Fused all-reduce + bias + residual + RMSNorm over [rows, hidden] row-major tensors (one block per
// row). Per element, in this order, accumulated in fp32 (fp64 for kFloat64):
//   h   = round(sum_p buffers[p][row, j] + bias[j] + residual[row, j])     -> new_residual
//   out = round(float(h) * rstd(row) * float(weight[j])),  rstd = 1 / sqrt(mean_j float(h)^2 + eps)
// i.e. out == rms_norm(new_residual) exactly as an unfused rms_norm of the stored new_residual would
// see it. bias may be nullptr; residual may be nullptr (then h is the reduced sum plus bias).
struct P2PResidualRMSNormParams {
  P2PGroup group;
  const void* residual;  // [rows, hidden] or nullptr; may equal new_residual (in place) with device sync,
                         // must not equal any new_residuals[r] with virtual ranks (rank 0 would overwrite it)
  const void* bias;      // [hidden] or nullptr
  const void* weight;    // [hidden]
  void* out;             // [rows, hidden]
  void* new_residual;    // [rows, hidden]
  int64_t rows, hidden;
  double eps;  // rounded to the accumulation type in the kernel (fp64 keeps it exact)
  DType dtype;
};

void launch_p2p_all_reduce_residual_rmsnorm(const P2PResidualRMSNormParams& p, cudaStream_t stream);
// Virtual ranks: outs[r] / new_residuals[r] receive rank r's outputs (the residual is shared).
void launch_p2p_all_reduce_residual_rmsnorm_virtual(const P2PResidualRMSNormParams& p, void* const* outs,
                                                    void* const* new_residuals, cudaStream_t stream);

// Backward of out = rms_norm(h) * weight (plus a gradient arriving at h directly, from new_residual):
//   n = h * rstd,  g = grad_out * weight
//   grad_h = rstd * (g - n * mean_j(g * n)) + grad_h_in
//   grad_weight_partial[b, j] = sum over the rows block b handled of grad_out * n
// Local (no peers). grad_weight = grad_weight_partial.sum(0) (the caller reduces the
// rmsnorm_backward_blocks(rows) rows, in fp32, fp64 for kFloat64). grad_h_in may be nullptr.
struct RMSNormBackwardParams {
  const void* grad_out;       // [rows, hidden]
  const void* grad_h_in;      // [rows, hidden] or nullptr
  const void* h;              // [rows, hidden], the normalised input (new_residual)
  const void* weight;         // [hidden]
  void* grad_h;               // [rows, hidden]
  void* grad_weight_partial;  // [rmsnorm_backward_blocks(rows), hidden], fp32 (fp64 for kFloat64)
  int64_t rows, hidden;
  double eps;
  DType dtype;
};

int64_t rmsnorm_backward_blocks(int64_t rows);
void launch_rmsnorm_backward(const RMSNormBackwardParams& p, cudaStream_t stream);

}  // namespace tpext::kernels
