#include "ops/virtual_ranks.h"

#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#include <c10/util/Exception.h>

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "comm/virtual.h"
#include "ops/gemm_collectives.h"

namespace tpext::ops {
namespace {

std::vector<at::Tensor> call_op(const std::string& op, const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                const std::string& group, int64_t chunks, int64_t algorithm) {
  if (op == "gemm_all_reduce") return {gemm_all_reduce(x, w, bias, group, chunks, algorithm, residual)};
  if (op == "gemm_reduce_scatter") return {gemm_reduce_scatter(x, w, bias, group, chunks, algorithm, residual)};
  TORCH_CHECK(!residual.has_value(), "tpext: all_gather_gemm takes no residual");
  auto [y, x_full] = all_gather_gemm(x, w, bias, group, chunks, algorithm);
  return {y, x_full};
}

std::optional<at::Tensor> nth(const std::vector<at::Tensor>& v, size_t r) {
  return v.empty() ? std::nullopt : std::optional<at::Tensor>(v[r]);
}

}  // namespace

std::vector<std::vector<at::Tensor>> run_on_virtual_ranks(const std::string& op, const std::vector<at::Tensor>& xs,
                                                          const std::vector<at::Tensor>& ws,
                                                          const std::vector<at::Tensor>& biases,
                                                          const std::vector<at::Tensor>& residuals, int64_t chunks,
                                                          int64_t algorithm) {
  const size_t world = xs.size();
  TORCH_CHECK(op == "gemm_all_reduce" || op == "gemm_reduce_scatter" || op == "all_gather_gemm", "tpext: unknown op '",
              op, "' for virtual ranks");
  TORCH_CHECK(world >= 1 && ws.size() == world && (biases.empty() || biases.size() == world) &&
                  (residuals.empty() || residuals.size() == world),
              "tpext: virtual ranks need one x, w (and bias / residual, if any) per rank, got ", xs.size(), " x, ",
              ws.size(), " w, ", biases.size(), " bias, ", residuals.size(), " residual");
  const std::vector<std::string> names = comm::make_virtual_group(static_cast<int64_t>(world));
  std::vector<std::vector<at::Tensor>> outputs(world);
  std::vector<std::exception_ptr> errors(world);
  std::mutex first_mu;
  std::optional<size_t> first_failed;
#ifdef TPEXT_WITH_CUDA
  const bool cuda = xs[0].is_cuda();
  std::optional<c10::cuda::CUDAEvent> inputs_ready;
  if (cuda) {
    inputs_ready.emplace();
    inputs_ready->record(c10::cuda::getCurrentCUDAStream(xs[0].device().index()));
  }
  std::vector<std::optional<c10::cuda::CUDAEvent>> rank_done(world);
#endif

  std::vector<std::thread> threads;
  for (size_t r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
#ifdef TPEXT_WITH_CUDA
      // Each rank on a stream of its own, as if on its own GPU; ordered after the caller's inputs.
      std::optional<c10::cuda::CUDAStream> stream;
      if (cuda) stream = c10::cuda::getStreamFromPool(false, xs[r].device().index());
#endif
      try {
#ifdef TPEXT_WITH_CUDA
        std::optional<c10::cuda::CUDAStreamGuard> on_rank_stream;
        if (cuda) {
          inputs_ready->block(*stream);
          on_rank_stream.emplace(*stream);
        }
#endif
        outputs[r] = call_op(op, xs[r], ws[r], nth(biases, r), nth(residuals, r), names[r], chunks, algorithm);
      } catch (const std::exception& e) {
        errors[r] = std::current_exception();
        {
          std::lock_guard<std::mutex> lock(first_mu);
          if (!first_failed) first_failed = r;
        }
        comm::abort_virtual_group(names[r], "rank " + std::to_string(r) + " failed: " + e.what());
      }
#ifdef TPEXT_WITH_CUDA
      if (cuda) {  // also after a failure: the caller must not reuse inputs a rank's kernels still read
        rank_done[r].emplace();
        rank_done[r]->record(*stream);
      }
#endif
    });
  }
  for (auto& t : threads) t.join();
  comm::release_virtual_group(names[0]);
#ifdef TPEXT_WITH_CUDA
  if (cuda) {
    const auto caller = c10::cuda::getCurrentCUDAStream(xs[0].device().index());
    for (auto& done : rank_done) done->block(caller);
    // The outputs were allocated on the ranks' streams: freeing them must wait for the caller's use too.
    for (auto& rank_outputs : outputs) {
      for (auto& t : rank_outputs) {
        if (t.defined()) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), caller);
      }
    }
  }
#endif
  if (first_failed) std::rethrow_exception(errors[*first_failed]);
  return outputs;
}

}  // namespace tpext::ops
