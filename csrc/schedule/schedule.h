// Host-side pipelines: the GEMM of one row chunk overlaps the collective of another.
//
// All tensors are 2-D, row-major contiguous outputs preallocated by csrc/ops. w is [N, K] (nn.Linear
// layout, any strides). R = comm.size(). The same code serves gloo (collectives run on gloo's
// threads while this thread runs the next GEMM) and NCCL (collectives on NCCL's stream while the
// current stream runs the next GEMM; wait() orders streams without a host sync).
#pragma once

#include <cstdint>
#include <functional>

#include <ATen/core/Tensor.h>

#include "comm/communicator.h"
#include "common/rows.h"

namespace tpext::schedule {

// How the loop is arranged. Chosen from `chunks` today (1 -> sequential); Python policy will pick
// it explicitly once there is more than one pipelined algorithm per op.
enum class Algorithm : int64_t {
  kSequential = 0,       // one GEMM, then one collective (or the reverse for all-gather)
  kChunkedPipeline = 1,  // row chunks; the collective of chunk i overlaps the GEMM of chunk i+1
};

inline Algorithm algorithm_for(int64_t rows, int64_t chunks) {
  return effective_chunks(rows, chunks) == 1 ? Algorithm::kSequential : Algorithm::kChunkedPipeline;
}

// Applied to each block of finished output rows exactly once, after its collective completed
// (e.g. "add bias once, after the reduction"). May be empty.
using RowsEpilogue = std::function<void(at::Tensor& rows)>;

// y[M, N] = all_reduce(x[M, K] @ w.T)
void gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, comm::Communicator& comm,
                     int64_t chunks, const RowsEpilogue& epilogue);

// y_shard[M/R, N] = rows [rank*M/R, (rank+1)*M/R) of reduce_scatter_dim0(x[M, K] @ w.T)
void gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w, at::Tensor& y_shard,
                         comm::Communicator& comm, int64_t chunks, const RowsEpilogue& epilogue);

// x_full[R*m, K] = all_gather_dim0(x_shard[m, K]);  y[R*m, N] = x_full @ w.T
void all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w, at::Tensor& x_full, at::Tensor& y,
                     comm::Communicator& comm, int64_t chunks, const RowsEpilogue& epilogue);

}  // namespace tpext::schedule
