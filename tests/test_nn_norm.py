"""The sequence-parallel norms, sum_param_grads and the norms of column-sharded heads (ColumnParallelRMSNorm,
shard_norm_features) vs dense torch in fp64."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from dist import run_ranks

import tpext
from tpext.nn import (
    ColumnParallelLinear,
    ColumnParallelRMSNorm,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    shard_norm_features,
    sum_param_grads,
)
from tpext.sharding import Piece

f64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _check_norms() -> dict:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x, dy = (
        torch.randn(2 * world, 3, 6, generator=g, dtype=f64),
        torch.randn(2 * world, 3, 6, generator=g, dtype=f64),
    )
    w, b = torch.randn(6, generator=g, dtype=f64), torch.randn(6, generator=g, dtype=f64)
    rows = slice(2 * rank, 2 * rank + 2)
    counts = {}
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731

    class OnePlusWeightNorm(torch.nn.Module):  # Gemma's arithmetic, a class tpext does not know
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(6, dtype=f64))
            self.bias = None

        def forward(self, x):
            return rms(x) * (1 + self.weight)

    for name, make, ref_fn in [
        (
            "layernorm",
            lambda: SequenceParallelLayerNorm(6, dtype=f64),
            lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5),
        ),
        ("rmsnorm", lambda: SequenceParallelRMSNorm(6, dtype=f64), lambda x, w, b: rms(x) * w),
        (
            "sum_param_grads(nn.LayerNorm)",
            lambda: sum_param_grads(torch.nn.LayerNorm(6, dtype=f64)),
            lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5),
        ),
        (
            "sum_param_grads(1 + weight)",
            lambda: sum_param_grads(OnePlusWeightNorm()),
            lambda x, w, b: rms(x) * (1 + w),
        ),
    ]:
        w_ref, b_ref = w.clone().requires_grad_(), b.clone().requires_grad_()
        y_ref = ref_fn(x, w_ref, b_ref)
        (y_ref * dy).sum().backward()
        norm = make()
        if name.startswith("sum_param_grads"):  # the module keeps its class, names and arithmetic
            assert isinstance(norm, (torch.nn.LayerNorm, OnePlusWeightNorm)), name
            assert list(norm.state_dict()) == (["weight", "bias"] if norm.bias is not None else ["weight"]), (
                name
            )
        with torch.no_grad():
            norm.weight.copy_(w)
            if norm.bias is not None:
                norm.bias.copy_(b)
        with tpext.comm_stats() as stats:
            y = norm(x[rows])
            (y * dy[rows]).sum().backward()
        counts[name] = stats.count("all_reduce", phase="backward")
        torch.testing.assert_close(y, y_ref[rows], **TOL)
        # Each rank saw only its tokens, yet holds the full gradient: identical replicas.
        torch.testing.assert_close(
            norm.weight.grad, w_ref.grad, **TOL, msg=lambda m, name=name: f"{name} grad_w: {m}"
        )
        if norm.bias is not None:
            torch.testing.assert_close(
                norm.bias.grad, b_ref.grad, **TOL, msg=lambda m, name=name: f"{name} grad_b: {m}"
            )
    return counts


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sequence_parallel_norms_all_reduce_their_grads(world_size):
    counts = run_ranks(_check_norms, world_size)[0]
    want = {
        "layernorm": 2,
        "rmsnorm": 1,
        "sum_param_grads(nn.LayerNorm)": 2,
        "sum_param_grads(1 + weight)": 1,
    }
    assert counts == (want if world_size > 1 else {name: 0 for name in want})


class _PerHeadNorm(torch.nn.Module):
    """Cohere's q/k norm: a mean-centred norm of each head of x [*, heads, head_dim], with a weight per head."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(heads, head_dim, dtype=f64))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight


