// Host-side pipelines: the GEMM of one row chunk overlaps the collective of another.
//
// All tensors are 2-D, row-major contiguous outputs preallocated by csrc/ops. w is [N, K] (nn.Linear
// layout, any strides). R = comm.size(). The same code serves gloo (collectives run on gloo's
// threads while this thread runs the next GEMM) and CUDA (chunk GEMMs on one or two compute lanes,
// collectives on the communication stream, events between them; wait() orders streams without a host
// sync, so the loop is CUDA-graph capturable). Streams and lanes: csrc/schedule/lanes.h, docs/cuda.md.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>

#include "comm/communicator.h"
#include "common/rows.h"
#include "schedule/lanes.h"

namespace tpext::schedule {

// How the loop is arranged. Chosen in Python (tpext.ops.Algorithm mirrors the values, which are
// part of the op schemas) and passed down with the chunk count.
enum class Algorithm : int64_t {
  kSequential = 0,         // one GEMM, then one collective (or the reverse for all-gather); chunks must be 1
  kChunkedPipeline = 1,    // row chunks; the collective of chunk i overlaps the GEMM of chunk i+1
  kChunkedTwoStreams = 2,  // as kChunkedPipeline, chunk GEMMs alternating between two compute streams
                           // (CUDA; on CPU identical to kChunkedPipeline)
};
constexpr int64_t kNumAlgorithms = 3;

inline const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::kSequential: return "sequential";
    case Algorithm::kChunkedPipeline: return "chunked_pipeline";
    case Algorithm::kChunkedTwoStreams: return "chunked_two_streams";
  }
  return "unknown";
}

// A schedule: the algorithm and the chunk count the op was given (validated by csrc/ops; tpext.ops.Schedule).
struct Schedule {
  Algorithm algorithm;
  int64_t chunks;

  // Chunks actually used for `rows` rows (1 for kSequential, or when rows allow no more).
  int64_t chunks_for(int64_t rows) const {
    return algorithm == Algorithm::kSequential ? 1 : effective_chunks(rows, chunks);
  }
  // Compute streams the chunk GEMMs alternate over.
  int64_t lanes_for(int64_t rows) const {
    return algorithm == Algorithm::kChunkedTwoStreams && chunks_for(rows) > 1 ? 2 : 1;
  }
};

// Applied to each block of finished output rows exactly once, after its collective completed
// (e.g. "add bias and residual once, after the reduction"); first_row is the block's first row in the
// op's output. Runs on the current stream (or thread) at the call, which is ordered after the rows are
// final. May be empty.
using RowsEpilogue = std::function<void(at::Tensor& rows, int64_t first_row)>;

// out[i] = x[i] @ w_t for every i of a batch: x [B, rows, K] and out [B, rows, N] are strided views
// (any batch stride; rows of K and N elements), w_t is [K, N], shared by every item (expanded with
// batch stride 0, no copy). One GEMM call for the whole batch: one strided-batched cuBLAS launch on
// CUDA where a loop of mm would make B. Each element is one dot product over K, as in mm.
inline void batched_gemm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_t) {
  at::bmm_out(out, x, w_t.unsqueeze(0).expand({x.size(0), w_t.size(0), w_t.size(1)}));
}

// The chunk loop of the GEMM + reduction ops (gemm_all_reduce, gemm_reduce_scatter). For chunk j, rows
// r = split_rows(rows, c, j): issue(r) runs the chunk's GEMM on lane j % lanes and starts its reduction,
// returning the output rows the reduction writes and the pending collective; the next chunk's GEMM does not
// wait for it. Then the reductions are waited for in chunk order, each one's rows handed to `epilogue`
// (first row: r.begin) on the caller's stream. Buffers issue() uses must be allocated before the call (lanes.h).
template <typename Issue>
void reduce_chunks(int64_t rows, const Schedule& sched, const c10::Device& device, const RowsEpilogue& epilogue,
                   Issue&& issue) {
  const int64_t c = sched.chunks_for(rows);
  std::vector<std::pair<at::Tensor, comm::PendingPtr>> chunks;
  chunks.reserve(c);
  ComputeLanes lanes(device, sched.lanes_for(rows));
  for (int64_t j = 0; j < c; ++j) {
    auto on_lane = lanes.enter(j);
    chunks.push_back(issue(split_rows(rows, c, j)));
  }
  for (int64_t j = 0; j < c; ++j) {
    chunks[j].second->wait();
    if (epilogue) epilogue(chunks[j].first, split_rows(rows, c, j).begin);
  }
  lanes.join();
}

// y[M, N] = all_reduce(x[M, K] @ w.T)
void gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, comm::Communicator& comm,
                     const Schedule& sched, const RowsEpilogue& epilogue);

// y_shard[M/R, N] = rows [rank*M/R, (rank+1)*M/R) of reduce_scatter_dim0(x[M, K] @ w.T)
void gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w, at::Tensor& y_shard, comm::Communicator& comm,
                         const Schedule& sched, const RowsEpilogue& epilogue);

// x_full[R*m, K] = all_gather_dim0(x_shard[m, K]);  y[R*m, N] = x_full @ w.T
void all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w, at::Tensor& x_full, at::Tensor& y,
                     comm::Communicator& comm, const Schedule& sched, const RowsEpilogue& epilogue);

}  // namespace tpext::schedule
