// Timing of one schedule over all devices with CUDA events: warm-up runs, then `iters` runs enqueued
// back to back with a start/stop event pair per run and device on lane 0 (the caller's stream; the
// schedules fork from it and join into it, ranks.cuh). The host waits once, on the last stop events.
// A run's time is the slowest device's; the result is the median over the runs.
#pragma once

#include "common/cuda_check.h"
#include "ranks.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

namespace tpext::bench {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// fn() enqueues one run of the schedule (forked from and joined into lane 0 of every device).
template <typename Fn>
double time_ms(Ranks& rk, Fn&& fn, int warmup, int iters) {
  std::vector<DeviceCtx>& devs = rk.devices();
  const size_t nd = devs.size();
  for (int w = 0; w < warmup; ++w) fn();
  rk.sync();
  std::vector<cudaEvent_t> start(nd * iters), stop(nd * iters);
  for (size_t d = 0; d < nd; ++d) {
    TPEXT_CUDA_CHECK(cudaSetDevice(devs[d].device));
    for (int i = 0; i < iters; ++i) {
      TPEXT_CUDA_CHECK(cudaEventCreate(&start[i * nd + d]));
      TPEXT_CUDA_CHECK(cudaEventCreate(&stop[i * nd + d]));
    }
  }
  for (int i = 0; i < iters; ++i) {
    for (size_t d = 0; d < nd; ++d) {
      TPEXT_CUDA_CHECK(cudaSetDevice(devs[d].device));
      TPEXT_CUDA_CHECK(cudaEventRecord(start[i * nd + d], devs[d].lanes[0]));
    }
    fn();
    for (size_t d = 0; d < nd; ++d) {
      TPEXT_CUDA_CHECK(cudaSetDevice(devs[d].device));
      TPEXT_CUDA_CHECK(cudaEventRecord(stop[i * nd + d], devs[d].lanes[0]));
    }
  }
  for (size_t d = 0; d < nd; ++d) {
    TPEXT_CUDA_CHECK(cudaSetDevice(devs[d].device));
    TPEXT_CUDA_CHECK(cudaEventSynchronize(stop[(iters - 1) * nd + d]));
  }
  std::vector<double> runs(static_cast<size_t>(iters), 0.0);
  for (int i = 0; i < iters; ++i) {
    for (size_t d = 0; d < nd; ++d) {
      float ms = 0.f;
      TPEXT_CUDA_CHECK(cudaEventElapsedTime(&ms, start[i * nd + d], stop[i * nd + d]));
      runs[i] = std::max(runs[i], static_cast<double>(ms));
    }
  }
  for (size_t d = 0; d < nd; ++d) {
    TPEXT_CUDA_CHECK(cudaSetDevice(devs[d].device));
    for (int i = 0; i < iters; ++i) {
      TPEXT_CUDA_CHECK(cudaEventDestroy(start[i * nd + d]));
      TPEXT_CUDA_CHECK(cudaEventDestroy(stop[i * nd + d]));
    }
  }
  return median(runs);
}

}  // namespace tpext::bench
