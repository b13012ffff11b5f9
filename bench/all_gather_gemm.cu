// All-gather + GEMM (the column-parallel linear layer's forward with sequence parallelism), torch-free.
//
// Rank r holds x_r [s, k], s = m / R rows of the sequence (m must divide by R), and w_r [n, k]; the
// ranks gather x = [x_0; x_1; ...] [m, k] and each computes y_r = x @ w_r^T [m, n]. Schedules
// (csrc/schedule/all_gather_gemm.cpp):
//  * sequential (the baseline): one all-gather of everything, then one GEMM of all m rows;
//  * chunked: chunk j = rows split_rows(s, c, j) = [b, b + h) of every rank's block (s need not divide
//    by c). With --gather rank-major (the default, what tpext's schedule does) its rows land where they
//    belong in the rank-major gather buffer (block q's at q s + b), by one broadcast per source rank;
//    with --gather chunk-major they are gathered by one all-gather into [R, h, k] at row R b (block q
//    at R b + q h). All c gathers are issued first on the comm stream, each followed by an event. Meanwhile lane 0
//    multiplies the rank's own block, which needs no communication; then chunk j's GEMMs (the other
//    ranks' h-row blocks) run on lane (j + 1) % streams once gather j's event has fired, overlapping
//    gathers j + 1, ... The first chunk goes to the other lane, so it need not queue behind the own block.
//
// usage: tpext_bench_all_gather_gemm [--gpus N | --virtual-ranks R] [--m LIST] [--n LIST] [--k LIST]
//          [--dtype bf16|fp16|fp32] [--chunks LIST] [--streams LIST] [--gather rank-major|chunk-major]
//          [--warmup N] [--iters N] [--check] [--json PATH]      (docs/benchmarks-cuda.md)
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

class AllGatherGemm final : public Op {
 public:
  const char* name() const override { return "all_gather_gemm"; }

  std::string configure(const Options& o) override {
    rank_major_ = o.rank_major_gather;
    return rank_major_ ? "gather rank-major (as tpext)" : "gather chunk-major";
  }

  void setup(Ranks& rk, const Shape& s) override {
    rk_ = &rk;
    s_ = s;
    const int world = rk.world();
    if (s.m % world != 0) {
      throw std::runtime_error("--m: the all-gather assembles m rows from " + std::to_string(world) +
                               " ranks' m / R rows each, so m must be divisible by " + std::to_string(world) +
                               ", got " + std::to_string(s.m));
    }
    shard_ = s.m / world;
    x_ = rk.alloc_each(shard_ * s.k);
    w_ = rk.alloc_each(s.n * s.k);
    gathered_ = rk.alloc_each(s.m * s.k);
    out_ = rk.alloc_each(s.m * s.n);
    out_seq_ = rk.alloc_each(s.m * s.n);
    rk.fill_each(x_, shard_ * s.k, 2, 0);
    rk.fill_each(w_, s.n * s.k, 2, 1);
  }

  int64_t chunk_rows() const override { return shard_; }

  void gemm_alone() override {
    for (int r = 0; r < rk_->world(); ++r) rk_->gemm(r, 0, gemm_rows(r, gathered_[r], 0, s_.m, out_[r]));
  }

  void comm_alone() override { rk_->all_gather(x_, gathered_, shard_ * s_.k); }

