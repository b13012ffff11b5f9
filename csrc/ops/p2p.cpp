// The group P2P ops: checks, then one of three paths per call (see p2p.h): the group's collective
// (c10d), the host reference of the kernels (CPU tensors), or the kernels over the group's symmetric
// buffers (CUDA). The path depends only on arguments that are equal on every rank (algorithm, sizes,
// the group's agreed P2P state), so all ranks take the same one: a rank in a P2P kernel never waits
// for a peer that went to NCCL.
//
// Checks on the kernel path, in order, all before this rank launches: (1) arguments (dtype, shapes)
// and what the ranks agreed at enable (world, capacity): the same answer on every rank, given the
// contract that every rank passes the same shapes; (2) rank-local ones (the tensor's device, the
// group's abort word, the stream, and any failure while staging or launching): these cannot be agreed
// without a collective per call, so a refusal is stored into every rank's abort word
// (SymmetricBuffers::refuse) and peers that already launched return at once with an error naming this
// rank, instead of waiting for it. The launch shape never depends on a rank-local pointer: outputs and
// operands are 16-byte aligned by construction (p2p_ref::aligned), so the launchers' alignment checks
// pass on every rank.
#include "ops/p2p.h"

#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include "comm/c10d.h"
#include "comm/communicator.h"
#include "comm/p2p.h"

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_check.h"
#endif

namespace tpext::ops {
namespace {

// The kernel of each op, as choose_route takes it (kernels::P2POp values; plain ints so that a CPU build,
// which has no kernels header, compiles the same calls). All-reduce passes its algorithm (1, 2).
constexpr int kReduceScatterOp = 3, kAllGatherOp = 4, kNormOp = 5;
#ifdef TPEXT_WITH_CUDA
static_assert(kReduceScatterOp == static_cast<int>(kernels::P2POp::kReduceScatter) &&
                  kAllGatherOp == static_cast<int>(kernels::P2POp::kAllGather) &&
                  kNormOp == static_cast<int>(kernels::P2POp::kResidualRMSNorm) &&
                  static_cast<int>(kernels::P2POp::kAllReduceOneShot) == 1 &&
                  static_cast<int>(kernels::P2POp::kAllReduceTwoShot) == 2,
              "choose_route's op numbers are kernels::P2POp's");
#endif

enum class Path { kC10d, kReference, kKernel };

struct Route {
  Path path = Path::kC10d;
#ifdef TPEXT_WITH_CUDA
  std::shared_ptr<comm::SymmetricBuffers> buffers;  // kKernel only
  std::unique_lock<std::mutex> launch;              // kKernel: held through the launch (begin_launch)
  kernels::P2POp kernel_op = kernels::P2POp::kAllReduceOneShot;
#endif
};

#ifdef TPEXT_WITH_CUDA
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }
#endif

Route choose_route(const char* op, const at::Tensor& x, const comm::Communicator& c, const std::string& group,
                   P2PAlgorithm algorithm, int64_t nbytes, [[maybe_unused]] int kernel_op) {
  if (algorithm == P2PAlgorithm::kCollective || c.size() == 1) return {};
  if (!x.is_cuda()) {
    comm::warn_fallback_once(group, op,
                             "the tensors are on the CPU; ran the host reference of the P2P kernels instead "
                             "(all-gather over c10d, then the kernels' rank-order sum)");
    Route p;
    p.path = Path::kReference;
    return p;
  }
#ifdef TPEXT_WITH_CUDA
  std::string reason;
  auto buf = comm::find_symmetric_buffers(group, &reason);
  if (buf) {
    TORCH_CHECK(buf->world() == c.size(), "tpext.", op, ": the symmetric buffers of group '", group, "' were made for ",
                buf->world(), " ranks, the group has ", c.size());
    if (nbytes <= buf->capacity()) {
      Route p;
      p.path = Path::kKernel;
      p.kernel_op = static_cast<kernels::P2POp>(kernel_op);
      if (buf->device() != x.get_device()) {
        buf->refuse(p.kernel_op);
        TORCH_CHECK(false, "tpext.", op, ": x is on cuda:", x.get_device(), " but the symmetric buffers of group '",
                    group, "' are on cuda:", buf->device(), " (refused on this rank; its peers are told)");
      }
      try {
        p.launch = buf->begin_launch(stream_of(x), group, op);
      } catch (...) {
        buf->refuse(p.kernel_op);  // a no-op when the group was already aborted
        throw;
      }
      p.buffers = std::move(buf);
      return p;
    }
    reason = "the message (" + std::to_string(nbytes) + " bytes) exceeds the symmetric buffer capacity (" +
             std::to_string(buf->capacity()) + " bytes)";
  }
  comm::warn_fallback_once(group, op, reason + "; using the group's collective (NCCL) instead");
#else
  comm::warn_fallback_once(group, op, "tpext was built without CUDA; using the group's collective instead");
#endif
  return {};
}

std::vector<at::Tensor> gather_parts(comm::Communicator& c, const at::Tensor& xc) {
  std::vector<at::Tensor> parts;
  for (int r = 0; r < c.size(); ++r) parts.push_back(at::empty_like(xc));
  at::Tensor in = xc;
  c.all_gather(parts, in)->wait();
  return parts;
}

#ifdef TPEXT_WITH_CUDA
// Stream-ordered copy of this rank's input into its symmetric buffer, then the table for the launch.
kernels::P2PGroup stage(comm::SymmetricBuffers& buf, const at::Tensor& xc) {
  TPEXT_CUDA_CHECK(
      cudaMemcpyAsync(buf.local_data(), xc.data_ptr(), xc.nbytes(), cudaMemcpyDeviceToDevice, stream_of(xc)));
  return buf.table();
}

// Runs the allocation, staging and launch of a kernel-path call. A failure there is rank-local while
// the peers may have launched: it is refused to them first (see the top of this file).
template <typename F>
void launch_or_refuse(const Route& route, F&& f) {
  try {
    f();
  } catch (...) {
    route.buffers->refuse(route.kernel_op);
    throw;
  }
}

// The reduce-scatter and all-gather kernels take one params shape: x staged, `out` (aligned here) written.
void launch_scatter_gather(const Route& route, at::Tensor& out, const at::Tensor& xc,
                           void (*launch)(const kernels::P2PScatterGatherParams&, cudaStream_t)) {
  launch_or_refuse(route, [&] {
    out = p2p_ref::aligned(out);
    kernels::P2PScatterGatherParams p{};
    p.group = stage(*route.buffers, xc);
    p.out = out.data_ptr();
    p.numel = xc.numel();
    p.dtype = p2p_ref::kernel_dtype(xc.scalar_type());
    launch(p, stream_of(xc));
  });
}
#endif

}  // namespace

