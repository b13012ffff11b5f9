// GEMM + all-reduce (row-parallel forward without sequence parallelism).
//
// Chunk j = output rows split_rows(M, c, j). The loop issues GEMM j (on lane j % lanes), then the
// all-reduce of chunk j, and moves on to GEMM j+1 without waiting: the all-reduces queue up behind
// each other on the communication side while the GEMMs run. Each chunk's epilogue runs on the caller's
// stream once its reduction is done. With c = 1 this is exactly the sequential algorithm: one GEMM,
// one all-reduce.
#include "schedule/schedule.h"

#include <vector>

#include <ATen/ops/mm.h>

#include "common/rows.h"

namespace tpext::schedule {

void gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, comm::Communicator& comm,
                     const Schedule& sched, const RowsEpilogue& epilogue) {
  const int64_t rows = x.size(0);
  const int64_t c = sched.chunks_for(rows);
  const at::Tensor w_t = w.t();

  std::vector<at::Tensor> y_chunks;
  std::vector<comm::PendingPtr> pending;
  y_chunks.reserve(c);
  pending.reserve(c);
  ComputeLanes lanes(y.device(), sched.lanes_for(rows));
  for (int64_t j = 0; j < c; ++j) {
    const RowRange r = split_rows(rows, c, j);
    auto on_lane = lanes.enter(j);
    // A row slice of a contiguous matrix is contiguous: the GEMM writes straight into the buffer
    // the all-reduce works on, no staging copy.
    y_chunks.push_back(y.narrow(0, r.begin, r.size));
    at::mm_out(y_chunks.back(), x.narrow(0, r.begin, r.size), w_t);
    pending.push_back(comm.all_reduce(y_chunks.back()));
  }
  for (int64_t j = 0; j < c; ++j) {
    pending[j]->wait();
    if (epilogue) epilogue(y_chunks[j], split_rows(rows, c, j).begin);
  }
  lanes.join();
}

}  // namespace tpext::schedule
