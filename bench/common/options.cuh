// Command line of the overlap benchmarks (bench/gemm_all_reduce.cu and friends): one parser, so every
// executable takes the same options with the same meaning (docs/benchmarks-cuda.md lists them).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tpext::bench {

struct Shape {
  int64_t m, n, k;  // per-rank problem; what m, n and k mean is the op's (see the executable's header)
};

struct Options {
  std::vector<int64_t> ms = {8192}, ns = {8192}, ks = {8192};
  std::string dtype = "bf16";
  std::vector<int> chunks = {1, 2, 4, 8};
  std::vector<int> streams = {2};
  int gpus = 0;                   // 0: every visible GPU (NCCL mode)
  int virtual_ranks = 0;          // > 0: R virtual ranks on the current GPU (P2P kernels, no NCCL)
  int p2p_algo = 2;               // virtual all-reduce: 1 one-shot, 2 two-shot
  bool rank_major_gather = true;  // all_gather_gemm's chunked gather: into rank-major x_full as tpext does
  int warmup = 5, iters = 20;
  bool check_only = false;
  std::string json_path;

  // Every combination of the --m, --n and --k lists, m outermost.
  std::vector<Shape> shapes() const {
    std::vector<Shape> out;
    for (int64_t m : ms)
      for (int64_t n : ns)
        for (int64_t k : ks) out.push_back({m, n, k});
    return out;
  }
};

inline long long parse_int(const std::string& flag, const std::string& text, long long lo, long long hi) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || end == nullptr || *end != '\0' || v < lo || v > hi) {
    throw std::runtime_error(flag + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                             "], got '" + text + "'");
  }
  return v;
}

template <typename T>
std::vector<T> parse_list(const std::string& flag, const std::string& text, long long lo, long long hi) {
  std::vector<T> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(static_cast<T>(parse_int(flag, item, lo, hi)));
  if (out.empty()) throw std::runtime_error(flag + ": expected a comma-separated list, got '" + text + "'");
  return out;
}

inline const char* usage_text() {
  return "options:\n"
         "  --m LIST --n LIST --k LIST  per-rank problem sizes, comma-separated lists (every combination)\n"
         "  --dtype bf16|fp16|fp32      storage type of inputs and outputs; GEMMs accumulate in fp32\n"
         "  --chunks LIST               chunk counts of the pipelined schedule (default 1,2,4,8)\n"
         "  --streams LIST              compute streams of the pipelined schedule, 1 and/or 2 (default 2)\n"
         "  --gpus N                    one process drives N local GPUs through NCCL (default: all)\n"
         "  --virtual-ranks R           R ranks on one GPU, collectives by tpext's P2P kernels (R <= 8)\n"
         "  --p2p-algo 1|2              virtual-rank all-reduce: one-shot or two-shot (default 2)\n"
         "  --gather rank-major|chunk-major  all_gather_gemm's chunked gather: into rank-major rows with one\n"
         "                              broadcast per source, as tpext's schedule (default), or one all-gather\n"
         "                              per chunk into chunk-major rows\n"
         "  --warmup N --iters N        untimed warm-up runs, timed runs (median reported)\n"
         "  --check                     run the correctness checks only, no timing\n"
         "  --json PATH                 also write the results as JSON\n";
}

// The command-line walk every bench shares: --help / -h prints `usage` and exits, --check sets
// *check_only, and every other flag takes the next argument as its value, handed to
// on_value(flag, value), which throws for a flag it does not know.
template <class OnValue>
void walk_flags(int argc, char** argv, const std::string& usage, bool* check_only, OnValue&& on_value) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s", usage.c_str());
      std::exit(0);
    }
    if (a == "--check") {
      *check_only = true;
      continue;
    }
    if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
    on_value(a, std::string(argv[++i]));
  }
}

inline Options parse_options(int argc, char** argv) {
  Options o;
  const std::string usage = std::string("usage: ") + argv[0] + " [options]\n" + usage_text();
  walk_flags(argc, argv, usage, &o.check_only, [&](const std::string& a, const std::string& v) {
    constexpr long long kBig = int64_t{1} << 31;
    if (a == "--m") o.ms = parse_list<int64_t>(a, v, 1, kBig);
    else if (a == "--n") o.ns = parse_list<int64_t>(a, v, 1, kBig);
    else if (a == "--k") o.ks = parse_list<int64_t>(a, v, 1, kBig);
    else if (a == "--chunks") o.chunks = parse_list<int>(a, v, 1, 64);
    else if (a == "--streams") o.streams = parse_list<int>(a, v, 1, 2);
    else if (a == "--gpus") o.gpus = static_cast<int>(parse_int(a, v, 1, 64));
    else if (a == "--virtual-ranks") o.virtual_ranks = static_cast<int>(parse_int(a, v, 1, 8));
    else if (a == "--p2p-algo") o.p2p_algo = static_cast<int>(parse_int(a, v, 1, 2));
    else if (a == "--warmup") o.warmup = static_cast<int>(parse_int(a, v, 0, 100000));
    else if (a == "--iters") o.iters = static_cast<int>(parse_int(a, v, 1, 100000));
    else if (a == "--json") o.json_path = v;
    else if (a == "--gather") {
      if (v != "rank-major" && v != "chunk-major") {
        throw std::runtime_error("--gather: expected rank-major or chunk-major, got '" + v + "'");
      }
      o.rank_major_gather = v == "rank-major";
    } else if (a == "--dtype") {
      if (v != "bf16" && v != "fp16" && v != "fp32")
        throw std::runtime_error("--dtype: expected bf16, fp16 or fp32, got '" + v + "'");
      o.dtype = v;
    } else {
      throw std::runtime_error("unknown argument " + a + "\n" + usage_text());
    }
  });
  if (o.gpus > 0 && o.virtual_ranks > 0)
    throw std::runtime_error("--gpus and --virtual-ranks exclude each other, got both");
  return o;
}

}  // namespace tpext::bench
