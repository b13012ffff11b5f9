// The three overlapped GEMM + collective ops: argument checks, flattening of leading dims, output
// allocation, device guard; the chunk loops themselves live in csrc/schedule.
#include "ops/ops.h"

#include <vector>

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include "comm/communicator.h"
#include "ops/epilogue.h"
#include "schedule/schedule.h"

namespace tpext::ops {
namespace {

// Validates what every op shares and returns the rows of the flattened [rows, K] input. Runs before
// any collective and depends only on local arguments, so a bad call fails on the rank that made it
// instead of leaving its peers waiting.
void check_gemm_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& bias, int64_t chunks) {
  TORCH_CHECK(x.dim() >= 2, "tpext.", op, ": ", x_name, " must be [*, K] with at least 2 dims, got shape ",
              x.sizes());
  TORCH_CHECK(w.dim() == 2, "tpext.", op, ": w must be 2-D [N, K] (nn.Linear layout), got shape ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "tpext.", op, ": ", x_name, "'s last dim K = ", x.size(-1),
              " must equal w.size(1) (w is [N, K]), got ", x_name, " ", x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "tpext.", op, ": ", x_name,
              " must be a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "tpext.", op, ": w dtype ", w.scalar_type(), " must match ",
              x_name, " dtype ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "tpext.", op, ": w is on ", w.device(), " but ", x_name, " is on ",
              x.device(), "; all tensors must be on one device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "tpext.", op, ": bias must be 1-D [N] = [",
                w.size(0), "] to match w [N, K] = ", w.sizes(), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "tpext.", op, ": bias dtype ", bias->scalar_type(),
                " must match ", x_name, " dtype ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "tpext.", op, ": bias is on ", bias->device(), " but ", x_name,
                " is on ", x.device(), "; all tensors must be on one device");
  }
  TORCH_CHECK(chunks >= 1, "tpext.", op, ": chunks must be >= 1 (1 = sequential), got ", chunks);
}

// [d0, d1, ..., K] -> [d0 * d1 * ..., K], contiguous (a view whenever the input allows it).
at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}).contiguous(); }

// Output sizes: `t`'s sizes with dim 0 replaced by `dim0` and the last dim by `last`.
std::vector<int64_t> sizes_like(const at::Tensor& t, int64_t dim0, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.front() = dim0;
  sizes.back() = last;
  return sizes;
}

schedule::RowsEpilogue bias_epilogue(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return {};
  at::Tensor b = bias->contiguous();
  return [b](at::Tensor& rows) { add_bias_(rows, b); };
}

}  // namespace

at::Tensor gemm_all_reduce(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const std::string& group_name, int64_t chunks) {
  check_gemm_args("gemm_all_reduce", "x", x, w, bias, chunks);
  c10::DeviceGuard guard(x.device());
  auto comm = comm::make_c10d_communicator(group_name, "gemm_all_reduce");

  at::Tensor y = at::empty(sizes_like(x, x.size(0), w.size(0)), x.options());
  if (y.numel() == 0) return y;
  at::Tensor y_rows = y.view({-1, w.size(0)});
  schedule::gemm_all_reduce(rows_of(x), w, y_rows, *comm, chunks, bias_epilogue(bias));
  return y;
}

at::Tensor gemm_reduce_scatter(const at::Tensor& x, const at::Tensor& w,
                               const std::optional<at::Tensor>& bias, const std::string& group_name,
                               int64_t chunks) {
  check_gemm_args("gemm_reduce_scatter", "x", x, w, bias, chunks);
  c10::DeviceGuard guard(x.device());
  auto comm = comm::make_c10d_communicator(group_name, "gemm_reduce_scatter");
  const int64_t world = comm->size();
  TORCH_CHECK(x.size(0) % world == 0, "tpext.gemm_reduce_scatter: x.size(0) = ", x.size(0),
              " must be divisible by the group size ", world, " (each rank receives x.size(0) / ", world,
              " rows), got x ", x.sizes());

  at::Tensor y_shard = at::empty(sizes_like(x, x.size(0) / world, w.size(0)), x.options());
  if (y_shard.numel() == 0) return y_shard;
  at::Tensor y_rows = y_shard.view({-1, w.size(0)});
  schedule::gemm_reduce_scatter(rows_of(x), w, y_rows, *comm, chunks, bias_epilogue(bias));
  return y_shard;
}

std::tuple<at::Tensor, at::Tensor> all_gather_gemm(const at::Tensor& x_shard, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::string& group_name, int64_t chunks) {
  check_gemm_args("all_gather_gemm", "x_shard", x_shard, w, bias, chunks);
  c10::DeviceGuard guard(x_shard.device());
  auto comm = comm::make_c10d_communicator(group_name, "all_gather_gemm");
  const int64_t world = comm->size();

  at::Tensor x_full = at::empty(sizes_like(x_shard, world * x_shard.size(0), x_shard.size(-1)), x_shard.options());
  at::Tensor y = at::empty(sizes_like(x_shard, world * x_shard.size(0), w.size(0)), x_shard.options());
  if (y.numel() == 0) return {y, x_full};
  at::Tensor x_full_rows = x_full.view({-1, x_shard.size(-1)});
  at::Tensor y_rows = y.view({-1, w.size(0)});
  schedule::all_gather_gemm(rows_of(x_shard), w, x_full_rows, y_rows, *comm, chunks, bias_epilogue(bias));
  return {y, x_full};
}

}  // namespace tpext::ops