at::Tensor p2p_all_reduce(const at::Tensor& x, const std::string& group_name, int64_t algorithm) {
  const char* op = "p2p_all_reduce";
  p2p_ref::check_dtype(op, "x", x);
  const P2PAlgorithm algo = p2p_ref::check_algorithm(op, algorithm);
  c10::DeviceGuard guard(x.device());
  auto c = comm::make_c10d_communicator(group_name, op);
  at::Tensor xc = x.contiguous();
  if (xc.numel() == 0) return xc.clone();
  const Route route = choose_route(op, x, *c, group_name, algo, static_cast<int64_t>(xc.nbytes()),
                                   algo == P2PAlgorithm::kOneShot ? 1 : 2);
  if (route.path == Path::kReference) return p2p_ref::ordered_sum(gather_parts(*c, xc)).to(x.scalar_type());
#ifdef TPEXT_WITH_CUDA
  if (route.path == Path::kKernel) {
    at::Tensor out;
    launch_or_refuse(route, [&] {
      out = p2p_ref::aligned(at::empty_like(xc));
      kernels::P2PAllReduceParams p{};
      p.group = stage(*route.buffers, xc);
      p.out = out.data_ptr();
      p.numel = xc.numel();
      p.dtype = p2p_ref::kernel_dtype(x.scalar_type());
      p.algo = algo == P2PAlgorithm::kOneShot ? kernels::P2PAlgo::kOneShot : kernels::P2PAlgo::kTwoShot;
      kernels::launch_p2p_all_reduce(p, stream_of(x));
    });
    return out;
  }
#endif
  at::Tensor y = xc.clone();
  c->all_reduce(y)->wait();
  return y;
}

