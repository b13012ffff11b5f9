// SM contention: how much a communication-like kernel confined to k SMs slows an overlapped GEMM.
//
// This is the measurement behind tpext.ops.set_nccl_options(max_ctas=k): NCCL's kernels are copy loops
// that each occupy one SM per CTA, so a collective overlapped with a GEMM takes k SMs away from it. The
// stand-in here is a 16-byte vectorised copy kernel launched with k blocks, each block asking for more
// than half of an SM's shared memory so that no two blocks share an SM: exactly k SMs copy.
// For each k it measures, with CUDA events, median of the repeats:
//   gemm alone, copy alone (GB/s with k SMs), and both at once on two streams (the GEMM's slowdown and the
//   copy's bandwidth under contention).
// Napkin: if the copy held its k SMs for the whole GEMM, the GEMM could at best run at (S - k) / S of its
// speed, i.e. slowdown >= S / (S - k); the table prints that bound beside the measured slowdown.
// Correctness first: the copy's output is compared with its input, and sampled GEMM outputs (inputs in
// {-1, 0, 1}, fp32 accumulation and output, so exact) with a host dot product.
//
// usage: tpext_bench_sm_contention [--mnk 8192x8192x8192] [--ks 1,2,4,8,16,32] [--copy-mb 256]
//                                  [--repeats 20] [--json PATH]
// Needs cuBLAS: CMake links it where libcublas is found (a GPU machine), and compiles this file without
// linking otherwise (CI).
#include "common/cublas_check.h"
#include "common/cuda_check.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  int64_t m = 8192, n = 8192, k = 8192;
  std::vector<int> ks = {1, 2, 4, 8, 16, 32};
  int64_t copy_mb = 256;
  int repeats = 20, warmup = 3;
  std::string json_path;
};

// Grid-stride copy of n16 16-byte words; one block per SM (see the dynamic shared memory at launch).
__global__ void __launch_bounds__(1024) copy_kernel(const int4* __restrict__ src, int4* __restrict__ dst, int64_t n16) {
  extern __shared__ char reserve[];  // never touched: its size only keeps a second block off this SM
  (void)reserve;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += step) dst[i] = src[i];
}

struct Bench {
  Options o;
  cudaDeviceProp prop{};
  cublasHandle_t blas = nullptr;
  cudaStream_t gemm_stream = nullptr, copy_stream = nullptr;
  __nv_bfloat16 *a = nullptr, *b = nullptr;
  float* c = nullptr;
  int4 *src = nullptr, *dst = nullptr;
  int64_t n16 = 0;
  size_t smem = 0;
  std::vector<float> host_a, host_b;

