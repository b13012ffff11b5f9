"""Column/Row parallel linear layers vs the dense nn.Linear: forward, grad_input, weight and bias grads.

fp64, dense weights sharded with from_dense, world sizes 1-4, with and without SP and bias, even and
uneven feature counts. Plus the comm accounting of a Column -> Row MLP and the error messages.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from dist import case_result, run_cases, run_ranks

import tpext
from tpext import mappings
from tpext.distributed import shard_range
from tpext.nn import ColumnParallelLinear, RowParallelLinear

f64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
DIMS = [(8, 12), (7, 10)]  # (in, out); 7 and 10 are uneven for R = 3, 4


def _dense(k: int, n: int, bias: bool, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias, dtype=f64)


def _data(world: int, k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s, b = 2 * world, 3  # sequence-first [s, b, features]; s divisible by R for SP
    return torch.randn(s, b, k, generator=g, dtype=f64), torch.randn(s, b, n, generator=g, dtype=f64)


COLUMN_CASES = list(itertools.product(DIMS, (True, False), (False, True), (False, True)))  # bias, sp, gather
ROW_CASES = list(
    itertools.product(DIMS, (True, False), (False, True), (True, False))
)  # bias, sp, parallel in


def _column_case(dims: tuple[int, int], bias: bool, sp: bool, gather: bool) -> dict[str, tuple]:
    """{what: (tpext, dense reference)} for the output and every gradient on this rank."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    k, n = dims
    dense = _dense(k, n, bias, seed=k * n)
    x, dy = _data(world, k, n, seed=k + n)
    x_d = x.clone().requires_grad_()
    (dense(x_d) * dy).sum().backward()
    y_ref = dense(x)

    # Under SP, alternate between keeping the gathered input and gathering it again.
    layer = ColumnParallelLinear.from_dense(
        dense, sequence_parallel=sp, gather_output=gather, keep_gathered_input=bias
    )
    start, size = shard_range(n, world, rank)
    rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    x_in = (x[rows] if sp else x).clone().requires_grad_()
    y = layer(x_in)
    want = y_ref if gather else y_ref[..., start : start + size]
    (y * (dy if gather else dy[..., start : start + size])).sum().backward()
    pairs = {
        "forward": (y.detach(), want.detach()),
        "grad_x": (x_in.grad, x_d.grad[rows] if sp else x_d.grad),
        "grad_w": (layer.weight.grad, dense.weight.grad[start : start + size]),
    }
    if bias:
        pairs["grad_b"] = (layer.bias.grad, dense.bias.grad[start : start + size])
    return pairs


def _row_case(dims: tuple[int, int], bias: bool, sp: bool, parallel_in: bool) -> dict[str, tuple]:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    k, n = dims
    dense = _dense(k, n, bias, seed=k * n + 1)
    x, dy = _data(world, k, n, seed=k + n + 1)
    x_d = x.clone().requires_grad_()
    (dense(x_d) * dy).sum().backward()
    y_ref = dense(x)

    layer = RowParallelLinear.from_dense(dense, sequence_parallel=sp, input_is_parallel=parallel_in)
    start, size = shard_range(k, world, rank)
    rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    x_in = (x[..., start : start + size] if parallel_in else x).clone().requires_grad_()
    y = layer(x_in)
    (y * (dy[rows] if sp else dy)).sum().backward()
    pairs = {
        "forward": (y.detach(), (y_ref[rows] if sp else y_ref).detach()),
        "grad_x": (x_in.grad, x_d.grad[..., start : start + size] if parallel_in else x_d.grad),
        "grad_w": (layer.weight.grad, dense.weight.grad[:, start : start + size]),
    }
    if bias:
        pairs["grad_b"] = (layer.bias.grad, dense.bias.grad)
    return pairs


def _assert_pairs(per_rank: list[dict[str, tuple]]) -> None:
    for rank, pairs in enumerate(per_rank):
        for what, (got, want) in pairs.items():
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, what=what, rank=rank: f"rank {rank} {what}: {m}"
            )


