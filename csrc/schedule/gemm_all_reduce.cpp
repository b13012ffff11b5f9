// GEMM + all-reduce (row-parallel forward without sequence parallelism).
//
// Chunk j = output rows split_rows(M, c, j). The loop issues GEMM j (on lane j % lanes), then the
// all-reduce of chunk j, and moves on to GEMM j+1 without waiting: the all-reduces queue up behind
// each other on the communication side while the GEMMs run. Each chunk's epilogue runs on the caller's
// stream once its reduction is done. With c = 1 this is exactly the sequential algorithm: one GEMM,
// one all-reduce.
#include "schedule/schedule.h"

#include <utility>

#include <ATen/ops/mm.h>

#include "common/rows.h"

namespace tpext::schedule {

void gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, comm::Communicator& comm,
                     const Schedule& sched, const RowsEpilogue& epilogue) {
  const at::Tensor w_t = w.t();
  reduce_chunks(x.size(0), sched, y.device(), epilogue, [&](const RowRange& r) {
    // A row slice of a contiguous matrix is contiguous: the GEMM writes straight into the buffer
    // the all-reduce works on, no staging copy.
    at::Tensor y_chunk = y.narrow(0, r.begin, r.size);
    at::mm_out(y_chunk, x.narrow(0, r.begin, r.size), w_t);
    comm::PendingPtr pending = comm.all_reduce(y_chunk);
    return std::make_pair(y_chunk, std::move(pending));
  });
}

}  // namespace tpext::schedule