  void gemm() {
    const float one = 1.f, zero = 0.f;
    // Row-major C[m, n] = A[m, k] x B[k, n] as column-major C^T = B^T A^T.
    TPEXT_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(o.n), static_cast<int>(o.m),
                                    static_cast<int>(o.k), &one, b, CUDA_R_16BF, static_cast<int>(o.n), a, CUDA_R_16BF,
                                    static_cast<int>(o.k), &zero, c, CUDA_R_32F, static_cast<int>(o.n),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  void copy(int blocks) {
    copy_kernel<<<blocks, 1024, smem, copy_stream>>>(src, dst, n16);
    TPEXT_CUDA_CHECK(cudaGetLastError());
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Times fn() between two events on `s`; median over repeats (ms).
template <typename Fn>
double time_on(cudaStream_t s, Fn fn, int warmup, int repeats) {
  cudaEvent_t e0, e1;
  TPEXT_CUDA_CHECK(cudaEventCreate(&e0));
  TPEXT_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < warmup; ++i) fn();
  TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    TPEXT_CUDA_CHECK(cudaEventRecord(e0, s));
    fn();
    TPEXT_CUDA_CHECK(cudaEventRecord(e1, s));
    TPEXT_CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0.f;
    TPEXT_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  TPEXT_CUDA_CHECK(cudaEventDestroy(e0));
  TPEXT_CUDA_CHECK(cudaEventDestroy(e1));
  return median(ms);
}

// Both at once: the copy starts first (as a collective issued before the next chunk's GEMM would),
// each stream timed by its own events; median of each over the repeats.
void time_together(Bench& bn, int blocks, double* gemm_ms, double* copy_ms) {
  cudaEvent_t g0, g1, c0, c1;
  for (cudaEvent_t* e : {&g0, &g1, &c0, &c1}) TPEXT_CUDA_CHECK(cudaEventCreate(e));
  std::vector<double> gs, cs;
  for (int r = 0; r < bn.o.warmup + bn.o.repeats; ++r) {
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    TPEXT_CUDA_CHECK(cudaEventRecord(c0, bn.copy_stream));
    bn.copy(blocks);
    TPEXT_CUDA_CHECK(cudaEventRecord(c1, bn.copy_stream));
    TPEXT_CUDA_CHECK(cudaEventRecord(g0, bn.gemm_stream));
    bn.gemm();
    TPEXT_CUDA_CHECK(cudaEventRecord(g1, bn.gemm_stream));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    float g = 0.f, c = 0.f;
    TPEXT_CUDA_CHECK(cudaEventElapsedTime(&g, g0, g1));
    TPEXT_CUDA_CHECK(cudaEventElapsedTime(&c, c0, c1));
    if (r >= bn.o.warmup) {
      gs.push_back(g);
      cs.push_back(c);
    }
  }
  for (cudaEvent_t e : {g0, g1, c0, c1}) TPEXT_CUDA_CHECK(cudaEventDestroy(e));
  *gemm_ms = median(gs);
  *copy_ms = median(cs);
}

void check_correct(Bench& bn) {
  bn.copy(bn.prop.multiProcessorCount);
  bn.gemm();
  TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int4> got(static_cast<size_t>(std::min<int64_t>(bn.n16, 1 << 20))), want(got.size());
  TPEXT_CUDA_CHECK(cudaMemcpy(got.data(), bn.dst, got.size() * sizeof(int4), cudaMemcpyDeviceToHost));
  TPEXT_CUDA_CHECK(cudaMemcpy(want.data(), bn.src, want.size() * sizeof(int4), cudaMemcpyDeviceToHost));
  if (std::memcmp(got.data(), want.data(), got.size() * sizeof(int4)) != 0)
    throw std::runtime_error("copy kernel output differs from its input");
  std::mt19937_64 rng(7);
  for (int s = 0; s < 64; ++s) {
    const int64_t i = static_cast<int64_t>(rng() % bn.o.m), j = static_cast<int64_t>(rng() % bn.o.n);
    double ref = 0;
    for (int64_t p = 0; p < bn.o.k; ++p) ref += bn.host_a[i * bn.o.k + p] * bn.host_b[p * bn.o.n + j];
    float y = 0.f;
    TPEXT_CUDA_CHECK(cudaMemcpy(&y, bn.c + i * bn.o.n + j, sizeof(float), cudaMemcpyDeviceToHost));
    if (static_cast<double>(y) != ref) {
      throw std::runtime_error("GEMM output [" + std::to_string(i) + ", " + std::to_string(j) +
                               "] = " + std::to_string(y) + ", expected " + std::to_string(ref));
    }
  }
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s\n", "usage: tpext_bench_sm_contention [--mnk 8192x8192x8192] [--ks 1,2,4,8,16,32] [--copy-mb "
                          "256] [--repeats 20] [--json PATH]");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
    const std::string v = argv[++i];
    if (a == "--mnk") {
      long long m = 0, n = 0, k = 0;
      if (std::sscanf(v.c_str(), "%lldx%lldx%lld", &m, &n, &k) != 3 || m <= 0 || n <= 0 || k <= 0) {
        throw std::runtime_error("--mnk: expected MxNxK, got '" + v + "'");
      }
      o.m = m, o.n = n, o.k = k;
    } else if (a == "--ks") {
      o.ks.clear();
      std::stringstream ss(v);
      for (std::string item; std::getline(ss, item, ',');) o.ks.push_back(std::max(1, std::atoi(item.c_str())));
    } else if (a == "--copy-mb") {
      o.copy_mb = std::max(1, std::atoi(v.c_str()));
    } else if (a == "--repeats") {
      o.repeats = std::max(1, std::atoi(v.c_str()));
    } else if (a == "--json") {
      o.json_path = v;
    } else {
      throw std::runtime_error("unknown argument " + a + " (known: --mnk --ks --copy-mb --repeats --json)");
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Bench bn;
    bn.o = parse(argc, argv);
    const Options& o = bn.o;
    int dev = 0;
    TPEXT_CUDA_CHECK(cudaGetDevice(&dev));
    TPEXT_CUDA_CHECK(cudaGetDeviceProperties(&bn.prop, dev));
    const int sms = bn.prop.multiProcessorCount;
    bn.smem = bn.prop.sharedMemPerMultiprocessor / 2 + 1024;
    TPEXT_CUDA_CHECK(
        cudaFuncSetAttribute(copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bn.smem)));
    TPEXT_CUBLAS_CHECK(cublasCreate(&bn.blas));
    TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&bn.gemm_stream, cudaStreamNonBlocking));
    TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&bn.copy_stream, cudaStreamNonBlocking));
    TPEXT_CUBLAS_CHECK(cublasSetStream(bn.blas, bn.gemm_stream));

    std::mt19937 rng(1);
    std::uniform_int_distribution<int> tri(-1, 1);
    bn.host_a.resize(static_cast<size_t>(o.m * o.k));
    bn.host_b.resize(static_cast<size_t>(o.k * o.n));
    std::vector<__nv_bfloat16> tmp_a(bn.host_a.size()), tmp_b(bn.host_b.size());
    for (size_t i = 0; i < bn.host_a.size(); ++i)
      tmp_a[i] = __float2bfloat16(bn.host_a[i] = static_cast<float>(tri(rng)));
    for (size_t i = 0; i < bn.host_b.size(); ++i)
      tmp_b[i] = __float2bfloat16(bn.host_b[i] = static_cast<float>(tri(rng)));
    TPEXT_CUDA_CHECK(cudaMalloc(&bn.a, tmp_a.size() * sizeof(__nv_bfloat16)));
    TPEXT_CUDA_CHECK(cudaMalloc(&bn.b, tmp_b.size() * sizeof(__nv_bfloat16)));
    TPEXT_CUDA_CHECK(cudaMalloc(&bn.c, static_cast<size_t>(o.m * o.n) * sizeof(float)));
    TPEXT_CUDA_CHECK(cudaMemcpy(bn.a, tmp_a.data(), tmp_a.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
    TPEXT_CUDA_CHECK(cudaMemcpy(bn.b, tmp_b.data(), tmp_b.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
    const size_t copy_bytes = static_cast<size_t>(o.copy_mb) << 20;
    bn.n16 = static_cast<int64_t>(copy_bytes / sizeof(int4));
    TPEXT_CUDA_CHECK(cudaMalloc(&bn.src, copy_bytes));
    TPEXT_CUDA_CHECK(cudaMalloc(&bn.dst, copy_bytes));
    TPEXT_CUDA_CHECK(cudaMemset(bn.src, 0x5a, copy_bytes));
    // The uploads and the memset may still be in flight (pageable copies, the legacy stream), and the
    // GEMM and copy streams are non-blocking: nothing else orders them before the first use.
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    check_correct(bn);

    const double flops = 2.0 * o.m * o.n * o.k;
    const double gemm_alone = time_on(bn.gemm_stream, [&] { bn.gemm(); }, o.warmup, o.repeats);
    std::printf("sm_contention on %s (%d SMs): GEMM %lldx%lldx%lld bf16 alone %.3f ms (%.1f TFLOP/s); copy %lld MiB\n",
                bn.prop.name, sms, static_cast<long long>(o.m), static_cast<long long>(o.n),
                static_cast<long long>(o.k), gemm_alone, flops / gemm_alone / 1e9, static_cast<long long>(o.copy_mb));
    std::printf("%4s | %10s %9s | %12s %9s %9s | %10s\n", "k", "copy us", "GB/s", "gemm+copy ms", "slowdown",
                "napkin>=", "copy GB/s");
    std::ostringstream rows;
    for (size_t i = 0; i < o.ks.size(); ++i) {
      const int k = std::min(o.ks[i], sms);
      const double copy_alone = time_on(bn.copy_stream, [&] { bn.copy(k); }, o.warmup, o.repeats);
      double gemm_with = 0, copy_with = 0;
      time_together(bn, k, &gemm_with, &copy_with);
      const double rw = 2.0 * static_cast<double>(copy_bytes);  // read + write
      const double napkin = static_cast<double>(sms) / std::max(1, sms - k);
      std::printf("%4d | %10.1f %9.1f | %12.3f %9.3f %9.3f | %10.1f\n", k, copy_alone * 1e3, rw / copy_alone / 1e6,
                  gemm_with, gemm_with / gemm_alone, napkin, rw / copy_with / 1e6);
      rows << (i ? ",\n" : "") << "    {\"k\": " << k << ", \"copy_alone_ms\": " << copy_alone
           << ", \"copy_alone_gbps\": " << rw / copy_alone / 1e6 << ", \"gemm_with_copy_ms\": " << gemm_with
           << ", \"gemm_slowdown\": " << gemm_with / gemm_alone << ", \"napkin_min_slowdown\": " << napkin
           << ", \"copy_with_gemm_gbps\": " << rw / copy_with / 1e6 << "}";
    }
    if (!o.json_path.empty()) {
      FILE* f = std::fopen(o.json_path.c_str(), "w");
      if (!f) throw std::runtime_error("cannot open --json path " + o.json_path + ": " + std::strerror(errno));
      std::fprintf(f,
                   "{\n  \"bench\": \"sm_contention\",\n  \"device\": \"%s\",\n  \"sm_count\": %d,\n"
                   "  \"gemm\": {\"m\": %lld, \"n\": %lld, \"k\": %lld, \"dtype\": \"bf16\", \"alone_ms\": %f},\n"
                   "  \"copy_bytes\": %zu,\n  \"statistic\": \"median\",\n  \"repeats\": %d,\n"
                   "  \"baseline\": \"the GEMM alone\",\n  \"napkin\": \"slowdown >= S / (S - k)\",\n"
                   "  \"results\": [\n%s\n  ]\n}\n",
                   bn.prop.name, sms, static_cast<long long>(o.m), static_cast<long long>(o.n),
                   static_cast<long long>(o.k), gemm_alone, copy_bytes, o.repeats, rows.str().c_str());
      if (std::fclose(f) != 0) throw std::runtime_error("cannot write --json path " + o.json_path);
      std::printf("wrote %s\n", o.json_path.c_str());
    }
    for (void* p : {static_cast<void*>(bn.a), static_cast<void*>(bn.b), static_cast<void*>(bn.c),
                    static_cast<void*>(bn.src), static_cast<void*>(bn.dst)}) {
      TPEXT_CUDA_CHECK(cudaFree(p));
    }
    TPEXT_CUBLAS_CHECK(cublasDestroy(bn.blas));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sm_contention: error: %s\n", e.what());
    return 2;
  }
}