def _case_id(dims, bias, sp, flag, flag_name) -> str:
    return f"k{dims[0]}-n{dims[1]}{'-bias' if bias else ''}{'-sp' if sp else ''}{'-' + flag_name if flag else ''}"


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"tp{w}")
def linear_results(request):
    """Every column and row case in one round trip per world size."""
    return {
        "column": run_cases(_column_case, request.param, COLUMN_CASES),
        "row": run_cases(_row_case, request.param, ROW_CASES),
    }


@pytest.mark.parametrize("case", COLUMN_CASES, ids=[_case_id(*c, "gather") for c in COLUMN_CASES])
def test_column_parallel_linear_matches_dense(linear_results, case):
    _assert_pairs(case_result(linear_results["column"], case))


@pytest.mark.parametrize("case", ROW_CASES, ids=[_case_id(*c, "parallel_in") for c in ROW_CASES])
def test_row_parallel_linear_matches_dense(linear_results, case):
    _assert_pairs(case_result(linear_results["row"], case))


def _mlp_comm(sp: bool, keep_gathered: bool = False) -> dict:
    world = tdist.get_world_size()
    h, s, b = 8, 2 * world, 3
    torch.manual_seed(0)
    up, down = torch.nn.Linear(h, 4 * h, dtype=f64), torch.nn.Linear(4 * h, h, dtype=f64)
    col = ColumnParallelLinear.from_dense(up, sequence_parallel=sp, keep_gathered_input=keep_gathered)
    row = RowParallelLinear.from_dense(down, sequence_parallel=sp)
    x_full = torch.randn(s, b, h, dtype=f64)
    x = (x_full.chunk(world)[tdist.get_rank()] if sp else x_full).clone().requires_grad_()
    with tpext.comm_stats() as stats:
        y = row(F.gelu(col(x)))
        fwd = stats.by_kind("forward")
        y.sum().backward()
    # Dense check of the whole block too, so the counts belong to a correct computation.
    ref = down(F.gelu(up(x_full)))
    torch.testing.assert_close(y, ref.chunk(world)[tdist.get_rank()] if sp else ref, **TOL)
    return {
        "forward": fwd,
        "backward": stats.by_kind("backward"),
        "bytes": {k: stats.bytes(k) for k in ("all_reduce", "all_gather", "reduce_scatter")},
        "modules": sorted({r.module for r in stats.records}),
        "activation_bytes": s * b * h * 8,
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_mlp_block_communication(world_size):
    tp = run_ranks(_mlp_comm, world_size, False)[0]
    assert tp["forward"] == {"all_reduce": 1} and tp["backward"] == {"all_reduce": 1}
    assert tp["modules"] == ["ColumnParallelLinear", "RowParallelLinear"]
    sp = run_ranks(_mlp_comm, world_size, True, True)[0]
    assert sp["forward"] == {"all_gather": 1, "reduce_scatter": 1}
    assert sp["backward"] == {"all_gather": 1, "reduce_scatter": 1}
    # Same bytes: an all-reduce of [s, b, h] each way vs an all-gather + reduce-scatter of [s, b, h].
    act = tp["activation_bytes"]
    assert tp["bytes"]["all_reduce"] == 2 * act
    assert sp["bytes"]["all_gather"] == sp["bytes"]["reduce_scatter"] == 2 * act
    # By default the column layer keeps only its input shard and gathers it again for the weight gradient.
    regather = run_ranks(_mlp_comm, world_size, True)[0]
    assert regather["forward"] == {"all_gather": 1, "reduce_scatter": 1}
    assert regather["backward"] == {"all_gather": 2, "reduce_scatter": 1}
    assert regather["bytes"]["all_gather"] == 3 * act


def test_tp1_is_nn_linear_without_collectives():
    stats = run_ranks(_mlp_comm, 1, False)[0]
    assert stats["forward"] == {} and stats["backward"] == {}
    stats = run_ranks(_mlp_comm, 1, True)[0]
    assert stats["forward"] == {} and stats["backward"] == {}


def _check_gather_before_call() -> None:
    """SharedInputColumns.gather, as the SP attention-input hook of tpext.parallelize uses it: the layers
    take their outputs from the one overlapped gather + GEMM; a call with the gathered sequence that the
    cache does not answer computes locally; a call with another (replicated) tensor, as cross-attention's
    memory, is the plain column layer; gradients that other code sends into the gathered input are summed
    over the ranks into x_shard's (here each rank's loss has its own x_full term, the dense loss their sum)."""
    from tpext.nn import SharedInputColumns

    rank, world = tdist.get_rank(), tdist.get_world_size()
    dense_q, dense_k = _dense(8, 12, True, seed=1), _dense(8, 4 * world, True, seed=2)
    x = _data(world, 8, 12, seed=3)[0].transpose(0, 1).contiguous()  # batch-first [b, s, k]
    g = torch.Generator().manual_seed(4)
    c, mem = torch.randn(x.shape, generator=g, dtype=f64), torch.randn(2, 5, 8, generator=g, dtype=f64)

    def loss(q, k, x_full, mem, scale):
        return (
            q(x_full).square().sum()
            + k(x_full).sin().sum()
            + (q(x_full) * 3).sum()
            + k(mem).cos().sum()
            + (x_full * c).sum() * scale
        )

    x_d, mem_d = x.clone().requires_grad_(), mem.clone().requires_grad_()
    loss(dense_q, dense_k, x_d, mem_d, world * (world + 1) / 2).backward()
    q, k = (
        ColumnParallelLinear.from_dense(d, sequence_parallel=True, sequence_dim=1) for d in (dense_q, dense_k)
    )
    shared = SharedInputColumns([q, k]).attach()
    rows = slice(rank * x.shape[1] // world, (rank + 1) * x.shape[1] // world)
    x_shard, mem_r = x[:, rows].clone().requires_grad_(), mem.clone().requires_grad_()
    x_full = shared.gather(x_shard)
    q._is_gathered_input = k._is_gathered_input = lambda t: t is x_full
    torch.testing.assert_close(x_full, x, **TOL)
    with tpext.comm_stats() as stats:
        y = mappings.reduce_from_tp(loss(q, k, x_full, mem_r, rank + 1))  # the ranks' partial losses, summed
        y.backward()
    assert stats.by_kind("forward") == {"all_reduce": 1}, stats.by_kind("forward")  # the gather ran before
    torch.testing.assert_close(y, loss(dense_q, dense_k, x, mem, world * (world + 1) / 2), **TOL)
    torch.testing.assert_close(x_shard.grad, x_d.grad[:, rows], **TOL)
    torch.testing.assert_close(mem_r.grad, mem_d.grad, **TOL)
    for layer, dense in ((q, dense_q), (k, dense_k)):
        start, size = shard_range(dense.out_features, world, rank)
        torch.testing.assert_close(layer.weight.grad, dense.weight.grad[start : start + size], **TOL)
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad[start : start + size], **TOL)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_before_call(world_size):
    run_ranks(_check_gather_before_call, world_size)


def _check_errors() -> None:
    world = tdist.get_world_size()
    col = ColumnParallelLinear(8, 12)
    with pytest.raises(
        ValueError, match=r"ColumnParallelLinear: input must be \[\*, 8\] \(in_features\), got shape \(4, 7\)"
    ):
        col(torch.ones(4, 7))
    row = RowParallelLinear(12, 8)
    with pytest.raises(
        ValueError,
        match=r"RowParallelLinear: input must be \[\*, 6\] \(this rank's shard of "
        r"in_features=12 over 2 ranks; is the preceding column-parallel layer",
    ):
        row(torch.ones(4, 12))  # e.g. the column layer ran on a group of another size
    sp = RowParallelLinear(8, 12, sequence_parallel=True)
    with pytest.raises(
        ValueError,
        match=r"sequence_parallel needs the sequence length \(dim 0\) divisible by the "
        r"tensor-parallel size 2, got 3",
    ):
        sp(torch.ones(3, 2, 4))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    assert ColumnParallelLinear(8, 12, group=mesh).tp_size == world
    with pytest.raises(ValueError, match="chunks must be 'auto' or an int >= 1, got 0"):
        ColumnParallelLinear(8, 12, chunks=0)
    with pytest.raises(
        TypeError, match="group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or None"
    ):
        RowParallelLinear(8, 12, group=3)


def test_bad_input_errors():
    run_ranks(_check_errors, 2)


def _check_2d_mesh() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match=r"DeviceMesh group must be 1-D, got a 2-D mesh"):
        ColumnParallelLinear(8, 12, group=mesh)


def test_2d_mesh_is_rejected():
    run_ranks(_check_2d_mesh, 4)
