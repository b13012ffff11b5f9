// The bounded waits of the device-synchronised P2P kernels (kernels/p2p.h), in one process on one GPU:
// "rank 0" of a 2-rank group launches, "rank 1" never does (its signal area is plain device memory that
// nothing writes). Nothing spins across processes, so this is safe on one GPU. Checked:
//   * the launch returns within a small multiple of timeout_ns instead of hanging;
//   * the host-mapped word holds a timeout code naming the op, rank 0, peer 1, barrier 1;
//   * the code also reached rank 1's abort word (so its blocks would stop waiting too);
//   * a later launch on the aborted group returns at once (no second timeout);
//   * a group whose abort word is set before the launch (a peer's refusal) never waits;
//   * every op's grid stays within p2p_max_coresident_blocks.
// Exit status non-zero on any failure; a machine without a GPU reports that and fails.
#include "common/cuda_check.h"
#include "kernels/p2p.h"

#include "kernel_test.cuh"

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

using namespace tpext::kernels;
namespace ab = tpext::kernels::p2p_abort;

namespace {

struct Group {
  void* data[2] = {};
  uint32_t* signals[2] = {};
  uint32_t* host_abort = nullptr;
  uint32_t* host_abort_dev = nullptr;
  void* out = nullptr;
  Group() {
    for (int r = 0; r < 2; ++r) {
      TPEXT_CUDA_CHECK(cudaMalloc(&data[r], 1 << 16));
      TPEXT_CUDA_CHECK(cudaMemset(data[r], 0, 1 << 16));
      TPEXT_CUDA_CHECK(cudaMalloc(&signals[r], kP2PSignalBytes));
      TPEXT_CUDA_CHECK(cudaMemset(signals[r], 0, kP2PSignalBytes));
    }
    TPEXT_CUDA_CHECK(cudaMalloc(&out, 1 << 16));
    TPEXT_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_abort), sizeof(uint32_t), cudaHostAllocMapped));
    *host_abort = 0;
    TPEXT_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_abort_dev), host_abort, 0));
  }
  ~Group() {
    for (int r = 0; r < 2; ++r) {
      cudaFree(data[r]);
      cudaFree(signals[r]);
    }
    cudaFree(out);
    cudaFreeHost(host_abort);
  }
  P2PGroup table(uint64_t timeout_ns) const {
    P2PGroup g{};
    for (int r = 0; r < 2; ++r) {
      g.buffers[r] = data[r];
      g.signals[r] = signals[r];
    }
    g.world = 2;
    g.rank = 0;
    g.host_abort = host_abort_dev;
    g.timeout_ns = timeout_ns;
    g.max_blocks = 0;
    return g;
  }
  uint32_t abort_word(int r) const {
    uint32_t v = 0;
    TPEXT_CUDA_CHECK(cudaMemcpy(&v, signals[r] + kP2PAbortWord, sizeof(v), cudaMemcpyDeviceToHost));
    return v;
  }
};

int failures = 0;
void expect(bool ok, const char* what) {
  std::printf("  %-64s %s\n", what, ok ? "ok" : "FAILED");
  failures += ok ? 0 : 1;
}

double one_shot_seconds(const P2PGroup& g, void* out, int64_t numel) {
  P2PAllReduceParams p{};
  p.group = g;
  p.out = out;
  p.numel = numel;
  p.dtype = DType::kFloat32;
  p.algo = P2PAlgo::kOneShot;
  const auto t0 = std::chrono::steady_clock::now();
  launch_p2p_all_reduce(p, nullptr);
  TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  return tpext::testing::test_main("test_p2p_timeout", "check", [] {
    const int cap = p2p_max_coresident_blocks(0);
    std::printf("test_p2p_timeout: p2p_max_coresident_blocks(0) = %d\n", cap);
    expect(cap >= 1 && cap <= kP2PMaxBlocks, "co-resident grid cap within [1, kP2PMaxBlocks]");
    constexpr uint64_t kTimeout = 50'000'000;  // 50 ms
    {
      Group grp;
      // 8192 floats: several blocks, every one of them waits for the absent rank 1.
      const double s = one_shot_seconds(grp.table(kTimeout), grp.out, 8192);
      std::printf("  timed out after %.3f s (budget %.3f s)\n", s, kTimeout * 1e-9);
      expect(s >= kTimeout * 1e-9 && s < 5.0, "a launch whose peer never comes returns after about the budget");
      const uint32_t code = *static_cast<volatile uint32_t*>(grp.host_abort);
      expect(code != 0 && ab::kind(code) == ab::kTimeout, "the host word holds a timeout code");
      expect(ab::op(code) == P2POp::kAllReduceOneShot && ab::rank(code) == 0 && ab::peer(code) == 1 &&
                 ab::barrier(code) == 1,
             "the code names the op, this rank, the absent peer and barrier 1");
      expect(grp.abort_word(1) != 0, "the absent peer's abort word was set too");
      const double again = one_shot_seconds(grp.table(kTimeout), grp.out, 8192);
      expect(again < kTimeout * 1e-9, "a later launch on the aborted group returns without waiting");
    }
    {
      Group grp;
      const uint32_t refusal = ab::encode(ab::kRefused, P2POp::kResidualRMSNorm, 1, 0, 0, 0);
      TPEXT_CUDA_CHECK(cudaMemcpy(grp.signals[0] + kP2PAbortWord, &refusal, sizeof(refusal), cudaMemcpyHostToDevice));
      const double s = one_shot_seconds(grp.table(10'000'000'000ull), grp.out, 8192);  // budget 10 s: unused
      expect(s < 1.0, "a launch after a peer's refusal returns at once");
      expect(*static_cast<volatile uint32_t*>(grp.host_abort) == refusal, "the host word holds the peer's refusal");
    }
    return failures;
  });
}
