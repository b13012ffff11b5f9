// The three overlapped GEMM + collective ops: argument checks, flattening of leading dims, output
// allocation, device guard, the bias/residual epilogue and the group-of-one fast path (one GEMM, no
// collective); the chunk loops themselves live in csrc/schedule.
#include "ops/gemm_collectives.h"

#include <exception>
#include <functional>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include "comm/c10d.h"
#include "comm/communicator.h"
#include "ops/epilogue.h"
#include "schedule/schedule.h"

namespace tpext::ops {
namespace {

// Validates what every op shares (including the schedule: chunks and algorithm). Runs before any
// communicator is made or used and depends only on local arguments, so a bad call fails on the rank that made it
// instead of leaving its peers waiting.
void check_gemm_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& bias, int64_t chunks, int64_t algorithm) {
  TORCH_CHECK(x.dim() >= 2, "tpext.", op, ": ", x_name, " must be [*, K] with at least 2 dims, got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "tpext.", op, ": w must be 2-D [N, K] (nn.Linear layout), got shape ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "tpext.", op, ": ", x_name, "'s last dim K = ", x.size(-1),
              " must equal w.size(1) (w is [N, K]), got ", x_name, " ", x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "tpext.", op, ": ", x_name,
              " must be a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "tpext.", op, ": w dtype ", w.scalar_type(), " must match ", x_name,
              " dtype ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "tpext.", op, ": w is on ", w.device(), " but ", x_name, " is on ", x.device(),
              "; all tensors must be on one device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "tpext.", op, ": bias must be 1-D [N] = [", w.size(0),
                "] to match w [N, K] = ", w.sizes(), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "tpext.", op, ": bias dtype ", bias->scalar_type(),
                " must match ", x_name, " dtype ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "tpext.", op, ": bias is on ", bias->device(), " but ", x_name, " is on ",
                x.device(), "; all tensors must be on one device");
  }
  TORCH_CHECK(chunks >= 1, "tpext.", op, ": chunks must be >= 1 (1 = sequential), got ", chunks);
  TORCH_CHECK(algorithm >= 0 && algorithm < schedule::kNumAlgorithms, "tpext.", op,
              ": algorithm must be 0 (sequential), 1 (chunked_pipeline) or 2 (chunked_two_streams), got ", algorithm);
  TORCH_CHECK(algorithm != static_cast<int64_t>(schedule::Algorithm::kSequential) || chunks == 1, "tpext.", op,
              ": algorithm 0 (sequential) runs one chunk, so chunks must be 1, got ", chunks);
}

// Runs an op's argument checks. `local_checks` see only this rank's arguments and run before any
// collective, so a bad call fails on the rank that made it. Under TORCH_DISTRIBUTED_DEBUG=DETAIL the
// ranks first compare what they cannot see alone (comm::check_ranks_agree): the collective's sizes (rows
// of x, the width it moves), dtype and schedule, and whether each rank's local checks passed, so a rank that
// rejects its arguments does not leave the others waiting in that comparison.
void check_args(const std::string& group_name, const char* op, const at::Tensor& x, const char* width_name,
                int64_t width, int64_t chunks, int64_t algorithm, const std::function<void()>& local_checks) {
  std::exception_ptr rejected;
  try {
    local_checks();
  } catch (...) {
    rejected = std::current_exception();
  }
  const int64_t rows = x.dim() >= 1 ? c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1) : 0;
  comm::check_ranks_agree(group_name, op, x.device(),
                          {{"arguments accepted (1) or rejected (0)", rejected ? 0 : 1},
                           {"rows (leading dims of x flattened)", rows},
                           {width_name, width},
                           {"dtype", static_cast<int64_t>(x.scalar_type())},
                           {"chunks", chunks},
                           {"algorithm", algorithm}});
  if (rejected) std::rethrow_exception(rejected);
}

schedule::Schedule schedule_of(int64_t chunks, int64_t algorithm) {
  return {static_cast<schedule::Algorithm>(algorithm), chunks};
}

// The residual has the op's output shape; checked before any collective like everything else.
void check_residual(const char* op, const std::optional<at::Tensor>& residual, c10::IntArrayRef out_sizes,
                    const at::Tensor& x) {
  if (!residual.has_value()) return;
  TORCH_CHECK(residual->sizes() == out_sizes, "tpext.", op, ": residual must have the output's shape ", out_sizes,
              ", got ", residual->sizes());
  TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "tpext.", op, ": residual dtype ", residual->scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(residual->device() == x.device(), "tpext.", op, ": residual is on ", residual->device(), " but x is on ",
              x.device(), "; all tensors must be on one device");
}

// [d0, d1, ..., K] -> [d0 * d1 * ..., K], contiguous (a view whenever the input allows it). The row
// count is explicit: with K = 0 a -1 would be ambiguous.
at::Tensor rows_of(const at::Tensor& t) {
  return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)}).contiguous();
}

// Output sizes: `t`'s sizes with dim 0 replaced by `dim0` and the last dim by `last`.
std::vector<int64_t> sizes_like(const at::Tensor& t, int64_t dim0, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.front() = dim0;
  sizes.back() = last;
  return sizes;
}

// Bias and residual, added once to each finished block of output rows.
schedule::RowsEpilogue add_epilogue(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  if (!bias.has_value() && !residual.has_value()) return {};
  std::optional<at::Tensor> b, res;
  if (bias.has_value()) b.emplace(bias->contiguous());
  if (residual.has_value()) res.emplace(rows_of(*residual));
  return [b, res](at::Tensor& rows, int64_t first_row) {
    std::optional<at::Tensor> res_rows;
    if (res) res_rows = res->narrow(0, first_row, rows.size(0));
    add_bias_residual_(rows, b, res_rows);
  };
}

