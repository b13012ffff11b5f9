// GEMM + reduce-scatter (the row-parallel linear layer's forward with sequence parallelism), torch-free.
//
// Every rank r runs P_r = x_r @ w_r^T with x_r [m, k] and w_r [n, k]; P_r is viewed as R blocks of
// s = m / R rows (m must divide by R), block q destined to rank q, and rank q receives
// y_q = sum_r (block q of P_r) [s, n]. Schedules (csrc/schedule/gemm_reduce_scatter.cpp):
//  * sequential (the baseline): one GEMM into the send buffer (its blocks already in rank order),
//    then one reduce-scatter;
//  * chunked: chunk j = rows split_rows(s, c, j) = [b, b + h) of every block (s need not divide by c).
//    Its send buffer is [R, h, n], contiguous, block q first at (R b + q h) n; the R GEMMs of the chunk
//    write straight into it on lane j % streams, then its reduce-scatter (h n elements per rank) is
//    issued on the comm stream and overlaps the next chunk's GEMMs. The price of the layout: R GEMMs
//    of h rows per chunk instead of one.
//
// usage: tpext_bench_gemm_reduce_scatter [--gpus N | --virtual-ranks R] [--m LIST] [--n LIST]
//          [--k LIST] [--dtype bf16|fp16|fp32] [--chunks LIST] [--streams LIST] [--warmup N] [--iters N]
//          [--check] [--json PATH]      (docs/benchmarks-cuda.md)
// Needs cuBLAS and NCCL: CMake links them where found and compiles this file without linking otherwise.
#include "common/driver.cuh"

#include <cublas_v2.h>
#include <nccl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace tpext::bench;

class GemmReduceScatter final : public Op {
 public:
  const char* name() const override { return "gemm_reduce_scatter"; }

  void setup(Ranks& rk, const Shape& s) override {
    rk_ = &rk;
    s_ = s;
    const int world = rk.world();
    if (s.m % world != 0) {
      throw std::runtime_error("--m: the reduce-scatter gives each of the " + std::to_string(world) +
                               " ranks m / R rows, so m must be divisible by " + std::to_string(world) + ", got " +
                               std::to_string(s.m));
    }
    shard_ = s.m / world;
    x_ = rk.alloc_each(s.m * s.k);
    w_ = rk.alloc_each(s.n * s.k);
    send_ = rk.alloc_each(s.m * s.n);
    out_ = rk.alloc_each(shard_ * s.n);
    out_seq_ = rk.alloc_each(shard_ * s.n);
    rk.fill_each(x_, s.m * s.k, 2, 0);
    rk.fill_each(w_, s.n * s.k, 2, 1);
  }

  int64_t chunk_rows() const override { return shard_; }

  void gemm_alone() override {
    for (int r = 0; r < rk_->world(); ++r) rk_->gemm(r, 0, gemm_rows(r, 0, 0, s_.m));
  }

  void comm_alone() override { rk_->reduce_scatter(send_, out_, shard_ * s_.n); }

  void run(int chunks, int lanes, bool seq) override {
    const DtypeInfo& dt = rk_->dtype();
    const int world = rk_->world();
    const int64_t c = tpext::effective_chunks(shard_, chunks);
    std::vector<void*> send(world), recv(world);
    for (int64_t j = 0; j < c; ++j) {
      const tpext::RowRange rows = tpext::split_rows(shard_, c, j);
      const int lane = lanes == 2 ? static_cast<int>(j % 2) : 0;
      for (int r = 0; r < world; ++r) {
        if (c == 1) {
          rk_->gemm(r, lane, gemm_rows(r, 0, 0, s_.m));
          continue;
        }
        for (int q = 0; q < world; ++q) {
          rk_->gemm(r, lane, gemm_rows(r, q * shard_ + rows.begin, world * rows.begin + q * rows.size, rows.size));
        }
      }
      rk_->comm_waits_lane(static_cast<int>(j), lane);
      for (int r = 0; r < world; ++r) {
        send[r] = advance(send_[r], world * rows.begin * s_.n, dt);
        recv[r] = advance(seq ? out_seq_[r] : out_[r], rows.begin * s_.n, dt);
      }
      rk_->reduce_scatter(send, recv, rows.size * s_.n);
    }
  }

  void reset(bool seq) override {
    const size_t elem = rk_->dtype().size;
    for (int r = 0; r < rk_->world(); ++r) {
      rk_->set_device(r);
      TPEXT_CUDA_CHECK(cudaMemsetAsync(send_[r], 0xFF, s_.m * s_.n * elem, rk_->ctx(r).lanes[0]));
      TPEXT_CUDA_CHECK(cudaMemsetAsync(seq ? out_seq_[r] : out_[r], 0xFF, shard_ * s_.n * elem, rk_->ctx(r).lanes[0]));
    }
  }

  const void* output(int r, bool seq) const override { return seq ? out_seq_[r] : out_[r]; }
  int64_t output_rows() const override { return shard_; }
  int64_t output_cols() const override { return s_.n; }

  // y_r[i, j] = sum_q P_q[r s + i, j].
  RefValue reference(int r, int64_t i, int64_t j) const override {
    const DtypeInfo& dt = rk_->dtype();
    const int64_t row = r * shard_ + i;
    return summed_dot_reference(dt, rk_->world(), row, j, s_.k);
  }

  int summed_ranks() const override { return rk_->world(); }
  int64_t inner() const override { return s_.k; }
  double device_flops() const override { return 2.0 * s_.m * s_.n * s_.k * rk_->ranks_per_device(); }
  // nccl-tests' reduce-scatter: algbw bytes = R x the received count, bus factor (R - 1) / R.
  double bus_bytes() const override {
    const double r = rk_->world();
    return static_cast<double>(s_.m * s_.n * rk_->dtype().size) * (r - 1) / r;
  }

 private:
  // `rows` rows of P_r from x_r's row x_row, written at row send_row of rank r's send buffer.
  GemmArgs gemm_rows(int r, int64_t x_row, int64_t send_row, int64_t rows) const {
    return linear_rows(rk_->dtype(), x_[r], x_row, w_[r], send_[r], send_row, rows, s_.n, s_.k);
  }

  Ranks* rk_ = nullptr;
  Shape s_{};
  int64_t shard_ = 0;
  std::vector<void*> x_, w_, send_, out_, out_seq_;
};

}  // namespace

int main(int argc, char** argv) {
  GemmReduceScatter op;
  return run_main(argc, argv, op);
}
