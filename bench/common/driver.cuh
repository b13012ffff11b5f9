// The main() shared by the overlap benchmarks: parse, set up the ranks, and per shape check first
// (check.cuh; any mismatch ends the run with exit status 1), then time the baselines and every chunked
// configuration, print the table and collect the JSON. An executable supplies only its op (class Op).
#pragma once

#include "check.cuh"
#include "op.cuh"
#include "common/rows.h"
#include "dtype.cuh"
#include "options.cuh"
#include "ranks.cuh"
#include "report.cuh"
#include "timing.cuh"

#include <cublas_v2.h>
#include <nccl.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace tpext::bench {

// Check 1 on the sequential run, then check 2 on every configuration; false (after printing) on failure.
inline bool check_op(Ranks& rk, Op& op, const Shape& s, const std::vector<std::pair<int, int>>& configs) {
  op.reset(true);
  rk.fork();
  op.run(1, 1, true);
  rk.join();
  rk.sync();
  const int64_t rows = op.output_rows(), cols = op.output_cols();
  const bool full = static_cast<double>(rows) * cols * std::max<int64_t>(1, op.inner()) * rk.world() <= double(1 << 27);
  std::vector<double> rms(static_cast<size_t>(rk.world()));
  int64_t bad = 0;
  for (int r = 0; r < rk.world(); ++r) {
    bad += check_against_reference(rk, r, op, full, &rms[r]);
  }
  // Every element, not only the sampled ones, must have been written: the 0xFF fill is NaN, and a NaN
  // compares unequal even to itself.
  for (int r = 0; r < rk.world(); ++r) {
    const void* y = op.output(r, true);
    const Mismatches nan = count_mismatches(rk, r, y, y, rows * cols, {0.0, 0.0});
    if (nan.count) {
      std::fprintf(stderr, "  rank %d: %llu elements not finite (first at row %lld, column %lld)\n", r, nan.count,
                   static_cast<long long>(nan.first / cols), static_cast<long long>(nan.first % cols));
      bad += static_cast<int64_t>(nan.count);
    }
  }
  std::printf("check: sequential vs fp64 host reference (%s) and all finite: %s\n",
              full ? "every element" : "sampled elements", bad ? "MISMATCH" : "ok");
  if (bad) return false;
  const double u = rk.dtype().unit_roundoff;
  const double rel = (op.summed_ranks() + 2) * u + static_cast<double>(op.inner()) * 0x1p-24;
  for (const auto& [c, l] : configs) {
    op.reset(false);
    rk.fork();
    op.run(c, l, false);
    rk.join();
    rk.sync();
    for (int r = 0; r < rk.world(); ++r) {
      const Mismatches bad_c =
          count_mismatches(rk, r, op.output(r, false), op.output(r, true), rows * cols, {rel, 4 * rms[r]});
      if (bad_c.count) {
        std::fprintf(stderr,
                     "check: chunks=%d streams=%d, rank %d: %llu elements differ from the sequential output "
                     "(first at row %lld, column %lld) for m=%lld n=%lld k=%lld\n",
                     c, l, r, bad_c.count, static_cast<long long>(bad_c.first / cols),
                     static_cast<long long>(bad_c.first % cols), static_cast<long long>(s.m),
                     static_cast<long long>(s.n), static_cast<long long>(s.k));
        return false;
      }
    }
  }
  std::printf("check: %zu chunked configurations vs sequential, every element of every rank: ok\n", configs.size());
  return true;
}

inline ShapeResult measure(Ranks& rk, Op& op, const Options& o, const std::vector<std::pair<int, int>>& configs) {
  ShapeResult res;
  auto timed = [&](auto&& enqueue) {
    return time_ms(rk, [&] {
      rk.fork();
      enqueue();
      rk.join();
    }, o.warmup, o.iters);
  };
  auto row = [&](const std::string& schedule, int c, int l, double ms) {
    Row w;
    w.schedule = schedule;
    w.chunks = c;
    w.streams = l;
    w.ms = ms;
    if (schedule != "comm" && op.has_gemm()) w.tflops = op.device_flops() / (ms * 1e-3) / 1e12;
    if (schedule != "gemm") w.busbw_gbps = op.bus_bytes() / (ms * 1e-3) / 1e9;
    if (schedule != "gemm" && schedule != "comm") w.speedup = res.t_seq / ms;
    if (schedule != "comm" && schedule != "gemm") w.efficiency = overlap_efficiency(ms, res.t_gemm, res.t_seq);
    res.rows.push_back(w);
  };
  res.t_comm = timed([&] { op.comm_alone(); });
  if (op.has_gemm()) {
    res.t_gemm = timed([&] { op.gemm_alone(); });
    res.t_seq = timed([&] { op.run(1, 1, false); });
    res.napkin = std::max(res.t_gemm, res.t_comm);
    row("gemm", 1, 1, res.t_gemm);
  } else {
    res.t_seq = res.t_comm;
  }
  row("comm", 1, 1, res.t_comm);
  if (op.has_gemm()) row("sequential", 1, 1, res.t_seq);
  for (const std::pair<int, int>& cfg : configs) {
    row("chunked", cfg.first, cfg.second, timed([&] { op.run(cfg.first, cfg.second, false); }));
  }
  if (op.has_gemm()) {
    row("napkin", 0, 0, res.napkin);  // its speedup and E are the most any schedule can reach
    res.rows.back().tflops = res.rows.back().busbw_gbps = kNaN;
  }
  return res;
}

