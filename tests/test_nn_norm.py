"""The sequence-parallel norms, sum_param_grads and the norms of column-sharded heads (ColumnParallelRMSNorm,
shard_norm_features) vs dense torch in fp64."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from dist import case_result, run_cases, run_ranks

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
from tpext.sharding import Piece, get_layout

f64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _OnePlusWeightNorm(torch.nn.Module):  # Gemma's arithmetic, a class tpext does not know
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(6, dtype=f64))
        self.bias = None

    def forward(self, x):
        return _rms(x) * (1 + self.weight)


# name: (the sequence-parallel norm, its dense reference(x, w, b))
SP_NORMS = {
    "layernorm": (
        lambda: SequenceParallelLayerNorm(6, dtype=f64),
        lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5),
    ),
    "rmsnorm": (lambda: SequenceParallelRMSNorm(6, dtype=f64), lambda x, w, b: _rms(x) * w),
    "sum_param_grads(nn.LayerNorm)": (
        lambda: sum_param_grads(torch.nn.LayerNorm(6, dtype=f64)),
        lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5),
    ),
    "sum_param_grads(1 + weight)": (
        lambda: sum_param_grads(_OnePlusWeightNorm()),
        lambda x, w, b: _rms(x) * (1 + w),
    ),
}
# backward all-reduces at tp > 1: one per parameter (a norm's weight and bias are all-reduced apart)
SP_NORM_ALL_REDUCES = {
    "layernorm": 2,
    "rmsnorm": 1,
    "sum_param_grads(nn.LayerNorm)": 2,
    "sum_param_grads(1 + weight)": 1,
}


def _sp_norm_case(name: str) -> int:
    """The norm on this rank's tokens vs dense on all; returns its backward's all-reduce count."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x, dy = (
        torch.randn(2 * world, 3, 6, generator=g, dtype=f64),
        torch.randn(2 * world, 3, 6, generator=g, dtype=f64),
    )
    w, b = torch.randn(6, generator=g, dtype=f64), torch.randn(6, generator=g, dtype=f64)
    rows = slice(2 * rank, 2 * rank + 2)
    make, ref_fn = SP_NORMS[name]
    w_ref, b_ref = w.clone().requires_grad_(), b.clone().requires_grad_()
    y_ref = ref_fn(x, w_ref, b_ref)
    (y_ref * dy).sum().backward()
    norm = make()
    if name.startswith("sum_param_grads"):  # the module keeps its class, names and arithmetic
        assert isinstance(norm, (torch.nn.LayerNorm, _OnePlusWeightNorm)), name
        assert list(norm.state_dict()) == (["weight", "bias"] if norm.bias is not None else ["weight"]), name
    with torch.no_grad():
        norm.weight.copy_(w)
        if norm.bias is not None:
            norm.bias.copy_(b)
    with tpext.comm_stats() as stats:
        y = norm(x[rows])
        (y * dy[rows]).sum().backward()
    torch.testing.assert_close(y, y_ref[rows], **TOL)
    # Each rank saw only its tokens, yet holds the full gradient: identical replicas.
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, **TOL, msg=lambda m: f"grad_w: {m}")
    if norm.bias is not None:
        torch.testing.assert_close(norm.bias.grad, b_ref.grad, **TOL, msg=lambda m: f"grad_b: {m}")
    return stats.count("all_reduce", phase="backward")


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"tp{w}")
def sp_norm_results(request):
    return request.param, run_cases(_sp_norm_case, request.param, [(n,) for n in SP_NORMS])


@pytest.mark.parametrize("name", list(SP_NORMS))
def test_sequence_parallel_norms_all_reduce_their_grads(sp_norm_results, name):
    world_size, results = sp_norm_results
    count = case_result(results, (name,))[0]
    assert count == (SP_NORM_ALL_REDUCES[name] if world_size > 1 else 0)


class _PerHeadNorm(torch.nn.Module):
    """Cohere's q/k norm: a mean-centred norm of each head of x [*, heads, head_dim], with a weight per head."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(heads, head_dim, dtype=f64))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight


HEAD_NORMS = ("ColumnParallelRMSNorm", "nn.RMSNorm", "per-head weights")


def _head_norm_case(name: str) -> str:
    """Column-parallel linear -> a norm of its heads -> row-parallel linear, vs the dense chain in fp64:
    an RMSNorm over all heads' features (ColumnParallelRMSNorm, and nn.RMSNorm converted with its class
    kept) or a per-head norm with a weight per head. Output, input gradient and every weight gradient;
    returns the sharded norm's repr."""
    heads, d = 4, 3
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 5, 8, generator=g, dtype=f64), torch.randn(2, 5, 6, generator=g, dtype=f64)
    torch.manual_seed(1)
    up, down = torch.nn.Linear(8, heads * d, dtype=f64), torch.nn.Linear(heads * d, 6, dtype=f64)
    dense_norm = (
        _PerHeadNorm(heads, d)
        if name == "per-head weights"
        else torch.nn.RMSNorm(heads * d, eps=1e-6, dtype=f64)
    )
    g_weight = torch.Generator().manual_seed(10 + HEAD_NORMS.index(name))
    with torch.no_grad():
        dense_norm.weight.copy_(torch.rand(dense_norm.weight.shape, generator=g_weight, dtype=f64) + 0.5)
    pieces = (Piece(heads, d),)
    col = ColumnParallelLinear.from_dense(up, pieces=pieces)
    row = RowParallelLinear.from_dense(down, pieces=pieces)
    if name == "ColumnParallelRMSNorm":
        norm = ColumnParallelRMSNorm(heads * d, eps=1e-6, pieces=pieces, dtype=f64)
        with torch.no_grad():
            norm.weight.copy_(get_layout(norm, "weight", norm.weight).local_from_dense(dense_norm.weight))
    else:
        norm = shard_norm_features(dense_norm, None, pieces)
        assert type(norm).__name__ == type(dense_norm).__name__ and isinstance(norm, type(dense_norm)), name
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()

    def call(m, h):  # the per-head norm gets [*, heads, head_dim], as Cohere's attention calls it
        return m(h.unflatten(-1, (-1, d))).flatten(-2) if name == "per-head weights" else m(h)

    y_ref = down(call(dense_norm, up(xr)))
    (y_ref * dy).sum().backward()
    y = row(call(norm, col(xd)))
    (y * dy).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(xd.grad, xr.grad, **TOL, msg=lambda m: f"grad x: {m}")
    for module, dense in ((col, up), (norm, dense_norm), (row, down)):
        want = get_layout(module, "weight", module.weight).local_from_dense(dense.weight.grad)
        torch.testing.assert_close(
            module.weight.grad,
            want,
            **TOL,
            msg=lambda m, module=module: f"grad {type(module).__name__}: {m}",
        )
    return repr(norm)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"tp{w}")
