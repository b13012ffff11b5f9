// Bandwidth of the row-parallel epilogue y += bias + residual (tpext::kernels::launch_bias_residual_add).
//
// The op is memory-bound, so the napkin limit is the device's copy bandwidth: for every size and dtype
// this measures a device-to-device cudaMemcpyAsync that moves the same number of bytes as the epilogue
// (it reads and writes traffic/2 bytes) and prints the epilogue's GB/s as a fraction of it. The
// baseline beside it is the unfused form (y += bias, then y += residual: two launches, 5 tensor passes
// instead of 3), run through the same kernel with one operand each.
//
// Correctness first: inputs are generated on the device from a hash of (tensor, index), and after one
// fused launch a verification kernel recomputes every element in fp64 from the same generator and
// counts elements outside the tolerance; a failing case is reported and the exit status is non-zero.
// Timing: CUDA events around a batch of launches (enough to move >= ~1 GB, so launch overhead and event
// resolution vanish for small sizes), warm-up batches first, median over the repeats.
// Working sets smaller than the L2 cache are flagged: repeated launches then run partly from L2.
//
// usage: tpext_bench_epilogue_bw [--json PATH] [--repeats N] [--warmup N]
//                                [--sizes 1024x4096,8192x8192] [--dtypes bf16,fp16,fp32]
// Build: CMake target tpext_bench_epilogue_bw, or without CMake:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc csrc/kernels/epilogue.cu
//        bench/epilogue_bw.cu -o build/epilogue_bw
#include "common/cuda_check.h"
#include "kernels/epilogue.h"
#include "kernels/numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using tpext::kernels::BiasResidualParams;
using tpext::kernels::DType;
using tpext::kernels::numeric::from_acc;
using tpext::kernels::numeric::to_acc;

namespace {

struct Options {
  std::string json_path;
  int repeats = 25, warmup = 3;
  std::vector<std::pair<int64_t, int64_t>> sizes = {{1024, 4096}, {4096, 8192}, {8192, 8192}, {16384, 12288}};
  std::vector<std::string> dtypes = {"bf16", "fp16", "fp32"};
};

// Deterministic input in [-1, 1): splitmix64 of (tensor, index). Host and device agree bit for bit.
__host__ __device__ inline float gen(uint32_t tensor, uint64_t i) {
  uint64_t z = i + (static_cast<uint64_t>(tensor) << 56) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-23f - 1.0f;  // 24 random bits
}

template <typename T>
__global__ void init_kernel(T* p, int64_t n, uint32_t tensor) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = from_acc<T>(gen(tensor, i));
  }
}

// Counts elements of y (after one fused launch on fresh inputs) outside eps * (|ref| + |y0| + |b| + |r|).
template <typename T>
__global__ void verify_kernel(const T* y, int64_t rows, int64_t cols, double eps, unsigned long long* bad) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double y0 = to_acc(from_acc<T>(gen(0, i)));
    const double r = to_acc(from_acc<T>(gen(1, i)));
    const double b = to_acc(from_acc<T>(gen(2, i % cols)));
    const double ref = y0 + b + r;
    const double err = fabs(to_acc(y[i]) - ref);
    if (!(err <= eps * (fabs(ref) + fabs(y0) + fabs(b) + fabs(r)))) atomicAdd(bad, 1ull);
  }
}

struct DtypeInfo {
  const char* name;
  DType dtype;
  size_t size;
  double eps;
};
DtypeInfo dtype_info(const std::string& s) {
  if (s == "bf16") return {"bf16", DType::kBFloat16, 2, 0x1p-7};
  if (s == "fp16") return {"fp16", DType::kFloat16, 2, 0x1p-10};
  if (s == "fp32") return {"fp32", DType::kFloat32, 4, 0x1p-23};
  throw std::runtime_error("--dtypes: expected bf16, fp16 or fp32, got '" + s + "'");
}

