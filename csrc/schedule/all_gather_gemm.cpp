// All-gather + GEMM (column-parallel forward with sequence parallelism).
//
// x_full is [R, m, K] (rank-major) and y is [R, m, N]. Sequential: gather everything, one GEMM.
// Chunked pipeline: all c gathers are issued first (chunk j = rows split_rows(m, c, j) = [b, b+h) of
// every rank's block, received straight into x_full); then for each chunk j, on lane j % lanes, it
// waits for gather j and multiplies rows [b, b+h) of every block, this rank's own included, by one
// batched GEMM over x_full and y viewed as [R, m, *] (a strided batch, no copy) while gathers j+1.. are
// still in flight. One GEMM per chunk on every rank: the own block is not multiplied ahead of the
// gathers, since leaving it out of the batch would split the batch in two for every rank but the first
// and the last.
#include "schedule/schedule.h"

#include <vector>

#include <ATen/ops/mm.h>

#include "common/rows.h"

namespace tpext::schedule {

void all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w, at::Tensor& x_full, at::Tensor& y,
                     comm::Communicator& comm, const Schedule& sched, const RowsEpilogue& epilogue) {
  const int64_t world = comm.size();
  const int64_t m = x_shard.size(0);
  const at::Tensor w_t = w.t();
  at::Tensor x_shard_mutable = x_shard;  // c10d takes non-const references; the input is only read

  // Chunk j's receive buffers are rows [src*m + b, src*m + b + h) of x_full, one per source rank, at a
  // fixed stride of m rows: the NCCL communicator receives them with one all-gather (comm/nccl.cpp).
  auto gather_rows = [&](const RowRange& r) {
    std::vector<at::Tensor> outs;
    outs.reserve(world);
    for (int64_t src = 0; src < world; ++src) outs.push_back(x_full.narrow(0, src * m + r.begin, r.size));
    at::Tensor in = x_shard_mutable.narrow(0, r.begin, r.size);
    return comm.all_gather(outs, in);
  };
  auto finish_rows = [&](const RowRange& r) {
    if (!epilogue) return;
    for (int64_t src = 0; src < world; ++src) {
      at::Tensor y_rows = y.narrow(0, src * m + r.begin, r.size);
      epilogue(y_rows, src * m + r.begin);
    }
  };

  const int64_t c = sched.chunks_for(m);
  if (c == 1) {
    gather_rows({0, m})->wait();
    at::mm_out(y, x_full, w_t);
    if (epilogue) epilogue(y, 0);
    return;
  }

  std::vector<comm::PendingPtr> pending;
  pending.reserve(c);
  for (int64_t j = 0; j < c; ++j) pending.push_back(gather_rows(split_rows(m, c, j)));
  const at::Tensor x_blocks = x_full.view({world, m, x_full.size(1)});
  const at::Tensor y_blocks = y.view({world, m, y.size(1)});
  ComputeLanes lanes(y.device(), sched.lanes_for(m));
  for (int64_t j = 0; j < c; ++j) {
    const RowRange r = split_rows(m, c, j);
    auto on_lane = lanes.enter(j);
    pending[j]->wait();
    at::Tensor y_chunk = y_blocks.narrow(1, r.begin, r.size);
    batched_gemm_out(y_chunk, x_blocks.narrow(1, r.begin, r.size), w_t);
    finish_rows(r);
  }
  lanes.join();
}

}  // namespace tpext::schedule
