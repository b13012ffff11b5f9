// The one table every overlap benchmark prints, and its --json form.
//
// Per shape: the GEMM alone (T_gemm), the collective alone (T_comm), the sequential baseline (T_seq:
// the whole GEMM, then the whole collective), each chunked configuration, and the napkin limit
// max(T_gemm, T_comm) no schedule can beat. Columns:
//   ms       median over the timed runs of the slowest device
//   TFLOP/s  the GEMM FLOPs one device executes / ms (every rank's GEMMs in virtual-rank mode)
//   busGB/s  the collective's bytes as nccl-tests counts them (algorithm bytes x its bus factor) / ms
//   speedup  T_seq / ms
//   E        overlap efficiency 1 - (T - T_gemm) / (T_seq - T_gemm): 1 when the collective is fully
//            hidden behind the GEMM, 0 when nothing is gained over the sequential baseline
#pragma once

#include "options.cuh"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tpext::bench {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Row {
  std::string schedule;  // "gemm", "comm", "sequential", "chunked", "napkin"
  int chunks = 0, streams = 0;
  double ms = kNaN, tflops = kNaN, busbw_gbps = kNaN, speedup = kNaN, efficiency = kNaN;
};

struct ShapeResult {
  Shape shape;
  double t_gemm = kNaN, t_comm = kNaN, t_seq = kNaN, napkin = kNaN;
  std::vector<Row> rows;
};

inline double overlap_efficiency(double t, double t_gemm, double t_seq) {
  const double hideable = t_seq - t_gemm;
  return hideable > 0 && !std::isnan(t_gemm) ? 1.0 - (t - t_gemm) / hideable : kNaN;
}

inline std::string cell(double v, const char* fmt) {
  if (std::isnan(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

inline std::string row_label(const Row& r) {
  if (r.schedule == "chunked") return "chunks=" + std::to_string(r.chunks) + " streams=" + std::to_string(r.streams);
  if (r.schedule == "gemm") return "GEMM alone";
  if (r.schedule == "comm") return "collective alone";
  if (r.schedule == "napkin") return "napkin max(gemm,coll)";
  return r.schedule;
}

inline void print_table(const std::string& title, const ShapeResult& res) {
  std::printf("\n%s\n", title.c_str());
  std::printf("  %-24s %10s %9s %9s %8s %7s\n", "schedule", "ms", "TFLOP/s", "busGB/s", "speedup", "E");
  for (const Row& r : res.rows) {
    std::printf("  %-24s %10s %9s %9s %8s %7s\n", row_label(r).c_str(), cell(r.ms, "%.4f").c_str(),
                cell(r.tflops, "%.1f").c_str(), cell(r.busbw_gbps, "%.1f").c_str(), cell(r.speedup, "%.3fx").c_str(),
                cell(r.efficiency, "%.3f").c_str());
  }
  std::fflush(stdout);
}

inline std::string json_num(double v) {
  if (std::isnan(v) || std::isinf(v)) return "null";
  std::ostringstream s;
  s.precision(6);
  s << v;
  return s.str();
}

inline std::string json_str(const std::string& v) {
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

// `header` holds already-formatted "key": value members (strings through json_str).
inline void write_json(const std::string& path, const std::vector<std::pair<std::string, std::string>>& header,
                       const std::vector<ShapeResult>& results) {
  std::ostringstream o;
  o << "{\n";
  for (const auto& [k, v] : header) o << "  " << json_str(k) << ": " << v << ",\n";
  o << "  \"results\": [";
  for (size_t i = 0; i < results.size(); ++i) {
    const ShapeResult& r = results[i];
    o << (i ? "," : "") << "\n    {\"m\": " << r.shape.m << ", \"n\": " << r.shape.n << ", \"k\": " << r.shape.k
      << ", \"t_gemm_ms\": " << json_num(r.t_gemm) << ", \"t_comm_ms\": " << json_num(r.t_comm)
      << ", \"t_seq_ms\": " << json_num(r.t_seq) << ", \"napkin_ms\": " << json_num(r.napkin) << ",\n     \"rows\": [";
    for (size_t j = 0; j < r.rows.size(); ++j) {
      const Row& w = r.rows[j];
      o << (j ? "," : "") << "\n      {\"schedule\": " << json_str(w.schedule) << ", \"chunks\": " << w.chunks
        << ", \"streams\": " << w.streams << ", \"ms\": " << json_num(w.ms) << ", \"tflops\": " << json_num(w.tflops)
        << ", \"busbw_gbps\": " << json_num(w.busbw_gbps) << ", \"speedup\": " << json_num(w.speedup)
        << ", \"efficiency\": " << json_num(w.efficiency) << "}";
    }
    o << "]}";
  }
  o << "\n  ]\n}\n";
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw std::runtime_error("--json: cannot open '" + path + "': " + std::strerror(errno));
  const std::string text = o.str();
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok) throw std::runtime_error("--json: cannot write '" + path + "'");
  std::printf("\nwrote %s\n", path.c_str());
}

}  // namespace tpext::bench