template <typename T>
void init(void* p, int64_t n, uint32_t tensor) {
  init_kernel<T><<<1024, 256>>>(static_cast<T*>(p), n, tensor);
  TPEXT_CUDA_CHECK(cudaGetLastError());
}

void init_any(DType dt, void* p, int64_t n, uint32_t tensor) {
  switch (dt) {
    case DType::kBFloat16: init<__nv_bfloat16>(p, n, tensor); break;
    case DType::kFloat16: init<__half>(p, n, tensor); break;
    default: init<float>(p, n, tensor); break;
  }
}

unsigned long long verify_any(DType dt, const void* y, int64_t rows, int64_t cols, double eps) {
  unsigned long long* bad = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&bad, sizeof(*bad)));
  TPEXT_CUDA_CHECK(cudaMemset(bad, 0, sizeof(*bad)));
  switch (dt) {
    case DType::kBFloat16:
      verify_kernel<<<1024, 256>>>(static_cast<const __nv_bfloat16*>(y), rows, cols, eps, bad);
      break;
    case DType::kFloat16: verify_kernel<<<1024, 256>>>(static_cast<const __half*>(y), rows, cols, eps, bad); break;
    default: verify_kernel<<<1024, 256>>>(static_cast<const float*>(y), rows, cols, eps, bad); break;
  }
  TPEXT_CUDA_CHECK(cudaGetLastError());
  unsigned long long host = 0;
  TPEXT_CUDA_CHECK(cudaMemcpy(&host, bad, sizeof(host), cudaMemcpyDeviceToHost));
  TPEXT_CUDA_CHECK(cudaFree(bad));
  return host;
}

// Median over `repeats` of the per-launch time (ms) of `fn`, each sample a batch of `batch` calls.
template <typename Fn>
double time_ms(Fn fn, int batch, int warmup, int repeats, cudaEvent_t start, cudaEvent_t stop) {
  for (int w = 0; w < warmup; ++w)
    for (int i = 0; i < batch; ++i) fn();
  std::vector<double> samples;
  for (int rep = 0; rep < repeats; ++rep) {
    TPEXT_CUDA_CHECK(cudaEventRecord(start));
    for (int i = 0; i < batch; ++i) fn();
    TPEXT_CUDA_CHECK(cudaEventRecord(stop));
    TPEXT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    TPEXT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(static_cast<double>(ms) / batch);
  }
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  return n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
}

struct Result {
  std::string dtype;
  int64_t rows, cols, bytes;
  bool in_l2, correct;
  unsigned long long bad;
  double fused_ms, two_pass_ms, memcpy_ms;
};

