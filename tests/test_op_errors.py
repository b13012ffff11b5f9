"""Bad input to the ops: an error naming the argument, on the rank that made the call, and no hang.

Each case runs on every rank, and afterwards a good call must still succeed: the checks run before any
collective, so no rank is left waiting in one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from dist import CaseBatches, case_result, run_cases, run_ranks

import tpext

f64 = torch.float64


def _t(*shape, dtype=f64):
    return torch.ones(*shape, dtype=dtype)


OPS = {
    "gemm_all_reduce": tpext.ops.gemm_all_reduce,
    "gemm_reduce_scatter": tpext.ops.gemm_reduce_scatter,
    "all_gather_gemm": tpext.ops.all_gather_gemm,
}

# (case id, op names it applies to, args (x, w, bias), kwargs, regex the message must match)
CASES = [
    (
        "x_1d",
        OPS,
        (_t(8), _t(4, 8), None),
        {},
        r"x(_shard)? must be \[\*, K\] with at least 2 dims, got shape \[8\]",
    ),
    (
        "w_3d",
        OPS,
        (_t(4, 8), _t(2, 4, 8), None),
        {},
        r"w must be 2-D \[N, K\] \(nn.Linear layout\), got shape \[2, 4, 8\]",
    ),
    (
        "k_mismatch",
        OPS,
        (_t(4, 8), _t(6, 7), None),
        {},
        r"x(_shard)?.s last dim K = 8 must equal w.size\(1\) \(w is \[N, K\]\), got x(_shard)? \[4, 8\] and w \[6, 7\]",
    ),
    ("bias_size", OPS, (_t(4, 8), _t(6, 8), _t(5)), {}, r"bias must be 1-D \[N\] = \[6\] .* got shape \[5\]"),
    (
        "bias_2d",
        OPS,
        (_t(4, 8), _t(6, 8), _t(1, 6)),
        {},
        r"bias must be 1-D \[N\] = \[6\] .* got shape \[1, 6\]",
    ),
    (
        "w_dtype",
        OPS,
        (_t(4, 8), _t(6, 8, dtype=torch.float32), None),
        {},
        r"w dtype Float must match x(_shard)? dtype Double",
    ),
    (
        "bias_dtype",
        OPS,
        (_t(4, 8), _t(6, 8), _t(6, dtype=torch.float32)),
        {},
        r"bias dtype Float must match x(_shard)? dtype Double",
    ),
    (
        "int_x",
        OPS,
        (_t(4, 8, dtype=torch.int64), _t(6, 8, dtype=torch.int64), None),
        {},
        r"x(_shard)? must be a floating-point tensor, got dtype Long",
    ),
    (
        "chunks_0",
        OPS,
        (_t(4, 8), _t(6, 8), None),
        {"chunks": 0},
        r"chunks must be >= 1 \(1 = sequential\), got 0",
    ),
    (
        "chunks_neg",
        OPS,
        (_t(4, 8), _t(6, 8), None),
        {"chunks": -3},
        r"chunks must be >= 1 \(1 = sequential\), got -3",
    ),
    (
        "algorithm_3",
        OPS,
        (_t(4, 8), _t(6, 8), None),
        {"algorithm": 3},
        r"algorithm must be 0 \(sequential\), 1 \(chunked_pipeline\) or 2 \(chunked_two_streams\), got 3",
    ),
    ("algorithm_neg", OPS, (_t(4, 8), _t(6, 8), None), {"algorithm": -1}, r"algorithm must be 0 .* got -1"),
    (
        "sequential_chunks",
        OPS,
        (_t(4, 8), _t(6, 8), None),
        {"chunks": 4, "algorithm": 0},
        r"algorithm 0 \(sequential\) runs one chunk, so chunks must be 1, got 4",
    ),
]

REDUCING = {k: OPS[k] for k in ("gemm_all_reduce", "gemm_reduce_scatter")}
RESIDUAL_CASES = [
    (
        "residual_shape",
        {"residual": _t(4, 5)},
        r"residual must have the output's shape \[4, 6\], got \[4, 5\]",
    ),
    (
        "residual_dtype",
        {"residual": _t(4, 6, dtype=torch.float32)},
        r"residual dtype Float must match x dtype Double",
    ),
]


ERROR_CASES = (
    [(case, name) for case, ops, *_ in CASES for name in ops]
    + [(case, name) for case, *_ in RESIDUAL_CASES for name in REDUCING]
    + [("algorithm_str", "gemm_all_reduce"), ("chunks_str", "gemm_all_reduce")]
    + [("unknown_group", name) for name in OPS]
    + [("group_type", "gemm_all_reduce")]
)
# Last: nothing above reached a collective, so the group is intact and a good call works on every rank.
GROUP_INTACT = ("group_intact", "gemm_all_reduce")
ERROR_CASES_BY_WORLD = {
    1: [*ERROR_CASES, GROUP_INTACT],
    # rows not divisible by the group size: only a group of 2 or more can be given such rows
    2: [*ERROR_CASES, ("rows_not_divisible", "gemm_reduce_scatter"), GROUP_INTACT],
    3: [*ERROR_CASES, ("rows_not_divisible", "gemm_reduce_scatter"), GROUP_INTACT],
}
_TABLE = {case: (args, kwargs, pattern) for case, _, args, kwargs, pattern in CASES}
_RESIDUAL_TABLE = {case: (kwargs, pattern) for case, kwargs, pattern in RESIDUAL_CASES}


def _error_case(case: str, name: str) -> None:
    world = tdist.get_world_size()
    if case in _TABLE:
        args, kwargs, pattern = _TABLE[case]
        with pytest.raises(RuntimeError, match=rf"tpext\.{name}: {pattern}"):
            OPS[name](*args, **kwargs)
    elif case in _RESIDUAL_TABLE:
        kwargs, pattern = _RESIDUAL_TABLE[case]
        x = _t(4 * world, 8)  # gemm_reduce_scatter's output is [4, 6] on every group size
        if name == "gemm_all_reduce":
            x = _t(4, 8)
        with pytest.raises(RuntimeError, match=rf"tpext\.{name}: {pattern}"):
            OPS[name](x, _t(6, 8), **kwargs)
    elif case == "algorithm_str":
        with pytest.raises(ValueError, match=r"tpext: algorithm must be 'auto' or an int, got 'fast'"):
            tpext.ops.gemm_all_reduce(_t(4, 8), _t(6, 8), algorithm="fast")
    elif case == "chunks_str":
        with pytest.raises(ValueError, match=r"tpext: chunks must be 'auto' or an int, got 'many'"):
            tpext.ops.gemm_all_reduce(_t(4, 8), _t(6, 8), chunks="many")
    elif case == "rows_not_divisible":
        rows = world + 1  # never divisible by world >= 2
        with pytest.raises(
            RuntimeError, match=rf"x.size\(0\) = {rows} must be divisible by the group size {world}"
        ):
            tpext.ops.gemm_reduce_scatter(_t(rows, 8), _t(6, 8))
    elif case == "unknown_group":
        with pytest.raises(
            RuntimeError, match=rf"tpext\.{name}: group_name 'no-such-group' does not name a registered"
        ):
            getattr(torch.ops.tpext, name)(_t(world, 8), _t(6, 8), None, "no-such-group", 1)
    elif case == "group_type":
        with pytest.raises(
            TypeError, match="group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or None"
        ):
            tpext.ops.gemm_all_reduce(_t(4, 8), _t(6, 8), group="world")
    else:
        assert case == "group_intact", case
        y = tpext.ops.gemm_all_reduce(_t(3, 8), _t(6, 8), chunks=2)
        assert torch.equal(y, torch.full((3, 6), 8.0 * world, dtype=f64))


error_batches = CaseBatches.fixture(_error_case, ERROR_CASES_BY_WORLD)


@pytest.mark.parametrize(("world_size", "case"), CaseBatches.pairs(ERROR_CASES_BY_WORLD), ids=CaseBatches.id)
def test_bad_input_raises_clear_errors(error_batches, world_size, case):
    error_batches.result(world_size, case)


def _check_mesh_groups() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match=r"DeviceMesh group must be 1-D, got a 2-D mesh"):
        tpext.ops.gemm_all_reduce(_t(2, 8), _t(6, 8), group=mesh)
    # A 1-D sub-mesh is a group: the all-reduce runs over the 2 ranks of this rank's "tp" row.
    y = tpext.ops.gemm_all_reduce(_t(2, 8), _t(6, 8), group=mesh["tp"], chunks=2)
    assert torch.equal(y, torch.full((2, 6), 16.0, dtype=f64))


def test_device_mesh_groups():
    run_ranks(_check_mesh_groups, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a cross-device call")
@pytest.mark.parametrize("name", list(OPS))
def test_device_mismatch(name):
    run_ranks(_check_device_mismatch, 1, name)


def _check_device_mismatch(name: str) -> None:
    x, w = _t(4, 8), _t(6, 8).cuda()
    with pytest.raises(RuntimeError, match=rf"tpext\.{name}: w is on cuda:0 but x(_shard)? is on cpu"):
        OPS[name](x, w)


def _check_direct_call_with_grad() -> None:
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    y = tpext.ops.gemm_all_reduce(torch.randn(4, 8, dtype=torch.float64), w, chunks=2)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


def test_direct_call_with_grad_inputs_runs_and_names_the_missing_backward():
    run_ranks(_check_direct_call_with_grad, 2)


def _disagreeing_call(case: str) -> tuple:
    """(op, args, kwargs on this rank, the difference the message names) for one way the ranks disagree."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    last = world - 1
    if case == "rows":
        return (
            "all_gather_gemm",
            (_t(2 + (rank == last), 8), _t(6, 8)),
            dict(chunks=2),
            rf"rows \(leading dims of x flattened\) = 3 on rank {last} but 2 on rank 0",
        )
    if case == "chunks":
        return (
            "gemm_all_reduce",
            (_t(4, 8), _t(6, 8)),
            dict(chunks=1 + (rank == last)),
            rf"chunks = 2 on rank {last} but 1 on rank 0",
        )
    if case == "dtype":
        return (
            "gemm_reduce_scatter",
            (
                _t(2 * world, 8, dtype=torch.float32 if rank == last else f64),
                _t(6, 8, dtype=torch.float32 if rank == last else f64),
            ),
            dict(chunks=1),
            rf"dtype = Float on rank {last} but Double on rank 0",
        )
    # A rank whose own check fails (rows not divisible by the group) still takes part in the comparison.
    assert case == "one_rank_rejects", case
    return (
        "gemm_reduce_scatter",
        (_t(2 * world - (rank == last), 8), _t(6, 8)),
        dict(chunks=1),
        rf"arguments accepted \(1\) or rejected \(0\) = 0 on rank {last} but 1 on rank 0",
    )