// A group of one: the collective is the identity, so the op is one GEMM straight into its output.
void local_gemm(const at::Tensor& x_rows, const at::Tensor& w, at::Tensor& y_rows,
                const schedule::RowsEpilogue& epilogue) {
  at::mm_out(y_rows, x_rows, w.t());
  if (epilogue) epilogue(y_rows, 0);
}

// The body the two reducing ops share once their arguments are checked: x @ w.T into `out` (y, or this
// rank's y_shard), reduced by `schedule_fn` over the group's communicator, or one local GEMM for a
// group of one; bias and residual added once by the epilogue.
using ReducingSchedule = void (*)(const at::Tensor&, const at::Tensor&, at::Tensor&, comm::Communicator&,
                                  const schedule::Schedule&, const schedule::RowsEpilogue&);
at::Tensor reducing_gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                         const std::string& group_name, const char* op, const schedule::Schedule& sched,
                         ReducingSchedule schedule_fn) {
  auto comm = comm::make_communicator(group_name, op, x.device());
  if (out.numel() == 0) return out;
  at::Tensor out_rows = rows_of(out);  // a view: out is contiguous
  const auto epilogue = add_epilogue(bias, residual);
  if (comm->local()) {
    local_gemm(rows_of(x), w, out_rows, epilogue);
  } else {
    schedule_fn(rows_of(x), w, out_rows, *comm, sched, epilogue);
  }
  return out;
}

}  // namespace

at::Tensor gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const std::string& group_name, int64_t chunks, int64_t algorithm,
                           const std::optional<at::Tensor>& residual) {
  c10::DeviceGuard guard(x.device());
  check_args(group_name, "gemm_all_reduce", x, "N (w.size(0))", w.dim() >= 1 ? w.size(0) : -1, chunks, algorithm, [&] {
    check_gemm_args("gemm_all_reduce", "x", x, w, bias, chunks, algorithm);
    check_residual("gemm_all_reduce", residual, sizes_like(x, x.size(0), w.size(0)), x);
  });
  return reducing_gemm(at::empty(sizes_like(x, x.size(0), w.size(0)), x.options()), x, w, bias, residual, group_name,
                       "gemm_all_reduce", schedule_of(chunks, algorithm), &schedule::gemm_all_reduce);
}

at::Tensor gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const std::string& group_name, int64_t chunks, int64_t algorithm,
                               const std::optional<at::Tensor>& residual) {
  const int64_t world = comm::group_size(group_name, "gemm_reduce_scatter");
  c10::DeviceGuard guard(x.device());
  check_args(group_name, "gemm_reduce_scatter", x, "N (w.size(0))", w.dim() >= 1 ? w.size(0) : -1, chunks, algorithm,
             [&] {
    check_gemm_args("gemm_reduce_scatter", "x", x, w, bias, chunks, algorithm);
    TORCH_CHECK(x.size(0) % world == 0, "tpext.gemm_reduce_scatter: x.size(0) = ", x.size(0),
                " must be divisible by the group size ", world, " (each rank receives x.size(0) / ", world,
                " rows), got x ", x.sizes());
    check_residual("gemm_reduce_scatter", residual, sizes_like(x, x.size(0) / world, w.size(0)), x);
  });
  return reducing_gemm(at::empty(sizes_like(x, x.size(0) / world, w.size(0)), x.options()), x, w, bias, residual,
                       group_name, "gemm_reduce_scatter", schedule_of(chunks, algorithm),
                       &schedule::gemm_reduce_scatter);
}

std::tuple<at::Tensor, at::Tensor> all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& bias, const std::string& group_name,
                                                   int64_t chunks, int64_t algorithm) {
  c10::DeviceGuard guard(x_shard.device());
  check_args(group_name, "all_gather_gemm", x_shard, "K (x_shard.size(-1))", x_shard.dim() >= 1 ? x_shard.size(-1) : -1,
             chunks, algorithm,
             [&] { check_gemm_args("all_gather_gemm", "x_shard", x_shard, w, bias, chunks, algorithm); });
  auto comm = comm::make_communicator(group_name, "all_gather_gemm", x_shard.device());
  const int64_t world = comm->size();

  at::Tensor x_full = at::empty(sizes_like(x_shard, world * x_shard.size(0), x_shard.size(-1)), x_shard.options());
  at::Tensor y = at::empty(sizes_like(x_shard, world * x_shard.size(0), w.size(0)), x_shard.options());
  // Views (both are contiguous). N = 0 still gathers: x_full is returned for the weight gradient.
  at::Tensor x_full_rows = rows_of(x_full);
  at::Tensor y_rows = rows_of(y);
  const auto epilogue = add_epilogue(bias, std::nullopt);
  if (x_full.numel() == 0) {
    // No rows, or K = 0 (both the same on every rank): nothing to gather, and y is the bias alone.
    local_gemm(x_full_rows, w, y_rows, epilogue);
  } else if (comm->local()) {
    x_full_rows.copy_(rows_of(x_shard));  // returned for the weight gradient: the one copy a group of one makes
    local_gemm(x_full_rows, w, y_rows, epilogue);
  } else {
    schedule::all_gather_gemm(rows_of(x_shard), w, x_full_rows, y_rows, *comm, schedule_of(chunks, algorithm),
                              epilogue);
  }
  return {y, x_full};
}

}  // namespace tpext::ops
