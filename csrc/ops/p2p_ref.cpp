// Host references of the P2P kernels' arithmetic, and the argument checks the P2P ops share. The
// references follow the kernels' order of operations (p2p.h in csrc/kernels), so on CPU the ops compute
// what the kernels compute, up to the order of the RMS reduction inside a row.
#include "ops/p2p.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace tpext::ops::p2p_ref {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor ordered_sum(const std::vector<at::Tensor>& parts) {
  TORCH_INTERNAL_ASSERT(!parts.empty());
  const auto acc = acc_type(parts[0].scalar_type());
  at::Tensor sum = parts[0].to(acc, /*non_blocking=*/false, /*copy=*/true);
  for (size_t p = 1; p < parts.size(); ++p) sum.add_(parts[p].to(acc));
  return sum;
}

std::tuple<at::Tensor, at::Tensor> residual_rmsnorm(at::Tensor acc, const std::optional<at::Tensor>& residual,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& weight,
                                                    double eps, at::ScalarType dtype) {
  const auto a = acc.scalar_type();
  if (bias.has_value()) acc.add_(bias->to(a));
  if (residual.has_value()) acc.add_(residual->to(a));
  at::Tensor h = acc.to(dtype, false, /*copy=*/true);
  at::Tensor hf = h.to(a, false, /*copy=*/true);
  at::Tensor rstd = hf.square().mean(-1, /*keepdim=*/true).add_(eps).rsqrt_();
  at::Tensor out = hf.mul_(rstd).mul_(weight.to(a)).to(dtype);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(const at::Tensor& grad_out,
                                                    const std::optional<at::Tensor>& grad_residual, const at::Tensor& h,
                                                    const at::Tensor& weight, double eps) {
  const auto a = acc_type(h.scalar_type());
  at::Tensor hf = h.to(a);
  at::Tensor dy = grad_out.to(a);
  at::Tensor rstd = hf.square().mean(-1, true).add_(eps).rsqrt_();
  at::Tensor n = hf * rstd;
  at::Tensor g = dy * weight.to(a);
  at::Tensor mean_gn = (g * n).mean(-1, true);
  at::Tensor dh = rstd * (g - n * mean_gn);
  if (grad_residual.has_value()) dh.add_(grad_residual->to(a));
  at::Tensor dw = (dy * n).reshape({-1, h.size(-1)}).sum(0);
  return {dh.to(h.scalar_type()), dw.to(weight.scalar_type())};
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "tpext.", op, ": ", arg,
              " must be float32, float16, bfloat16 or float64, got dtype ", s);
}

P2PAlgorithm check_algorithm(const char* op, int64_t algorithm) {
  TORCH_CHECK(algorithm >= static_cast<int64_t>(P2PAlgorithm::kCollective) &&
                  algorithm <= static_cast<int64_t>(P2PAlgorithm::kTwoShot),
              "tpext.", op, ": algorithm must be 0 (c10d collective), 1 (one-shot P2P) or 2 (two-shot P2P), got ",
              algorithm);
  return static_cast<P2PAlgorithm>(algorithm);
}

namespace {
void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "tpext.", op, ": ", arg, " dtype ", t.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "tpext.", op, ": ", arg, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
}
}  // namespace

void check_norm_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& bias, const at::Tensor& weight, double eps) {
  check_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "tpext.", op, ": x must be [*, hidden] with at least 1 dim, got a 0-dim tensor");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "tpext.", op, ": weight must be 1-D [hidden] = [", hidden,
              "] to match x ", x.sizes(), ", got shape ", weight.sizes());
  check_like(op, "weight", weight, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == hidden, "tpext.", op, ": bias must be 1-D [hidden] = [", hidden,
                "] to match x ", x.sizes(), ", got shape ", bias->sizes());
    check_like(op, "bias", *bias, x);
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "tpext.", op, ": residual must have the shape of x ", x.sizes(),
                ", got shape ", residual->sizes());
    check_like(op, "residual", *residual, x);
  }
  TORCH_CHECK(eps >= 0.0, "tpext.", op, ": eps must be >= 0, got ", eps);
}

void check_virtual(const char* op, at::TensorList xs) {
  TORCH_CHECK(!xs.empty() && xs.size() <= 8, "tpext.", op, ": xs must hold 1 to 8 tensors (one per virtual rank), got ",
              xs.size());
  check_dtype(op, "xs[0]", xs[0]);
  for (size_t r = 1; r < xs.size(); ++r) {
    TORCH_CHECK(xs[r].sizes() == xs[0].sizes() && xs[r].scalar_type() == xs[0].scalar_type() &&
                    xs[r].device() == xs[0].device(),
                "tpext.", op, ": every virtual rank's input must match xs[0] (", xs[0].sizes(), ", ",
                xs[0].scalar_type(), ", ", xs[0].device(), "), got xs[", r, "] ", xs[r].sizes(), ", ",
                xs[r].scalar_type(), ", ", xs[r].device());
  }
}

#ifdef TPEXT_WITH_CUDA
kernels::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: return kernels::DType::kFloat64;  // check_dtype admitted only these four
  }
}
#endif

at::Tensor aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(); }

}  // namespace tpext::ops::p2p_ref