at::Tensor p2p_reduce_scatter(const at::Tensor& x, const std::string& group_name, int64_t algorithm) {
  const char* op = "p2p_reduce_scatter";
  p2p_ref::check_dtype(op, "x", x);
  const P2PAlgorithm algo = p2p_ref::check_algorithm(op, algorithm);
  c10::DeviceGuard guard(x.device());
  auto c = comm::make_c10d_communicator(group_name, op);
  const int world = c->size();
  TORCH_CHECK(x.dim() >= 1 && x.size(0) % world == 0, "tpext.", op,
              ": x must be [R * m, *] with dim 0 divisible by the ", "group size R = ", world, ", got shape ",
              x.sizes());
  at::Tensor xc = x.contiguous();
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[0] /= world;
  at::Tensor out = at::empty(sizes, x.options());
  if (xc.numel() == 0) return out;
  const Route route =
      choose_route(op, x, *c, group_name, algo, static_cast<int64_t>(xc.nbytes()), static_cast<int>(kReduceScatterOp));
  if (route.path == Path::kReference) {
    std::vector<at::Tensor> blocks;
    for (const at::Tensor& part : gather_parts(*c, xc))
      blocks.push_back(part.narrow(0, c->rank() * sizes[0], sizes[0]));
    return p2p_ref::ordered_sum(blocks).to(x.scalar_type());
  }
#ifdef TPEXT_WITH_CUDA
  if (route.path == Path::kKernel) {
    launch_scatter_gather(route, out, xc, &kernels::launch_p2p_reduce_scatter);
    return out;
  }
#endif
  c->reduce_scatter(out, xc)->wait();
  return out;
}

at::Tensor p2p_all_gather(const at::Tensor& x, const std::string& group_name, int64_t algorithm) {
  const char* op = "p2p_all_gather";
  p2p_ref::check_dtype(op, "x", x);
  const P2PAlgorithm algo = p2p_ref::check_algorithm(op, algorithm);
  TORCH_CHECK(x.dim() >= 1, "tpext.", op, ": x must be [m, *] with at least 1 dim, got a 0-dim tensor");
  c10::DeviceGuard guard(x.device());
  auto c = comm::make_c10d_communicator(group_name, op);
  const int world = c->size();
  at::Tensor xc = x.contiguous();
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[0] *= world;
  at::Tensor out = at::empty(sizes, x.options());
  if (xc.numel() == 0) return out;
  [[maybe_unused]] const Route route =
      choose_route(op, x, *c, group_name, algo, static_cast<int64_t>(xc.nbytes()), static_cast<int>(kAllGatherOp));
#ifdef TPEXT_WITH_CUDA
  if (route.path == Path::kKernel) {
    launch_scatter_gather(route, out, xc, &kernels::launch_p2p_all_gather);
    return out;
  }
#endif
  // The reference and the collective are the same data movement: dim-0 blocks of `out`, in rank order.
  std::vector<at::Tensor> blocks;
  for (int r = 0; r < world; ++r) blocks.push_back(out.narrow(0, r * x.size(0), x.size(0)));
  c->all_gather(blocks, xc)->wait();
  return out;
}

