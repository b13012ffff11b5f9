// All-gather + GEMM (column-parallel forward with sequence parallelism).
//
// x_full is [R, m, K] (rank-major) and y is [R, m, N]. Sequential: gather everything, one GEMM.
// Chunked pipeline: all c gathers are issued first (chunk j = rows split_rows(m, c, j) of every
// rank's block, received straight into x_full); while they are in flight this rank multiplies its
// own block, which needs no communication; then for each chunk j, on lane j % lanes, it waits for
// gather j and multiplies the other ranks' rows of that chunk while gathers j+1.. are still in flight.
#include "schedule/schedule.h"

#include <vector>

#include <ATen/ops/mm.h>

#include "common/rows.h"

namespace tpext::schedule {

void all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w, at::Tensor& x_full, at::Tensor& y,
                     comm::Communicator& comm, const Plan& plan, const RowsEpilogue& epilogue) {
  const int64_t world = comm.size();
  const int64_t rank = comm.rank();
  const int64_t m = x_shard.size(0);
  const at::Tensor w_t = w.t();
  at::Tensor x_shard_mutable = x_shard;  // c10d takes non-const references; the input is only read

  auto gather_rows = [&](const RowRange& r) {
    std::vector<at::Tensor> outs;
    outs.reserve(world);
    for (int64_t src = 0; src < world; ++src) outs.push_back(x_full.narrow(0, src * m + r.begin, r.size));
    at::Tensor in = x_shard_mutable.narrow(0, r.begin, r.size);
    return comm.all_gather(outs, in);
  };
  auto gemm_rows = [&](int64_t first_row, int64_t size, const at::Tensor& x_rows) {
    at::Tensor y_rows = y.narrow(0, first_row, size);
    at::mm_out(y_rows, x_rows, w_t);
    if (epilogue) epilogue(y_rows, first_row);
  };

  const int64_t c = plan.chunks_for(m);
  if (c == 1) {
    gather_rows({0, m})->wait();
    gemm_rows(0, world * m, x_full);
    return;
  }

  std::vector<comm::PendingPtr> pending;
  pending.reserve(c);
  for (int64_t j = 0; j < c; ++j) pending.push_back(gather_rows(split_rows(m, c, j)));
  ComputeLanes lanes(y.device(), plan.lanes_for(m));
  {
    auto on_lane = lanes.enter(1);  // lane 1 when there are two: lane 0 starts on chunk 0's rows
    gemm_rows(rank * m, m, x_shard);
  }
  for (int64_t j = 0; j < c; ++j) {
    const RowRange r = split_rows(m, c, j);
    auto on_lane = lanes.enter(j);
    pending[j]->wait();
    for (int64_t src = 0; src < world; ++src) {
      if (src == rank) continue;
      const int64_t first = src * m + r.begin;
      gemm_rows(first, r.size, x_full.narrow(0, first, r.size));
    }
  }
  lanes.join();
}

}  // namespace tpext::schedule
