// GEMM + all-reduce (the row-parallel linear layer's forward), torch-free, timed in isolation.
//
// Every rank r runs P_r = x_r @ w_r^T with x_r [m, k] (its slice of the K dimension) and w_r [n, k];
// the output y = sum_r P_r [m, n] lands on every rank. Schedules (those of csrc/schedule and docs/cuda.md):
//  * sequential (the baseline): one GEMM on lane 0, then one all-reduce on the comm stream;
//  * chunked: the m rows are cut into c near-even chunks (split_rows; m need not divide by c); chunk
//    j's GEMM writes its rows of P_r on lane j % streams, and the all-reduce of those rows is issued on
//    the comm stream as soon as that GEMM is done, so it overlaps the GEMMs of chunks j + 1, ...
// The GEMM writes straight into the buffer the collective reads; the collective writes a separate
// output (tpext's virtual P2P launchers need out != buffers, and NCCL's out-of-place call costs the same).
//
// usage: tpext_bench_gemm_all_reduce [--gpus N | --virtual-ranks R] [--m LIST] [--n LIST] [--k LIST]
//          [--dtype bf16|fp16|fp32] [--chunks LIST] [--streams LIST] [--warmup N] [--iters N] [--check]
//          [--json PATH]      (docs/benchmarks-cuda.md)
// Needs cuBLAS and NCCL: CMake links them where found and compiles this file without linking otherwise.
#include "common/driver.cuh"

#include <cublas_v2.h>
#include <nccl.h>

#include <cmath>
#include <vector>

namespace {

using namespace tpext::bench;

class GemmAllReduce final : public Op {
 public:
  const char* name() const override { return "gemm_all_reduce"; }

  void setup(Ranks& rk, const Shape& s) override {
    rk_ = &rk;
    s_ = s;
    x_ = rk.alloc_each(s.m * s.k);
    w_ = rk.alloc_each(s.n * s.k);
    part_ = rk.alloc_each(s.m * s.n);
    out_ = rk.alloc_each(s.m * s.n);
    out_seq_ = rk.alloc_each(s.m * s.n);
    rk.fill_each(x_, s.m * s.k, 2, 0);
    rk.fill_each(w_, s.n * s.k, 2, 1);
  }

  int64_t chunk_rows() const override { return s_.m; }

  void gemm_alone() override {
    for (int r = 0; r < rk_->world(); ++r) rk_->gemm(r, 0, gemm_rows(r, 0, s_.m));
  }

  void comm_alone() override { rk_->all_reduce(part_, out_, s_.m * s_.n); }

  void run(int chunks, int lanes, bool seq) override {
    const DtypeInfo& dt = rk_->dtype();
    const int world = rk_->world();
    const int64_t c = tpext::effective_chunks(s_.m, chunks);
    std::vector<void*> send(world), recv(world);
    for (int64_t j = 0; j < c; ++j) {
      const tpext::RowRange rows = tpext::split_rows(s_.m, c, j);
      const int lane = lanes == 2 ? static_cast<int>(j % 2) : 0;
      for (int r = 0; r < world; ++r) rk_->gemm(r, lane, gemm_rows(r, rows.begin, rows.size));
      rk_->comm_waits_lane(static_cast<int>(j), lane);
      for (int r = 0; r < world; ++r) {
        send[r] = advance(part_[r], rows.begin * s_.n, dt);
        recv[r] = advance(seq ? out_seq_[r] : out_[r], rows.begin * s_.n, dt);
      }
      rk_->all_reduce(send, recv, rows.size * s_.n);
    }
  }

  void reset(bool seq) override {
    for (int r = 0; r < rk_->world(); ++r) {
      rk_->set_device(r);
      const size_t bytes = s_.m * s_.n * rk_->dtype().size;
      TPEXT_CUDA_CHECK(cudaMemsetAsync(part_[r], 0xFF, bytes, rk_->ctx(r).lanes[0]));
      TPEXT_CUDA_CHECK(cudaMemsetAsync(seq ? out_seq_[r] : out_[r], 0xFF, bytes, rk_->ctx(r).lanes[0]));
    }
  }

  const void* output(int r, bool seq) const override { return seq ? out_seq_[r] : out_[r]; }
  int64_t output_rows() const override { return s_.m; }
  int64_t output_cols() const override { return s_.n; }

  RefValue reference(int /*r*/, int64_t i, int64_t j) const override {
    const DtypeInfo& dt = rk_->dtype();
    return summed_dot_reference(dt, rk_->world(), i, j, s_.k);
  }

  int summed_ranks() const override { return rk_->world(); }
  int64_t inner() const override { return s_.k; }
  double device_flops() const override { return 2.0 * s_.m * s_.n * s_.k * rk_->ranks_per_device(); }
  // nccl-tests' all-reduce: algbw bytes = the buffer, bus factor 2 (R - 1) / R.
  double bus_bytes() const override {
    const double r = rk_->world();
    return static_cast<double>(s_.m * s_.n * rk_->dtype().size) * 2.0 * (r - 1) / r;
  }

 private:
  // Rows [begin, begin + rows) of P_r = x_r @ w_r^T, written into the collective's buffer.
  GemmArgs gemm_rows(int r, int64_t begin, int64_t rows) const {
    return linear_rows(rk_->dtype(), x_[r], begin, w_[r], part_[r], begin, rows, s_.n, s_.k);
  }

  Ranks* rk_ = nullptr;
  Shape s_{};
  std::vector<void*> x_, w_, part_, out_, out_seq_;
};

}  // namespace

int main(int argc, char** argv) {
  GemmAllReduce op;
  return run_main(argc, argv, op);
}
