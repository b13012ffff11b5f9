"""Mixed precision: tpext under torch.autocast, as nn.Linear / the dense model under it.

The ops follow aten::linear's autocast policy (floating-point inputs cast to the autocast dtype, then
the op runs below autocast; a residual of a wider dtype is added after, as `linear(...) + residual`
would be), checked bit for bit against the op on cast inputs, eagerly and compiled.
The layers and parallelized models (tpext's Llama and Hugging Face Llama, SP on and off) run their
GEMMs and collectives in the autocast dtype and leave fp32 gradients on fp32 parameters. Accuracy is
held to the dense model's own: against an fp64 reference, the error of the tensor-parallel output, loss
and every gradient is at most twice the error of the dense model under the same autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from dist import SMALL_LLAMA, case_result, run_cases, run_ranks

import tpext
from tpext import mappings, ops
from tpext.models import LlamaConfig, LlamaForCausalLM
from tpext.nn import ColumnParallelLinear, RowParallelLinear
from tpext.sharding import get_layout, layouts

LOW = (torch.bfloat16, torch.float16)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check_error(
    what: str, got: torch.Tensor, dense: torch.Tensor, ref: torch.Tensor, floor: float = 0.0
) -> None:
    """got (tensor-parallel, autocast) within twice dense's (autocast) error against ref (fp64), or
    within `floor` (for a scalar, whose error is one draw rather than a norm over many)."""
    e_tp, e_dense = _rel_err(got, ref), _rel_err(dense, ref)
    assert e_tp <= max(2 * e_dense, floor), f"{what}: relative error {e_tp:.2e} > 2 x dense's {e_dense:.2e}"


# ---- ops --------------------------------------------------------------------------------------------------


def _op_cases(world: int):
    g = torch.Generator().manual_seed(dist.get_rank())
    x, w, b = (
        torch.randn(4 * world, 3, 16, generator=g),
        torch.randn(12, 16, generator=g),
        torch.randn(12, generator=g),
    )
    res_ar, res_rs = torch.randn(4 * world, 3, 12, generator=g), torch.randn(4, 3, 12, generator=g)
    return {
        "gemm_all_reduce": (ops.gemm_all_reduce, (x, w, b), dict(residual=res_ar)),
        "gemm_reduce_scatter": (ops.gemm_reduce_scatter, (x, w, b), dict(residual=res_rs)),
        "all_gather_gemm": (ops.all_gather_gemm, (x, w, b), {}),
    }


OP_NAMES = ("gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm")
OP_CASES = [(name, dtype) for name in OP_NAMES for dtype in (*LOW, torch.float64)]


def _op_case(name: str, dtype: torch.dtype) -> None:
    """One op under autocast(dtype) as on cast inputs; for float64, that autocast leaves fp64 inputs alone."""
    op, args, kwargs = _op_cases(dist.get_world_size())[name]
    if dtype == torch.float64:
        # fp64 is left alone by autocast, as aten::linear leaves it; so is everything outside autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = op(*(t.double() for t in args), chunks=2)
        assert (out[0] if isinstance(out, tuple) else out).dtype == torch.float64, name
        return
    cast = lambda t: t.to(dtype)  # noqa: E731
    with torch.autocast("cpu", dtype=dtype):
        got = op(*args, chunks=3)
    want = op(*map(cast, args), chunks=3)
    for g, r in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        assert g.dtype == dtype, f"{name} under autocast({dtype}): output {g.dtype}"
        assert torch.equal(g, r), f"{name} under autocast({dtype}) differs from the op on cast inputs"
    if "residual" in kwargs:
        residual = kwargs["residual"]
        # An fp32 residual is added after the op, in fp32, as linear(...) + residual is under autocast;
        # one already in the autocast dtype is fused into the op's epilogue.
        with torch.autocast("cpu", dtype=dtype):
            wide, fused = (
                op(*args, chunks=3, residual=residual),
                op(*args, chunks=3, residual=cast(residual)),
            )
        assert wide.dtype == torch.float32 and torch.equal(wide, want + residual), name
        assert fused.dtype == dtype and torch.equal(
            fused, op(*map(cast, args), chunks=3, residual=cast(residual))
        )


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"tp{w}")
def op_results(request):
    return run_cases(_op_case, request.param, OP_CASES)


@pytest.mark.parametrize("case", OP_CASES, ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in OP_CASES])
def test_ops_follow_linear_autocast_policy(op_results, case):
    case_result(op_results, case)


def _check_ops_compiled() -> None:
    op, (x, w, b), kwargs = _op_cases(dist.get_world_size())["gemm_reduce_scatter"]

    def f(x, w, b, residual):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return op(x, w, b, chunks=2, residual=residual) * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, w, b, kwargs["residual"])
    want = f(x, w, b, kwargs["residual"])
    assert got.dtype == want.dtype == torch.float32  # the fp32 residual is added after the bf16 op
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ops_autocast_compiled():
    run_ranks(_check_ops_compiled, 2)


# ---- layers -----------------------------------------------------------------------------------------------


def _check_mlp(sp: bool) -> None:
    """Column -> Row MLP, fp32 parameters, under autocast: outputs, grad_x and the parameter gradients."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    up, down = torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)
    col = ColumnParallelLinear.from_dense(up, sequence_parallel=sp)
    row = RowParallelLinear.from_dense(down, sequence_parallel=sp)
    x = torch.randn(4 * world, 2, 64, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(4 * world, 2, 64, generator=torch.Generator().manual_seed(2))

    def dense_step(dtype, autocast):
        a, b = copy.deepcopy(up).to(dtype), copy.deepcopy(down).to(dtype)
        xd = x.to(dtype, copy=True).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = b(torch.relu(a(xd)))
        y.backward(dy.to(y.dtype))
        return y, xd.grad, a.weight.grad, a.bias.grad, b.weight.grad, b.bias.grad

    ref, dense = dense_step(torch.float64, False), dense_step(torch.float32, True)
    mine = x[rank * 4 : (rank + 1) * 4] if sp else x
    mine = mine.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = row(torch.relu(col(mine)))
    assert y.dtype == torch.bfloat16
    y.backward((dy[rank * 4 : (rank + 1) * 4] if sp else dy).to(y.dtype))
    if sp:
        y, dx = mappings.gather_from_sequence(y.detach()), mappings.gather_from_sequence(mine.grad)
    else:
        dx = mine.grad
    assert dx.dtype == torch.float32 and col.weight.grad.dtype == torch.float32
    local = lambda layer, name, t: get_layout(layer, name, getattr(layer, name)).local_from_dense(t)  # noqa: E731
    got = (y, dx, col.weight.grad, col.bias.grad, row.weight.grad, row.bias.grad)
    for i, name in enumerate(
        ["y", "dx", "up.weight.grad", "up.bias.grad", "down.weight.grad", "down.bias.grad"]
    ):
        if i >= 2:  # this rank's shard of the dense gradients
            layer = col if i < 4 else row
            pname = "weight" if i % 2 == 0 else "bias"
            r, d = local(layer, pname, ref[i]), local(layer, pname, dense[i])
        else:
            r, d = ref[i], dense[i]
        _check_error(f"tp={world} sp={sp} {name}", got[i], d, r)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"tp{w}")
