"""The ops' multi-rank schedules on virtual ranks: R ranks in one process, one thread each, meeting in
an in-process hub instead of a ProcessGroup (csrc/comm/virtual.h). On CPU this checks the same chunk
loops as the gloo tests without spawning processes; tests/test_cuda_ops.py runs it on one GPU, where
each rank gets its own stream and the hub orders them with events like the NCCL communicator.
"""

from __future__ import annotations

import pytest
import torch

import tpext  # noqa: F401  (loads the extension)
from tpext.ops import Algorithm
from tpext.ops.testing import run_on_virtual_ranks

K, N = 16, 12
PLANS = [
    (1, Algorithm.SEQUENTIAL),
    (1, Algorithm.CHUNKED_PIPELINE),
    (3, Algorithm.CHUNKED_PIPELINE),
    (8, Algorithm.CHUNKED_PIPELINE),
    (3, Algorithm.CHUNKED_TWO_STREAMS),
    (5, Algorithm.CHUNKED_TWO_STREAMS),
]


def _randn(seed, *shape, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


OP_NAMES = ("gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm")


def check_all_ops(
    world: int,
    device: str = "cpu",
    dtype=torch.float64,
    rel_tol: float = 1e-12,
    m: int = 7,
    plans=PLANS,
    ops=OP_NAMES,
) -> None:
    """Each op in `ops` on `world` virtual ranks vs the fp64 reference, every plan in `plans` (all of both
    by default); shared with the GPU tests."""
    xs = [_randn(r, world * m, 2, K, device=device, dtype=dtype) for r in range(world)]
    ws = [_randn(100 + r, N, K, device=device, dtype=dtype) for r in range(world)]
    bias = _randn(7, N, device=device, dtype=dtype)
    dense = sum(x.double() @ w.double().T for x, w in zip(xs, ws))
    scale = max(1.0, dense.abs().max().item())

    def close(got, want, what):
        err = (got.double() - want).abs().max().item()
        assert err <= rel_tol * scale, f"{what}: max abs error {err:.3e} > {rel_tol:.0e} x {scale:.3g}"

    for chunks, algorithm in plans:
        what = f"world={world} chunks={chunks} {algorithm.name}"
        if "gemm_all_reduce" in ops:
            res = [_randn(200 + r, world * m, 2, N, device=device, dtype=dtype) for r in range(world)]
            outs = run_on_virtual_ranks(
                "gemm_all_reduce", xs, ws, [bias] * world, res, chunks, int(algorithm)
            )
            for r, (y,) in enumerate(outs):
                close(y, dense + bias.double() + res[r].double(), f"gemm_all_reduce rank {r} {what}")
        if "gemm_reduce_scatter" in ops:
            res = [_randn(300 + r, m, 2, N, device=device, dtype=dtype) for r in range(world)]
            outs = run_on_virtual_ranks(
                "gemm_reduce_scatter", xs, ws, [bias] * world, res, chunks, int(algorithm)
            )
            for r, (y,) in enumerate(outs):
                want = dense[r * m : (r + 1) * m] + bias.double() + res[r].double()
                close(y, want, f"gemm_reduce_scatter rank {r} {what}")
        if "all_gather_gemm" in ops:
            shards = [x[:m] for x in xs]
            outs = run_on_virtual_ranks(
                "all_gather_gemm", shards, ws, [bias] * world, [], chunks, int(algorithm)
            )
            x_full = torch.cat(shards)
            for r, (y, gathered) in enumerate(outs):
                assert torch.equal(gathered, x_full), (
                    f"all_gather_gemm rank {r} {what}: gathered input differs"
                )
                close(
                    y, x_full.double() @ ws[r].double().T + bias.double(), f"all_gather_gemm rank {r} {what}"
                )


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("plan", PLANS, ids=[f"chunks{c}-{a.name}" for c, a in PLANS])
@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"tp{w}")
def test_virtual_ranks_match_fp64(world, plan, op):
    check_all_ops(world, plans=[plan], ops=[op])


def test_all_reduce_is_bitwise_identical_on_every_rank():
    xs = [_randn(r, 9, K) for r in range(3)]
    ws = [_randn(10 + r, N, K) for r in range(3)]
    outs = run_on_virtual_ranks("gemm_all_reduce", xs, ws, [], [], 4, int(Algorithm.CHUNKED_TWO_STREAMS))
    assert all(torch.equal(o[0], outs[0][0]) for o in outs)


def test_a_failing_rank_aborts_its_peers_instead_of_hanging():
    xs = [_randn(r, 8, K) for r in range(3)]
    ws = [_randn(10 + r, N, K) for r in range(3)]
    ws[1] = _randn(
        11, N, K + 1
    )  # rank 1 fails its argument check; ranks 0 and 2 wait in the first collective
    with pytest.raises(
        RuntimeError, match=r"tpext.gemm_all_reduce: x's last dim K = 16 must equal w.size\(1\)"
    ):
        run_on_virtual_ranks("gemm_all_reduce", xs, ws, [], [], 2, int(Algorithm.CHUNKED_PIPELINE))