Result run_one(const Options& o, const DtypeInfo& di, int64_t rows, int64_t cols, int64_t l2_bytes, cudaEvent_t start,
               cudaEvent_t stop) {
  const int64_t n = rows * cols;
  const int64_t tensor_bytes = n * static_cast<int64_t>(di.size);
  // Bytes the fused epilogue moves: read y + read residual + read bias + write y.
  const int64_t bytes = 3 * tensor_bytes + cols * static_cast<int64_t>(di.size);
  void *y = nullptr, *res = nullptr, *bias = nullptr, *src = nullptr, *dst = nullptr;
  TPEXT_CUDA_CHECK(cudaMalloc(&y, tensor_bytes));
  TPEXT_CUDA_CHECK(cudaMalloc(&res, tensor_bytes));
  TPEXT_CUDA_CHECK(cudaMalloc(&bias, cols * di.size));
  TPEXT_CUDA_CHECK(cudaMalloc(&src, bytes / 2));  // a copy of bytes/2 reads and writes `bytes` in all
  TPEXT_CUDA_CHECK(cudaMalloc(&dst, bytes / 2));
  TPEXT_CUDA_CHECK(cudaMemset(src, 0, bytes / 2));
  init_any(di.dtype, y, n, 0);
  init_any(di.dtype, res, n, 1);
  init_any(di.dtype, bias, cols, 2);

  const BiasResidualParams fused{y, cols, bias, res, cols, rows, cols, di.dtype};
  const BiasResidualParams bias_only{y, cols, bias, nullptr, cols, rows, cols, di.dtype};
  const BiasResidualParams res_only{y, cols, nullptr, res, cols, rows, cols, di.dtype};

  Result r{di.name, rows, cols, bytes, 2 * tensor_bytes < l2_bytes, false, 0, 0, 0, 0};
  tpext::kernels::launch_bias_residual_add(fused, nullptr);
  r.bad = verify_any(di.dtype, y, rows, cols, di.eps);
  r.correct = r.bad == 0;

  const int batch = static_cast<int>(std::clamp<int64_t>((int64_t{1} << 30) / bytes, 1, 1000));
  r.fused_ms = time_ms([&] { tpext::kernels::launch_bias_residual_add(fused, nullptr); }, batch, o.warmup, o.repeats,
                       start, stop);
  r.two_pass_ms = time_ms([&] {
    tpext::kernels::launch_bias_residual_add(bias_only, nullptr);
    tpext::kernels::launch_bias_residual_add(res_only, nullptr);
  }, batch, o.warmup, o.repeats, start, stop);
  r.memcpy_ms = time_ms([&] { TPEXT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes / 2, cudaMemcpyDeviceToDevice)); },
                        batch, o.warmup, o.repeats, start, stop);
  for (void* p : {y, res, bias, src, dst}) TPEXT_CUDA_CHECK(cudaFree(p));
  return r;
}

double gbps(int64_t bytes, double ms) { return static_cast<double>(bytes) / (ms * 1e-3) / 1e9; }