def mlp_results(request):
    return run_cases(_check_mlp, request.param, [(False,), (True,)])


@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_mlp_autocast(mlp_results, sp):
    case_result(mlp_results, (sp,))


# ---- models -----------------------------------------------------------------------------------------------


def _check_model(kind: str, sp: bool) -> None:
    world = dist.get_world_size()
    if kind == "tpext":
        torch.manual_seed(0)
        dense = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA), dtype=torch.float32)
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.LlamaConfig(**SMALL_LLAMA, use_cache=False, max_position_embeddings=64)
        torch.manual_seed(0)
        dense = transformers.LlamaForCausalLM(config).float()
    ids = torch.randint(0, 100, (2, 4 * world), generator=torch.Generator().manual_seed(1))

    def step(model, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if kind == "tpext":
                logits = model(ids)
                loss = model.loss(logits, ids)
            else:
                out = model(input_ids=ids, labels=ids)
                logits, loss = out.logits, out.loss
        loss.backward()
        return logits, loss

    ref_model, dense_model = copy.deepcopy(dense).double(), copy.deepcopy(dense)
    model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=sp)
    (ref_logits, ref_loss), (dense_logits, dense_loss) = step(ref_model, False), step(dense_model, True)
    logits, loss = step(model, True)
    what = f"{kind} tp={world} sp={sp}"
    assert loss.dtype == dense_loss.dtype == torch.float32, what
    _check_error(f"{what} loss", loss.detach(), dense_loss.detach(), ref_loss.detach(), floor=2.0**-8)
    logits = mappings.gather_from_tp(logits.detach(), 100)
    assert logits.dtype == dense_logits.dtype, what
    _check_error(f"{what} logits", logits, dense_logits.detach(), ref_logits.detach())
    for e in layouts(model):
        name = e.names[0]
        assert e.tensor.grad.dtype == torch.float32, f"{what} {name}"
        r = e.layout.local_from_dense(ref_model.get_parameter(name).grad)
        d = e.layout.local_from_dense(dense_model.get_parameter(name).grad)
        _check_error(f"{what} grad {name}", e.tensor.grad, d, r)


@pytest.mark.parametrize("kind", ["tpext", "hf"])
@pytest.mark.parametrize("sp", [False, True])
def test_parallelized_model_autocast(kind, sp):
    run_ranks(_check_model, 2, kind, sp)


def _check_fused_norm() -> None:
    """A bf16 partial sum into an fp32 residual stream with an fp32 norm weight: all promoted to fp32
    (the all-reduce included), then residual add and rms_norm as autocast runs them."""
    from tpext.nn.functional import all_reduce_residual_rmsnorm

    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(6, 32, generator=g).bfloat16().requires_grad_()
    residual = torch.randn(6, 32, generator=torch.Generator().manual_seed(7)).requires_grad_()
    weight = torch.rand(32, generator=torch.Generator().manual_seed(8)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = all_reduce_residual_rmsnorm(x, residual, weight, 1e-6)
        h_ref = mappings.all_reduce(x.detach().float(), dist.group.WORLD) + residual.detach()
        out_ref = torch.nn.functional.rms_norm(h_ref, (32,), weight.detach(), 1e-6)
    assert out.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    (out.sum() + h.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and residual.grad.dtype == weight.grad.dtype == torch.float32


def test_fused_residual_rmsnorm_autocast():
    run_ranks(_check_fused_norm, 2)
