// GEMM + reduce-scatter (row-parallel forward with sequence parallelism).
//
// The partial product P = x @ w.T is [M, N], viewed as R blocks of m = M/R rows, block r destined to
// rank r. Chunk j takes rows split_rows(m, c, j) = [b, b+h) of every block: its send buffer is [R, h, N]
// (contiguous, block r first), its result is rows [b, b+h) of this rank's y_shard. One batched GEMM
// per chunk writes straight into the send buffer: x viewed as [R, m, K], rows [b, b+h) of every block
// (a strided batch, no copy), on lane j % lanes; GEMM j+1 runs while the reduce-scatter of chunk j is
// in flight. With c = 1 the chunk is all of P, computed by one GEMM: the sequential algorithm.
#include "schedule/schedule.h"

#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "common/rows.h"

namespace tpext::schedule {

void gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w, at::Tensor& y_shard, comm::Communicator& comm,
                         const Schedule& sched, const RowsEpilogue& epilogue) {
  const int64_t world = comm.size();
  const int64_t m = y_shard.size(0);
  const int64_t n = y_shard.size(1);
  const at::Tensor w_t = w.t();
  const at::Tensor x_blocks = x.view({world, m, x.size(1)});  // block r: the rows destined to rank r

  // One allocation for every chunk's send buffer, on the caller's stream and before the lanes fork
  // (lanes.h): chunk j's buffer is rows [R*b, R*(b+h)), contiguous.
  at::Tensor sends = at::empty({world * m, n}, y_shard.options());
  reduce_chunks(m, sched, y_shard.device(), epilogue, [&](const RowRange& r) {
    at::Tensor send = sends.narrow(0, world * r.begin, world * r.size);
    if (r.size == m) {
      at::mm_out(send, x, w_t);  // one chunk: the blocks are already in rank order
    } else {
      at::Tensor send_blocks = send.view({world, r.size, n});
      batched_gemm_out(send_blocks, x_blocks.narrow(1, r.begin, r.size), w_t);
    }
    at::Tensor y_chunk = y_shard.narrow(0, r.begin, r.size);
    comm::PendingPtr pending = comm.reduce_scatter(y_chunk, send);
    return std::make_pair(y_chunk, std::move(pending));
  });
}

}  // namespace tpext::schedule