Options parse(int argc, char** argv) {
  Options o;
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    for (std::string item; std::getline(ss, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s\n", "usage: tpext_bench_epilogue_bw [--json PATH] [--repeats N] [--warmup N] [--sizes "
                          "1024x4096,8192x8192] [--dtypes bf16,fp16,fp32]");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
    const std::string v = argv[++i];
    if (a == "--json") o.json_path = v;
    else if (a == "--repeats") o.repeats = std::max(1, std::atoi(v.c_str()));
    else if (a == "--warmup") o.warmup = std::max(0, std::atoi(v.c_str()));
    else if (a == "--dtypes") o.dtypes = split(v);
    else if (a == "--sizes") {
      o.sizes.clear();
      for (const auto& s : split(v)) {
        long long rr = 0, cc = 0;
        if (std::sscanf(s.c_str(), "%lldx%lld", &rr, &cc) != 2 || rr <= 0 || cc <= 0) {
          throw std::runtime_error("--sizes: expected ROWSxCOLS, got '" + s + "'");
        }
        o.sizes.emplace_back(rr, cc);
      }
    } else {
      throw std::runtime_error("unknown argument " + a + " (known: --json --repeats --warmup --sizes --dtypes)");
    }
  }
  return o;
}

void write_json(const std::string& path, const cudaDeviceProp& prop, int runtime, const Options& o,
                const std::vector<Result>& results) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot open --json path " + path + ": " + std::strerror(errno));
  std::fprintf(f,
               "{\n  \"bench\": \"epilogue_bw\",\n  \"device\": \"%s\",\n  \"sm_count\": %d,\n"
               "  \"l2_bytes\": %d,\n  \"cuda_runtime\": %d,\n  \"repeats\": %d,\n  \"statistic\": \"median\",\n"
               "  \"baseline\": \"two launches: y += bias, then y += residual\",\n"
               "  \"napkin\": \"cudaMemcpyAsync D2D moving the same bytes\",\n  \"results\": [\n",
               prop.name, prop.multiProcessorCount, prop.l2CacheSize, runtime, o.repeats);
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    std::fprintf(f,
                 "    {\"dtype\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"bytes\": %lld, \"fits_l2\": %s, "
                 "\"correct\": %s, \"bad_elements\": %llu, \"fused_us\": %.3f, \"fused_gbps\": %.1f, "
                 "\"two_pass_us\": %.3f, \"two_pass_gbps\": %.1f, \"memcpy_us\": %.3f, \"memcpy_gbps\": %.1f, "
                 "\"fused_pct_of_memcpy\": %.1f}%s\n",
                 r.dtype.c_str(), static_cast<long long>(r.rows), static_cast<long long>(r.cols),
                 static_cast<long long>(r.bytes), r.in_l2 ? "true" : "false", r.correct ? "true" : "false", r.bad,
                 r.fused_ms * 1e3, gbps(r.bytes, r.fused_ms), r.two_pass_ms * 1e3, gbps(r.bytes, r.two_pass_ms),
                 r.memcpy_ms * 1e3, gbps(r.bytes, r.memcpy_ms), 100.0 * r.memcpy_ms / r.fused_ms,
                 i + 1 < results.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  if (std::fclose(f) != 0) throw std::runtime_error("cannot write --json path " + path);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    int dev = 0, runtime = 0;
    TPEXT_CUDA_CHECK(cudaGetDevice(&dev));
    TPEXT_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    cudaDeviceProp prop{};
    TPEXT_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    cudaEvent_t start, stop;
    TPEXT_CUDA_CHECK(cudaEventCreate(&start));
    TPEXT_CUDA_CHECK(cudaEventCreate(&stop));

    std::printf("epilogue_bw on %s (%d SMs, L2 %d MiB), median of %d; GB/s = bytes moved / time\n", prop.name,
                prop.multiProcessorCount, prop.l2CacheSize >> 20, o.repeats);
    std::printf("bytes moved = read y + read residual + read bias + write y; napkin = D2D memcpy of the same bytes\n");
    std::printf("%-5s %6s %6s %9s | %9s %8s | %9s %8s | %9s %8s | %7s %7s %s\n", "dtype", "rows", "cols", "MB",
                "fused us", "GB/s", "2-pass us", "GB/s", "memcpy us", "GB/s", "%memcpy", "vs2pass", "check");
    std::vector<Result> results;
    bool all_ok = true;
    for (const auto& ds : o.dtypes) {
      const DtypeInfo di = dtype_info(ds);
      for (const auto& [rows, cols] : o.sizes) {
        const Result r = run_one(o, di, rows, cols, prop.l2CacheSize, start, stop);
        all_ok = all_ok && r.correct;
        std::printf("%-5s %6lld %6lld %9.1f | %9.2f %8.1f | %9.2f %8.1f | %9.2f %8.1f | %6.1f%% %6.2fx %s%s\n",
                    r.dtype.c_str(), static_cast<long long>(rows), static_cast<long long>(cols), r.bytes / 1e6,
                    r.fused_ms * 1e3, gbps(r.bytes, r.fused_ms), r.two_pass_ms * 1e3, gbps(r.bytes, r.two_pass_ms),
                    r.memcpy_ms * 1e3, gbps(r.bytes, r.memcpy_ms), 100.0 * r.memcpy_ms / r.fused_ms,
                    r.two_pass_ms / r.fused_ms, r.correct ? "ok" : ("FAIL bad=" + std::to_string(r.bad)).c_str(),
                    r.in_l2 ? " (fits L2)" : "");
        results.push_back(r);
      }
    }
    if (!o.json_path.empty()) {
      write_json(o.json_path, prop, runtime, o, results);
      std::printf("wrote %s\n", o.json_path.c_str());
    }
    TPEXT_CUDA_CHECK(cudaEventDestroy(start));
    TPEXT_CUDA_CHECK(cudaEventDestroy(stop));
    return all_ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epilogue_bw: error: %s\n", e.what());
    return 2;
  }
}