  void run(int chunks, int lanes, bool seq) override {
    const DtypeInfo& dt = rk_->dtype();
    const int world = rk_->world();
    const std::vector<void*>& out = seq ? out_seq_ : out_;
    const int64_t c = tpext::effective_chunks(shard_, chunks);
    if (c == 1) {
      rk_->all_gather(x_, gathered_, shard_ * s_.k);
      rk_->mark_comm(0);
      rk_->lane_waits_comm(0, 0);
      for (int r = 0; r < world; ++r) rk_->gemm(r, 0, gemm_rows(r, gathered_[r], 0, s_.m, out[r]));
      return;
    }
    std::vector<void*> send(world), recv(world);
    std::vector<std::vector<void*>> recv_blocks(world, std::vector<void*>(world));
    for (int64_t j = 0; j < c; ++j) {
      const tpext::RowRange rows = tpext::split_rows(shard_, c, j);
      for (int r = 0; r < world; ++r) {
        send[r] = advance(x_[r], rows.begin * s_.k, dt);
        if (!rank_major_) recv[r] = advance(gathered_[r], gathered_row(0, rows) * s_.k, dt);
        for (int q = 0; rank_major_ && q < world; ++q)
          recv_blocks[r][q] = advance(gathered_[r], gathered_row(q, rows) * s_.k, dt);
      }
      if (rank_major_) {
        rk_->gather_into(send, recv_blocks, rows.size * s_.k);
      } else {
        rk_->all_gather(send, recv, rows.size * s_.k);
      }
      rk_->mark_comm(static_cast<int>(j));
    }
    for (int r = 0; r < world; ++r)
      rk_->gemm(r, 0, gemm_rows(r, x_[r], 0, shard_, advance(out[r], r * shard_ * s_.n, dt)));
    for (int64_t j = 0; j < c; ++j) {
      const tpext::RowRange rows = tpext::split_rows(shard_, c, j);
      const int lane = lanes == 2 ? static_cast<int>((j + 1) % 2) : 0;
      rk_->lane_waits_comm(static_cast<int>(j), lane);
      for (int r = 0; r < world; ++r) {
        for (int q = 0; q < world; ++q) {
          if (q == r) continue;
          void* y = advance(out[r], (q * shard_ + rows.begin) * s_.n, dt);
          rk_->gemm(r, lane, gemm_rows(r, gathered_[r], gathered_row(q, rows), rows.size, y));
        }
      }
    }
  }

  void reset(bool seq) override {
    const size_t elem = rk_->dtype().size;
    for (int r = 0; r < rk_->world(); ++r) {
      rk_->set_device(r);
      TPEXT_CUDA_CHECK(cudaMemsetAsync(gathered_[r], 0xFF, s_.m * s_.k * elem, rk_->ctx(r).lanes[0]));
      TPEXT_CUDA_CHECK(cudaMemsetAsync(seq ? out_seq_[r] : out_[r], 0xFF, s_.m * s_.n * elem, rk_->ctx(r).lanes[0]));
    }
  }

  const void* output(int r, bool seq) const override { return seq ? out_seq_[r] : out_[r]; }
  int64_t output_rows() const override { return s_.m; }
  int64_t output_cols() const override { return s_.n; }

  // y_r[i, j] = x_q[i - q s] . w_r[j], q = i / s.
  RefValue reference(int r, int64_t i, int64_t j) const override {
    const DtypeInfo& dt = rk_->dtype();
    const int64_t q = i / shard_, row = i % shard_;
    RefValue v{0, 0, 0};
    for (int64_t t = 0; t < s_.k; ++t) {
      const double xw =
          input_value(dt, 2 * static_cast<uint32_t>(q), row * s_.k + t) * input_value(dt, 2 * r + 1, j * s_.k + t);
      v.value += xw;
      v.abs += std::fabs(xw);
    }
    v.mag = std::fabs(v.value);
    return v;
  }

  int summed_ranks() const override { return 0; }
  int64_t inner() const override { return s_.k; }
  double device_flops() const override { return 2.0 * s_.m * s_.n * s_.k * rk_->ranks_per_device(); }
  // nccl-tests' all-gather: algbw bytes = R x the sent count, bus factor (R - 1) / R.
  double bus_bytes() const override {
    const double r = rk_->world();
    return static_cast<double>(s_.m * s_.k * rk_->dtype().size) * (r - 1) / r;
  }

 private:
  // `rows` rows of a (row stride k) from row a_row, times w_r^T, into y (row stride n).
  GemmArgs gemm_rows(int r, void* a, int64_t a_row, int64_t rows, void* y) const {
    return linear_rows(rk_->dtype(), a, a_row, w_[r], y, 0, rows, s_.n, s_.k);
  }

  // First row of rank q's rows `rows` in the gather buffer, in the chosen layout.
  int64_t gathered_row(int q, const tpext::RowRange& rows) const {
    return rank_major_ ? q * shard_ + rows.begin : rk_->world() * rows.begin + q * rows.size;
  }

  Ranks* rk_ = nullptr;
  Shape s_{};
  bool rank_major_ = true;
  int64_t shard_ = 0;
  std::vector<void*> x_, w_, gathered_, out_, out_seq_;
};

}  // namespace

int main(int argc, char** argv) {
  AllGatherGemm op;
  return run_main(argc, argv, op);
}
