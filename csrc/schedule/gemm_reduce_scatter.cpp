// GEMM + reduce-scatter (row-parallel forward with sequence parallelism).
//
// The partial product P = x @ w.T is [M, N], viewed as R blocks of m = M/R rows, block r destined to
// rank r. Chunk j takes rows split_rows(m, c, j) of every block: its send buffer is [R, h, N]
// (contiguous, block r first), its result is rows [b, b+h) of this rank's y_shard. GEMM j+1 runs
// while the reduce-scatter of chunk j is in flight. With c = 1 the chunk is all of P, computed by one
// GEMM: the sequential algorithm.
#include "schedule/schedule.h"

#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "common/rows.h"

namespace tpext::schedule {

void gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w, at::Tensor& y_shard,
                         comm::Communicator& comm, int64_t chunks, const RowsEpilogue& epilogue) {
  const int64_t world = comm.size();
  const int64_t m = y_shard.size(0);
  const int64_t n = y_shard.size(1);
  const int64_t c = effective_chunks(m, chunks);
  const at::Tensor w_t = w.t();

  std::vector<at::Tensor> sends;  // kept alive until their reduce-scatter completed
  std::vector<at::Tensor> y_chunks;
  std::vector<comm::PendingPtr> pending;
  sends.reserve(c);
  y_chunks.reserve(c);
  pending.reserve(c);
  for (int64_t j = 0; j < c; ++j) {
    const RowRange r = split_rows(m, c, j);
    at::Tensor send = at::empty({world * r.size, n}, y_shard.options());
    if (r.size == m) {
      at::mm_out(send, x, w_t);  // one chunk: the blocks are already in rank order
    } else {
      for (int64_t dst = 0; dst < world; ++dst) {
        at::Tensor block = send.narrow(0, dst * r.size, r.size);
        at::mm_out(block, x.narrow(0, dst * m + r.begin, r.size), w_t);
      }
    }
    y_chunks.push_back(y_shard.narrow(0, r.begin, r.size));
    pending.push_back(comm.reduce_scatter(y_chunks.back(), send));
    sends.push_back(std::move(send));
  }
  for (int64_t j = 0; j < c; ++j) {
    pending[j]->wait();
    if (epilogue) epilogue(y_chunks[j]);
  }
}

}  // namespace tpext::schedule