DISAGREE_CASES = ["rows", "chunks", "dtype", "one_rank_rejects", "agreeing"]


def _ranks_disagree_case(case: str) -> None:
    """Arguments that differ between ranks would hang or abort inside the collective; under torch's
    TORCH_DISTRIBUTED_DEBUG=DETAIL the ops compare them first and every rank raises the same error."""
    tdist.set_debug_level(tdist.DebugLevel.DETAIL)
    try:
        if case == "agreeing":  # the same calls with agreeing arguments pass the check and compute
            y = tpext.ops.gemm_all_reduce(_t(3, 8), _t(6, 8), chunks=2)
            assert torch.equal(y, torch.full((3, 6), 8.0 * tdist.get_world_size(), dtype=f64))
            return
        name, args, kwargs, difference = _disagreeing_call(case)
        with pytest.raises(
            RuntimeError,
            match=rf"tpext\.{name}: the ranks of group .* called it with different "
            rf"arguments \(checked because TORCH_DISTRIBUTED_DEBUG=DETAIL\):.* "
            rf"{difference}",
        ):
            OPS[name](*args, **kwargs)
    finally:
        tdist.set_debug_level(tdist.DebugLevel.OFF)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"tp{w}")
def disagree_results(request):
    return run_cases(_ranks_disagree_case, request.param, [(c,) for c in DISAGREE_CASES])


@pytest.mark.parametrize("case", DISAGREE_CASES)
def test_ranks_that_disagree_raise_under_distributed_debug(disagree_results, case):
    case_result(disagree_results, (case,))