def _check_head_norms() -> dict:
    """Column-parallel linear -> a norm of its heads -> row-parallel linear, vs the dense chain in fp64:
    an RMSNorm over all heads' features (ColumnParallelRMSNorm, and nn.RMSNorm converted with its class
    kept) and a per-head norm with a weight per head. Output, input gradient and every weight gradient."""
    world = tdist.get_world_size()
    heads, d = 4, 3
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 5, 8, generator=g, dtype=f64), torch.randn(2, 5, 6, generator=g, dtype=f64)
    repr_of = {}
    for name in ("ColumnParallelRMSNorm", "nn.RMSNorm", "per-head weights"):
        torch.manual_seed(1)
        up, down = torch.nn.Linear(8, heads * d, dtype=f64), torch.nn.Linear(heads * d, 6, dtype=f64)
        dense_norm = (
            _PerHeadNorm(heads, d)
            if name == "per-head weights"
            else torch.nn.RMSNorm(heads * d, eps=1e-6, dtype=f64)
        )
        with torch.no_grad():
            dense_norm.weight.copy_(torch.rand(dense_norm.weight.shape, generator=g, dtype=f64) + 0.5)
        pieces = (Piece(heads, d),)
        col = ColumnParallelLinear.from_dense(up, pieces=pieces)
        row = RowParallelLinear.from_dense(down, pieces=pieces)
        if name == "ColumnParallelRMSNorm":
            norm = ColumnParallelRMSNorm(heads * d, eps=1e-6, pieces=pieces, dtype=f64)
            with torch.no_grad():
                norm.weight.copy_(norm._tpext_layouts["weight"].local_from_dense(dense_norm.weight))
        else:
            norm = shard_norm_features(dense_norm, None, pieces)
            assert type(norm).__name__ == type(dense_norm).__name__ and isinstance(norm, type(dense_norm)), (
                name
            )
        repr_of[name] = repr(norm)
        xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()

        def call(
            m, h, name=name
        ):  # the per-head norm gets [*, heads, head_dim], as Cohere's attention calls it
            return m(h.unflatten(-1, (-1, d))).flatten(-2) if name == "per-head weights" else m(h)

        y_ref = down(call(dense_norm, up(xr)))
        (y_ref * dy).sum().backward()
        y = row(call(norm, col(xd)))
        (y * dy).sum().backward()
        what = f"{name} tp={world}"
        torch.testing.assert_close(y, y_ref, **TOL, msg=lambda m, what=what: f"{what}: output: {m}")
        torch.testing.assert_close(xd.grad, xr.grad, **TOL, msg=lambda m, what=what: f"{what}: grad x: {m}")
        for module, dense in ((col, up), (norm, dense_norm), (row, down)):
            layout = getattr(module, "_tpext_layouts", {}).get("weight")
            want = layout.local_from_dense(dense.weight.grad) if layout else dense.weight.grad
            torch.testing.assert_close(
                module.weight.grad,
                want,
                **TOL,
                msg=lambda m, what=what, module=module: f"{what}: grad {type(module).__name__}: {m}",
            )
    return repr_of


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_norms_of_column_sharded_heads_match_dense(world_size):
    reprs = run_ranks(_check_head_norms, world_size)[0]
    if world_size == 4:
        assert "12 features over tp=4, local=3, eps=1e-06" in reprs["ColumnParallelRMSNorm"], reprs
        assert reprs["nn.RMSNorm"].startswith("RMSNorm(12 features over tp=4"), reprs


class _RMS(torch.nn.Module):
    """An RMSNorm-like module tpext does not know: `plus` is added to the weight, `use_eps` is the epsilon
    its forward really uses (`eps` the one it declares), `shift` a buffer added to the output."""

    def __init__(self, n: int, plus: float = 0.0, use_eps: float = 1e-6, shift: float | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))
        self.eps, self.use_eps, self.plus = 1e-6, use_eps, plus
        if shift is not None:
            self.register_buffer("shift", torch.tensor(shift))

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.use_eps) * (self.plus + self.weight)
        return y + self.shift if hasattr(self, "shift") else y


