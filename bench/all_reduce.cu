// All-reduce alone, whole and chunked: what cutting a GEMM output's all-reduce into c pieces costs.
//
// Every rank holds an [m, n] buffer (a GEMM output of the row-parallel layer); the ranks all-reduce
// it as one collective (the T_comm of bench/gemm_all_reduce.cu) and as c collectives over near-even row
// chunks (split_rows; m need not divide by c), issued back to back on the comm stream, as the chunked
// GEMM + all-reduce issues them. Each chunk pays the collective's fixed latency once more and moves a
// smaller message at lower bandwidth, so T(c) >= T(1): the "speedup" column is T(1) / T(c), the
// fraction of the whole collective's speed the chunked one keeps, and the ceiling chunking must
// recover through overlap. There is no GEMM: --k and --streams are ignored, TFLOP/s and E are "-".
// With --virtual-ranks the collective is tpext's P2P all-reduce (--p2p-algo 1 one-shot, 2 two-shot;
// the two-shot kernel uses the input buffers as scratch, so the inputs are refilled before each check).
//
// usage: tpext_bench_all_reduce [--gpus N | --virtual-ranks R] [--m LIST] [--n LIST]
//          [--dtype bf16|fp16|fp32] [--chunks LIST] [--p2p-algo 1|2] [--warmup N] [--iters N] [--check]
//          [--json PATH]      (docs/benchmarks-cuda.md)
// Needs NCCL (and cuBLAS, for the version it reports): CMake links them where found and compiles this
// file without linking otherwise.
#include "common/driver.cuh"

#include <cublas_v2.h>
#include <nccl.h>

#include <cmath>
#include <vector>

namespace {

using namespace tpext::bench;

class AllReduce final : public Op {
 public:
  const char* name() const override { return "all_reduce"; }
  bool has_gemm() const override { return false; }

  void setup(Ranks& rk, const Shape& s) override {
    rk_ = &rk;
    s_ = s;
    in_ = rk.alloc_each(s.m * s.n);
    out_ = rk.alloc_each(s.m * s.n);
    out_seq_ = rk.alloc_each(s.m * s.n);
    rk.fill_each(in_, s.m * s.n, 1, 0);
  }

  int64_t chunk_rows() const override { return s_.m; }
  void gemm_alone() override {}
  void comm_alone() override { run(1, 1, false); }

  void run(int chunks, int /*lanes*/, bool seq) override {
    const DtypeInfo& dt = rk_->dtype();
    const int world = rk_->world();
    const int64_t c = tpext::effective_chunks(s_.m, chunks);
    std::vector<void*> send(world), recv(world);
    for (int64_t j = 0; j < c; ++j) {
      const tpext::RowRange rows = tpext::split_rows(s_.m, c, j);
      for (int r = 0; r < world; ++r) {
        send[r] = advance(in_[r], rows.begin * s_.n, dt);
        recv[r] = advance(seq ? out_seq_[r] : out_[r], rows.begin * s_.n, dt);
      }
      rk_->all_reduce(send, recv, rows.size * s_.n);
    }
  }

  void reset(bool seq) override {
    const DtypeInfo& dt = rk_->dtype();
    for (int r = 0; r < rk_->world(); ++r) {
      rk_->set_device(r);
      fill_inputs(dt, in_[r], s_.m * s_.n, r, rk_->ctx(r).lanes[0]);
      TPEXT_CUDA_CHECK(cudaMemsetAsync(seq ? out_seq_[r] : out_[r], 0xFF, s_.m * s_.n * dt.size, rk_->ctx(r).lanes[0]));
    }
  }

  const void* output(int r, bool seq) const override { return seq ? out_seq_[r] : out_[r]; }
  int64_t output_rows() const override { return s_.m; }
  int64_t output_cols() const override { return s_.n; }

  RefValue reference(int /*r*/, int64_t i, int64_t j) const override {
    RefValue v{0, 0, 0};
    for (int q = 0; q < rk_->world(); ++q) {
      const double x = input_value(rk_->dtype(), q, i * s_.n + j);
      v.value += x;
      v.mag += std::fabs(x);
    }
    return v;
  }

  int summed_ranks() const override { return rk_->world(); }
  int64_t inner() const override { return 0; }
  double device_flops() const override { return 0; }
  double bus_bytes() const override {
    const double r = rk_->world();
    return static_cast<double>(s_.m * s_.n * rk_->dtype().size) * 2.0 * (r - 1) / r;
  }

 private:
  Ranks* rk_ = nullptr;
  Shape s_{};
  std::vector<void*> in_, out_, out_seq_;
};

}  // namespace

int main(int argc, char** argv) {
  AllReduce op;
  return run_main(argc, argv, op);
}