std::tuple<at::Tensor, at::Tensor> p2p_all_reduce_residual_rmsnorm(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& weight, double eps,
                                                                   const std::string& group_name, int64_t algorithm) {
  const char* op = "p2p_all_reduce_residual_rmsnorm";
  p2p_ref::check_norm_args(op, x, residual, bias, weight, eps);
  const P2PAlgorithm algo = p2p_ref::check_algorithm(op, algorithm);
  c10::DeviceGuard guard(x.device());
  auto c = comm::make_c10d_communicator(group_name, op);
  at::Tensor xc = x.contiguous();
  if (xc.numel() == 0) return {at::empty_like(xc), at::empty_like(xc)};
  // The kernel has no two-shot variant: it is one-shot whatever P2P algorithm was asked for.
  const Route route =
      choose_route(op, x, *c, group_name, algo, static_cast<int64_t>(xc.nbytes()), static_cast<int>(kNormOp));
  if (route.path == Path::kReference) {
    return p2p_ref::residual_rmsnorm(p2p_ref::ordered_sum(gather_parts(*c, xc)), residual, bias, weight, eps,
                                     x.scalar_type());
  }
#ifdef TPEXT_WITH_CUDA
  if (route.path == Path::kKernel) {
    at::Tensor out, new_res;
    launch_or_refuse(route, [&] {
      out = p2p_ref::aligned(at::empty_like(xc));
      new_res = p2p_ref::aligned(at::empty_like(xc));
      // 16-byte aligned copies where needed: the kernel picks its vector width (and with it the block size
      // and the reduction tree) from the pointers' alignment, which must not differ between ranks or the
      // ranks' results would differ in the last bit (and the device-sync launcher refuses misalignment).
      at::Tensor res_c = residual.has_value() ? p2p_ref::aligned(residual->contiguous()) : at::Tensor();
      at::Tensor bias_c = bias.has_value() ? p2p_ref::aligned(bias->contiguous()) : at::Tensor();
      at::Tensor w_c = p2p_ref::aligned(weight.contiguous());
      kernels::P2PResidualRMSNormParams p{};
      p.group = stage(*route.buffers, xc);
      p.residual = res_c.defined() ? res_c.data_ptr() : nullptr;
      p.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
      p.weight = w_c.data_ptr();
      p.out = out.data_ptr();
      p.new_residual = new_res.data_ptr();
      p.hidden = x.size(-1);
      p.rows = xc.numel() / p.hidden;
      p.eps = eps;
      p.dtype = p2p_ref::kernel_dtype(x.scalar_type());
      kernels::launch_p2p_all_reduce_residual_rmsnorm(p, stream_of(x));
    });
    return {out, new_res};
  }
#endif
  at::Tensor y = xc.clone();
  c->all_reduce(y)->wait();
  return p2p_ref::residual_rmsnorm(y.to(p2p_ref::acc_type(x.scalar_type()), false, true), residual, bias, weight, eps,
                                   x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> p2p_rmsnorm_backward(const at::Tensor& grad_out,
                                                        const std::optional<at::Tensor>& grad_residual,
                                                        const at::Tensor& h, const at::Tensor& weight, double eps) {
  const char* op = "p2p_rmsnorm_backward";
  p2p_ref::check_norm_args(op, h, std::nullopt, std::nullopt, weight, eps);
  TORCH_CHECK(
      grad_out.sizes() == h.sizes() && grad_out.scalar_type() == h.scalar_type() && grad_out.device() == h.device(),
      "tpext.", op, ": grad_out must match h (", h.sizes(), ", ", h.scalar_type(), ", ", h.device(), "), got ",
      grad_out.sizes(), ", ", grad_out.scalar_type(), ", ", grad_out.device());
  if (grad_residual.has_value()) {
    TORCH_CHECK(grad_residual->sizes() == h.sizes() && grad_residual->scalar_type() == h.scalar_type() &&
                    grad_residual->device() == h.device(),
                "tpext.", op, ": grad_residual must match h (", h.sizes(), ", ", h.scalar_type(), ", ", h.device(),
                "), got ", grad_residual->sizes(), ", ", grad_residual->scalar_type(), ", ", grad_residual->device());
  }
#ifdef TPEXT_WITH_CUDA
  if (h.is_cuda() && h.numel() > 0) {
    c10::DeviceGuard guard(h.device());
    at::Tensor h_c = h.contiguous(), dy_c = grad_out.contiguous(), w_c = weight.contiguous();
    at::Tensor din = grad_residual.has_value() ? grad_residual->contiguous() : at::Tensor();
    at::Tensor dh = at::empty_like(h_c);
    kernels::RMSNormBackwardParams p{};
    p.hidden = h.size(-1);
    p.rows = h_c.numel() / p.hidden;
    at::Tensor part = at::empty({kernels::rmsnorm_backward_blocks(p.rows), p.hidden},
                                h.options().dtype(p2p_ref::acc_type(h.scalar_type())));
    p.grad_out = dy_c.data_ptr();
    p.grad_h_in = din.defined() ? din.data_ptr() : nullptr;
    p.h = h_c.data_ptr();
    p.weight = w_c.data_ptr();
    p.grad_h = dh.data_ptr();
    p.grad_weight_partial = part.data_ptr();
    p.eps = eps;
    p.dtype = p2p_ref::kernel_dtype(h.scalar_type());
    kernels::launch_rmsnorm_backward(p, stream_of(h));
    return {dh, part.sum(0).to(weight.scalar_type())};
  }
#endif
  return p2p_ref::rmsnorm_backward(grad_out, grad_residual, h, weight, eps);
}

}  // namespace tpext::ops