inline int run_main(int argc, char** argv, Op& op) {
  try {
    const Options o = parse_options(argc, argv);
    const DtypeInfo dt = dtype_info(o.dtype);
    Ranks rk(o, dt);
    const std::string variant = op.configure(o);
    const std::string setup = rk.describe() + (variant.empty() ? "" : "; " + variant);
    int nccl_version = 0, cublas_version = 0;
    TPEXT_NCCL_CHECK(ncclGetVersion(&nccl_version));
    rk.set_device(0);
    TPEXT_CUBLAS_CHECK(cublasGetVersion(rk.ctx(0).blas[0], &cublas_version));
    std::printf("%s: %s, %s; warm-up %d, median of %d runs (CUDA events)\n", op.name(), setup.c_str(), dt.name,
                o.warmup, o.iters);
    std::printf("columns: ms = median of the slowest device; busGB/s as nccl-tests counts it; speedup = T_seq / T; "
                "E = 1 - (T - T_gemm) / (T_seq - T_gemm); napkin = max(T_gemm, T_comm)\n");
    std::vector<ShapeResult> results;
    for (Shape s : o.shapes()) {
      if (!op.has_gemm()) {  // --k means nothing without a GEMM: one pass per (m, n)
        if (s.k != o.ks.front()) continue;
        s.k = 0;
      }
      rk.release();
      op.setup(rk, s);
      std::vector<std::pair<int, int>> configs;
      for (int c : o.chunks) {
        const int ce = static_cast<int>(tpext::effective_chunks(op.chunk_rows(), c));
        for (int l : o.streams) {
          const std::pair<int, int> cfg{ce, op.has_gemm() ? l : 1};
          if (ce > 1 && std::find(configs.begin(), configs.end(), cfg) == configs.end()) configs.push_back(cfg);
        }
      }
      std::printf("\n%s m=%lld n=%lld k=%lld\n", op.name(), static_cast<long long>(s.m), static_cast<long long>(s.n),
                  static_cast<long long>(s.k));
      if (!check_op(rk, op, s, configs)) {
        std::fprintf(stderr, "%s: correctness check FAILED; nothing timed\n", op.name());
        return 1;
      }
      if (o.check_only) continue;
      ShapeResult res = measure(rk, op, o, configs);
      res.shape = s;
      print_table(std::string(op.name()) + " m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) +
                      " k=" + std::to_string(s.k) + " " + dt.name + ", " + setup,
                  res);
      results.push_back(res);
    }
    if (!o.json_path.empty() && !o.check_only) {
      const char* commit = std::getenv("TPEXT_COMMIT");
      write_json(o.json_path,
                 {{"bench", json_str(op.name())},
                  {"setup", json_str(setup)},
                  {"mode", json_str(rk.is_virtual() ? "virtual-ranks" : "nccl")},
                  {"world", std::to_string(rk.world())},
                  {"dtype", json_str(dt.name)},
                  {"nccl_version", std::to_string(nccl_version)},
                  {"cublas_version", std::to_string(cublas_version)},
                  {"commit", json_str(commit ? commit : "")},
                  {"warmup", std::to_string(o.warmup)},
                  {"iters", std::to_string(o.iters)},
                  {"statistic", json_str("median over runs of the slowest device, CUDA events")},
                  {"baseline", json_str("sequential: whole GEMM then whole collective (cuBLAS + NCCL or P2P)")},
                  {"napkin", json_str("max(T_gemm, T_comm)")},
                  {"efficiency", json_str("E = 1 - (T - T_gemm) / (T_seq - T_gemm)")}},
                 results);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", op.name(), e.what());
    return 2;
  }
}

}  // namespace tpext::bench
