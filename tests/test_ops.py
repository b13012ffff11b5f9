"""torch.ops.tpext.* against the unsharded fp64 reference, on gloo at world sizes 1-4.

Every rank builds all ranks' inputs from fixed seeds, so it can compute the dense reference itself.
Each point of the sweep is its own test case (one round trip to the ranks per world size). The sweep
covers every chunk count from 1 to 8 (including counts that do not divide the rows and counts larger than
the rows) and every algorithm that takes it over several shapes, with and without bias (and residual,
for the reducing ops).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from dist import case_result, run_cases, run_ranks

import tpext
from tpext.commands.benchmark import gemm_calls
from tpext.ops import Algorithm

WORLD_SIZES = [1, 2, 3, 4]
CHUNKS = range(1, 9)
EPILOGUE_CHUNKS = (1, 3, 8)  # the epilogue runs once per finished block: fewer counts cover its row offsets
K, N = 16, 12
REL_TOL = 1e-12  # fp64: chunked and sequential agree with the reference up to rounding


def _plans(chunk_counts=CHUNKS):
    """(chunks, algorithm) pairs: all three algorithms for one chunk, both pipelines for more."""
    for chunks in chunk_counts:
        algorithms = (
            list(Algorithm) if chunks == 1 else [Algorithm.CHUNKED_PIPELINE, Algorithm.CHUNKED_TWO_STREAMS]
        )
        for algorithm in algorithms:
            yield chunks, algorithm


def _randn(seed: int, *shape: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rel_tol: float = REL_TOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= rel_tol * scale, f"{what}: max abs error {err:.3e} > {rel_tol:.0e} x {scale:.3g}"


# Leading shapes of x (without K). Uneven row counts (7, 5x3) exercise chunk splits that do not divide.
AR_SHAPES = [(1,), (7,), (12,), (2, 5), (3, 2, 2)]
# Rows per rank for the sequence-sharded ops, with optional extra dims after dim 0.
SHARD_SHAPES = [(1,), (5,), (8,), (3, 4)]


EPILOGUES = ((False, False), (True, False), (True, True))  # (bias, residual)


def _reducing_cases(shapes) -> list[tuple]:
    """(shape index, bias, residual, chunks, algorithm) for every sweep point of a reducing op."""
    return [
        (si, with_bias, with_res, chunks, algorithm)
        for si in range(len(shapes))
        for with_bias, with_res in EPILOGUES
        for chunks, algorithm in _plans(CHUNKS if not with_bias else EPILOGUE_CHUNKS)
    ]


AR_CASES = _reducing_cases(AR_SHAPES)
RS_CASES = _reducing_cases(SHARD_SHAPES)
AG_CASES = [
    (si, with_bias, chunks, algorithm)
    for si in range(len(SHARD_SHAPES))
    for with_bias in (False, True)
    for chunks, algorithm in _plans()
]


def _id(shape, *flags_and_schedule) -> str:
    *flags, chunks, algorithm = flags_and_schedule
    names = ("bias", "residual")
    extra = "".join(f"-{n}" for n, on in zip(names, flags) if on)
    return f"x{'x'.join(map(str, shape))}{extra}-chunks{chunks}-{algorithm.name}"


def _epilogue(with_bias: bool, with_res: bool, bias_seed: int, residual_seed: int, *residual_shape: int):
    """(bias or None, residual or None, what they add to the reference) of a sweep point."""
    bias = _randn(bias_seed, N) if with_bias else None
    residual = _randn(residual_seed, *residual_shape, N) if with_res else None
    return bias, residual, sum(t for t in (bias, residual) if t is not None)


def _gemm_all_reduce_case(
    si: int, with_bias: bool, with_res: bool, chunks: int, algorithm: Algorithm
) -> tuple:
    """(tpext's output, the dense reference) on this rank."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    lead = AR_SHAPES[si]
    xs = [_randn(100 * si + r, *lead, K) for r in range(world)]
    ws = [_randn(1000 + 100 * si + r, N, K) for r in range(world)]
    bias, residual, added = _epilogue(with_bias, with_res, 7, 11, *lead)
    y = tpext.ops.gemm_all_reduce(
        xs[rank], ws[rank], bias, chunks=chunks, algorithm=algorithm, residual=residual
    )
    return y, sum(x @ w.T for x, w in zip(xs, ws)) + added


def _gemm_reduce_scatter_case(
    si: int, with_bias: bool, with_res: bool, chunks: int, algorithm: Algorithm
) -> tuple:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    m, *mid = SHARD_SHAPES[si]
    xs = [_randn(200 * si + r, world * m, *mid, K) for r in range(world)]
    ws = [_randn(2000 + 200 * si + r, N, K) for r in range(world)]
    # the residual is per rank: it belongs to this shard
    bias, residual, added = _epilogue(with_bias, with_res, 8, 12 + rank, m, *mid)
    y = tpext.ops.gemm_reduce_scatter(
        xs[rank], ws[rank], bias, chunks=chunks, algorithm=algorithm, residual=residual
    )
    return y, sum(x @ w.T for x, w in zip(xs, ws))[rank * m : (rank + 1) * m] + added


def _all_gather_gemm_case(si: int, with_bias: bool, chunks: int, algorithm: Algorithm) -> tuple:
    """(output, reference, gathered input, concatenated shards) on this rank."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    m, *mid = SHARD_SHAPES[si]
    shards = [_randn(300 * si + r, m, *mid, K) for r in range(world)]
    w = _randn(3000 + 300 * si + rank, N, K)  # column shards differ per rank
    bias = _randn(9 + rank, N)
    x_full = torch.cat(shards)
    y, gathered = tpext.ops.all_gather_gemm(
        shards[rank], w, bias if with_bias else None, chunks=chunks, algorithm=algorithm
    )
    return y, x_full @ w.T + (bias if with_bias else 0), gathered, x_full


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"tp{w}")
def op_results(request):
    """Every case of the three ops in one round trip per world size."""
    return {
        "gemm_all_reduce": run_cases(_gemm_all_reduce_case, request.param, AR_CASES),
        "gemm_reduce_scatter": run_cases(_gemm_reduce_scatter_case, request.param, RS_CASES),
        "all_gather_gemm": run_cases(_all_gather_gemm_case, request.param, AG_CASES),
    }


@pytest.mark.parametrize("case", AR_CASES, ids=[_id(AR_SHAPES[c[0]], *c[1:]) for c in AR_CASES])
def test_gemm_all_reduce(op_results, case):
    per_rank = case_result(op_results["gemm_all_reduce"], case)
    for rank, (y, want) in enumerate(per_rank):
        _assert_close(y, want, f"rank {rank}")
        # The reduction is the same collective on every rank: results must be bitwise identical.
        assert torch.equal(y, per_rank[0][0]), f"rank {rank} differs from rank 0"


@pytest.mark.parametrize("case", RS_CASES, ids=[_id(SHARD_SHAPES[c[0]], *c[1:]) for c in RS_CASES])
def test_gemm_reduce_scatter(op_results, case):
    for rank, (y, want) in enumerate(case_result(op_results["gemm_reduce_scatter"], case)):
        _assert_close(y, want, f"rank {rank}")


@pytest.mark.parametrize("case", AG_CASES, ids=[_id(SHARD_SHAPES[c[0]], *c[1:]) for c in AG_CASES])
def test_all_gather_gemm(op_results, case):
    for rank, (y, want, gathered, x_full) in enumerate(case_result(op_results["all_gather_gemm"], case)):
        _assert_close(y, want, f"rank {rank}")
        assert torch.equal(gathered, x_full), (
            f"rank {rank}: gathered input differs from the concatenated shards"
        )


def _check_fp32_and_strided_inputs() -> None:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    # A transposed (non-contiguous) weight and a non-contiguous x: the ops must not assume layouts.
    xs = [_randn(r, K, 2 * world * 3, dtype=torch.float32).t()[::2] for r in range(world)]
    ws = [_randn(50 + r, K, N, dtype=torch.float32).t() for r in range(world)]
    dense = sum(x.double() @ w.double().T for x, w in zip(xs, ws))
    y = tpext.ops.gemm_all_reduce(xs[rank], ws[rank], chunks=3)
    assert y.dtype == torch.float32 and y.is_contiguous()
    _assert_close(y, dense, "fp32 gemm_all_reduce", rel_tol=1e-5)
    y = tpext.ops.gemm_reduce_scatter(xs[rank], ws[rank], chunks=2)
    _assert_close(y, dense.chunk(world)[rank], "fp32 gemm_reduce_scatter", rel_tol=1e-5)
    y, _ = tpext.ops.all_gather_gemm(xs[rank], ws[rank], chunks=2)
    _assert_close(y, torch.cat([x.double() for x in xs]) @ ws[rank].double().T, "fp32 all_gather_gemm", 1e-5)


def _check_one_gemm_per_chunk() -> None:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    m = 5  # rows per rank (and of gemm_all_reduce's x): chunk counts above 5 use 5 chunks
    x = _randn(rank, world * m, K)
    w = _randn(50 + rank, N, K)
    bias = _randn(9, N)
    ops = {
        "gemm_all_reduce": lambda c, a: tpext.ops.gemm_all_reduce(x[:m], w, bias, chunks=c, algorithm=a),
        "gemm_reduce_scatter": lambda c, a: tpext.ops.gemm_reduce_scatter(x, w, bias, chunks=c, algorithm=a),
        "all_gather_gemm": lambda c, a: tpext.ops.all_gather_gemm(x[:m], w, bias, chunks=c, algorithm=a),
    }
    for chunks, algorithm in _plans((1, 2, 3, 8)):
        calls = {name: gemm_calls(lambda op=op, c=chunks, a=algorithm: op(c, a)) for name, op in ops.items()}
        used = min(chunks, m)
        assert calls == dict.fromkeys(ops, used), (
            f"chunks={chunks} {algorithm.name}: GEMM calls {calls}, want {used} each"
        )


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_gemm_per_chunk(world_size):
    # One GEMM call per chunk, whatever the group size: the chunk's rows of every rank's block are one
    # batched GEMM (one launch on CUDA), not one GEMM per block.
    run_ranks(_check_one_gemm_per_chunk, world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fp32_and_strided_inputs(world_size):
    run_ranks(_check_fp32_and_strided_inputs, world_size)


def _check_empty_rows() -> None:
    world = tdist.get_world_size()
    x, w, b = torch.empty(0, K, dtype=torch.float64), _randn(1, N, K), _randn(2, N)
    assert tpext.ops.gemm_all_reduce(x, w, b, chunks=4).shape == (0, N)
    assert tpext.ops.gemm_reduce_scatter(x, w, b, chunks=4).shape == (0, N)
    y, gathered = tpext.ops.all_gather_gemm(x, w, b, chunks=4)
    assert y.shape == (0, N) and gathered.shape == (0, K)
    # The group is still usable afterwards (no rank skipped or added a collective).
    y = tpext.ops.gemm_all_reduce(
        torch.ones(2, K, dtype=torch.float64), torch.ones(N, K, dtype=torch.float64)
    )
    assert torch.equal(y, torch.full((2, N), float(K * world), dtype=torch.float64))


def test_empty_rows():
    run_ranks(_check_empty_rows, 2)


def _check_empty_k_and_n() -> None:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    b = _randn(2, N)
    for chunks in (1, 3):
        # Row-parallel with an uneven K split: rank 0 holds no columns of K, the others do. Every rank
        # still joins the reduction, so the sum is the other ranks' products plus the bias once.
        k_local = 0 if rank == 0 else K
        xs = [_randn(10 + r, 6, 0 if r == 0 else K) for r in range(world)]
        ws = [_randn(20 + r, N, 0 if r == 0 else K) for r in range(world)]
        dense = sum(x @ w.T for x, w in zip(xs, ws)) + b
        assert xs[rank].shape[-1] == k_local
        y = tpext.ops.gemm_all_reduce(xs[rank], ws[rank], b, chunks=chunks)
        _assert_close(y, dense, f"gemm_all_reduce, K = {k_local} on rank {rank}, chunks={chunks}")
        y = tpext.ops.gemm_reduce_scatter(xs[rank], ws[rank], b, chunks=chunks)
        _assert_close(y, dense.chunk(world)[rank], f"gemm_reduce_scatter, K = {k_local} on rank {rank}")
        # K = 0 everywhere: nothing to gather, the output is the bias.
        y, gathered = tpext.ops.all_gather_gemm(
            torch.empty(3, 0, dtype=torch.float64), torch.empty(N, 0, dtype=torch.float64), b, chunks=chunks
        )
        assert gathered.shape == (3 * world, 0)
        _assert_close(y, b.expand(3 * world, N), "all_gather_gemm, K = 0")
        # N = 0: no output columns, but the gathered input (kept for the weight gradient) is complete.
        shards = [_randn(30 + r, 3, K) for r in range(world)]
        y, gathered = tpext.ops.all_gather_gemm(
            shards[rank], torch.empty(0, K, dtype=torch.float64), chunks=chunks
        )
        assert y.shape == (3 * world, 0)
        assert torch.equal(gathered, torch.cat(shards)), (
            "all_gather_gemm with N = 0 returned an incomplete gather"
        )


def test_empty_k_and_n():
    run_ranks(_check_empty_k_and_n, 2)