def _head_norm_errors() -> list[str]:
    pieces = (Piece(4, 3),)
    cases = [
        torch.nn.LayerNorm((4, 3)),  # normalises across heads
        torch.nn.LayerNorm(12),  # a mean and a bias: not an RMSNorm
        _RMS(12, plus=1.0),  # scales by 1 + weight (Gemma's)
        _RMS(12, use_eps=1e-5),  # declares another epsilon than it uses
        _RMS(12, shift=0.0),  # a buffer the sharded forward would not read
        torch.nn.RMSNorm(10),  # not the features of the pieces
    ]
    messages = []
    for module in cases:
        with pytest.raises(ValueError) as err:
            shard_norm_features(module, None, pieces)
        messages.append(str(err.value))
    norm = ColumnParallelRMSNorm(12, pieces=pieces)
    with pytest.raises(ValueError) as err:
        norm(torch.zeros(2, 12))
    messages.append(str(err.value))
    for bad in ((Piece(4, 4),), (Piece(2, 3), Piece(1, 6))):  # 16 features; kv heads replicated 2 and 4 times
        with pytest.raises(ValueError) as err:
            ColumnParallelRMSNorm(12, pieces=bad)
        messages.append(str(err.value))
    # eps=None is that of the compute dtype (fp32), as torch's RMSNorm: bf16 inputs of small values.
    dense = torch.nn.RMSNorm(12, eps=None, dtype=torch.bfloat16)
    x = 0.01 * torch.randn(5, 12, generator=torch.Generator().manual_seed(0)).bfloat16()
    ((start, length),) = ColumnParallelRMSNorm(12, pieces=pieces)._tpext_layouts["weight"].segments
    mine = slice(start, start + length)
    torch.testing.assert_close(
        shard_norm_features(dense, None, pieces)(x[:, mine]), dense(x)[:, mine], rtol=1e-2, atol=1e-2
    )
    return messages


def test_norms_of_column_sharded_heads_errors():
    messages = run_ranks(_head_norm_errors, 4)[0]
    want = [
        "cannot shard LayerNorm by heads: on this rank's heads alone it does not compute what it computes on "
        "all of them",
        "cannot shard LayerNorm over features: it has parameters ['bias', 'weight']",
        "cannot shard _RMS over features: it does not compute RMSNorm",
        "cannot shard _RMS over features: it does not compute RMSNorm",
        "cannot shard _RMS over features: it has parameters ['weight'] and buffers ['shift']",
        "cannot shard RMSNorm over 12 features ([Piece(units=4, unit_size=3)]): its weight is [10]",
        "ColumnParallelRMSNorm: input must be [*, 3] (this rank's features of 12), got shape (2, 12)",
        "ColumnParallelRMSNorm: pieces [Piece(units=4, unit_size=4)] add up to 16, not normalized_size 12",
        "pieces [Piece(units=2, unit_size=3), Piece(units=1, unit_size=6)] would be replicated over different "
        "numbers of ranks ([2, 4]) at tp=4",
    ]
    for message, expected in zip(messages, want, strict=True):
        assert expected in message, (expected, message)


class _ScaleNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4, dtype=f64))

    def forward(self, x):
        return x * self.weight


def _sum_param_grads_wrapped(kind: str) -> list:
    """sum_param_grads under wrappers that hold the parameters their own way during forward (FSDP1 keeps
    plain tensor views, in _parameters or as attributes), and with forwards from two threads at once:
    the gradient is the sum over the ranks' tokens, and the module keeps its Parameter."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = tdist.get_rank()
    model = torch.nn.Sequential(sum_param_grads(_ScaleNorm()))
    norm = model[0]
    x = torch.full((3, 4), float(rank + 1), dtype=f64)  # each rank its own tokens
    if kind.startswith("fsdp1"):
        solo = [tdist.new_group([r], backend="gloo") for r in range(tdist.get_world_size())][rank]  # dp = 1
        model = FSDP(
            model, process_group=solo, device_id=torch.device("cpu"), use_orig_params=kind == "fsdp1_orig"
        )
    if kind == "threads":
        import threading

        outs = []
        threads = [threading.Thread(target=lambda: outs.append(model(x))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        torch.stack(outs).sum().backward()
        assert isinstance(norm._parameters["weight"], torch.nn.Parameter)
        return (norm.weight.grad / 4).tolist()
    model(x).sum().backward()
    return next(iter(model.parameters())).grad.flatten().tolist()


@pytest.mark.parametrize("kind", ["plain", "fsdp1", "fsdp1_orig", "threads"])
def test_sum_param_grads_under_wrappers_and_threads(kind):
    for grad in run_ranks(_sum_param_grads_wrapped, 2, kind):
        assert grad == [9.0] * 4, (kind, grad)  # 3 tokens of 1 on rank 0 + 3 tokens of 2 on rank 1