def head_norm_results(request):
    return request.param, run_cases(_head_norm_case, request.param, [(n,) for n in HEAD_NORMS])


@pytest.mark.parametrize("name", HEAD_NORMS)
def test_norms_of_column_sharded_heads_match_dense(head_norm_results, name):
    world_size, results = head_norm_results
    norm_repr = case_result(results, (name,))[0]
    if world_size == 4 and name == "ColumnParallelRMSNorm":
        assert "12 features over tp=4, local=3, eps=1e-06" in norm_repr, norm_repr
    if world_size == 4 and name == "nn.RMSNorm":
        assert norm_repr.startswith("RMSNorm(12 features over tp=4"), norm_repr


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


_PIECES = (Piece(4, 3),)
# case: (what raises the ValueError, what its message says)
HEAD_NORM_ERRORS = {
    "layernorm_across_heads": (
        lambda: shard_norm_features(torch.nn.LayerNorm((4, 3)), None, _PIECES),
        "cannot shard LayerNorm by heads: on this rank's heads alone it does not compute what it computes on "
        "all of them",
    ),
    "layernorm_mean_and_bias": (
        lambda: shard_norm_features(torch.nn.LayerNorm(12), None, _PIECES),
        "cannot shard LayerNorm over features: it has parameters ['bias', 'weight']",
    ),
    "one_plus_weight": (  # scales by 1 + weight (Gemma's)
        lambda: shard_norm_features(_RMS(12, plus=1.0), None, _PIECES),
        "cannot shard _RMS over features: it does not compute RMSNorm",
    ),
    "other_eps_than_declared": (
        lambda: shard_norm_features(_RMS(12, use_eps=1e-5), None, _PIECES),
        "cannot shard _RMS over features: it does not compute RMSNorm",
    ),
    "buffer_in_forward": (  # a buffer the sharded forward would not read
        lambda: shard_norm_features(_RMS(12, shift=0.0), None, _PIECES),
        "cannot shard _RMS over features: it has parameters ['weight'] and buffers ['shift']",
    ),
    "not_the_pieces_features": (
        lambda: shard_norm_features(torch.nn.RMSNorm(10), None, _PIECES),
        "cannot shard RMSNorm over 12 features ([Piece(units=4, unit_size=3)]): its weight is [10]",
    ),
    "dense_input": (
        lambda: ColumnParallelRMSNorm(12, pieces=_PIECES)(torch.zeros(2, 12)),
        "ColumnParallelRMSNorm: input must be [*, 3] (this rank's features of 12), got shape (2, 12)",
    ),
    "pieces_of_16_features": (
        lambda: ColumnParallelRMSNorm(12, pieces=(Piece(4, 4),)),
        "ColumnParallelRMSNorm: pieces [Piece(units=4, unit_size=4)] add up to 16, not normalized_size 12",
    ),
    "kv_heads_replicated_2_and_4_times": (
        lambda: ColumnParallelRMSNorm(12, pieces=(Piece(2, 3), Piece(1, 6))),
        "pieces [Piece(units=2, unit_size=3), Piece(units=1, unit_size=6)] would be replicated over different "
        "numbers of ranks ([2, 4]) at tp=4",
    ),
}


def _head_norm_error_case(case: str) -> str | None:
    """The message of a HEAD_NORM_ERRORS case; "eps_none": eps=None is that of the compute dtype (fp32), as
    torch's RMSNorm, checked on bf16 inputs of small values."""
    if case == "eps_none":
        dense = torch.nn.RMSNorm(12, eps=None, dtype=torch.bfloat16)
        x = 0.01 * torch.randn(5, 12, generator=torch.Generator().manual_seed(0)).bfloat16()
        sharded = ColumnParallelRMSNorm(12, pieces=_PIECES)
        ((start, length),) = get_layout(sharded, "weight", sharded.weight).segments
        mine = slice(start, start + length)
        torch.testing.assert_close(
            shard_norm_features(dense, None, _PIECES)(x[:, mine]), dense(x)[:, mine], rtol=1e-2, atol=1e-2
        )
        return None
    with pytest.raises(ValueError) as err:
        HEAD_NORM_ERRORS[case][0]()
    return str(err.value)


@pytest.fixture(scope="module")
def head_norm_error_results():
    return run_cases(_head_norm_error_case, 4, [(c,) for c in [*HEAD_NORM_ERRORS, "eps_none"]])


@pytest.mark.parametrize("case", [*HEAD_NORM_ERRORS, "eps_none"])
def test_norms_of_column_sharded_heads_errors(head_norm_error_results, case):
    message = case_result(head_norm_error_results, (case,))[0]
    if case != "eps_none":
        expected = HEAD_NORM_ERRORS[case][1]
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
