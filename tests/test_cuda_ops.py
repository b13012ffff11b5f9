"""The ops on an NVIDIA GPU through tpext's own NCCL communicator (marker `gpu`; skipped without CUDA).

World size 1 goes through the real NCCL path (``set_nccl_options(local_fast_path=False)``): a one-rank
ncclComm, the communication stream, the events and both compute lanes all run, so every plan of every
op and of its backward dual is checked against an fp64 reference. Accuracy rule (DESIGN.md): the RMS
error of tpext's output vs fp64 must be at most 2x the RMS error of the dense PyTorch layer
(F.linear in the same dtype) vs fp64, and its worst element at most 4x the dense layer's worst (a floor
of a few ulps only where the dense layer is exact).

Multi-rank schedules run on one GPU with virtual ranks (threads of one process, each on its own
stream; csrc/comm/virtual.h). The two-rank test gives each rank its own NCCL_HOSTID so that NCCL
treats two processes on one GPU as two hosts (socket transport over loopback): an experiment from
DESIGN.md section 4, not yet run on a GPU. NCCL may refuse it, or the two processes' spinning NCCL
kernels may only progress through the GPU's time-slicing (slow; the test is marked slow).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from dist import run_ranks
from test_op_virtual_ranks import check_all_ops

import tpext
from tpext.ops import Algorithm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PLANS = [(1, Algorithm.SEQUENTIAL), (3, Algorithm.CHUNKED_PIPELINE), (4, Algorithm.CHUNKED_TWO_STREAMS)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A dedicated pool (the harness keys pools by group timeout): these ranks hold CUDA contexts and NCCL comms.
GPU_POOL = {"group_timeout_s": 61.0, "timeout_s": 300.0}


def _err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(RMS, max) absolute error of `a` against the fp64 `ref`."""
    diff = (a.double() - ref).abs()
    return diff.pow(2).mean().sqrt().item(), diff.max().item()


def _check(got: torch.Tensor, ref: torch.Tensor, dense: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(ref.shape)}"
    (rms, worst), (dense_rms, dense_worst) = _err(got, ref), _err(dense, ref)
    # The floor only serves outputs the dense layer gets exactly right; for any other output it would
    # hide a whole wrong row among a thousand.
    floor = 4 * torch.finfo(got.dtype).eps * ref.abs().mean().item() if dense_rms == 0 else 0.0
    assert rms <= 2 * dense_rms + floor, (
        f"{what}: RMS error {rms:.3e} > 2 x dense {dense_rms:.3e} + {floor:.1e}"
    )
    # Elementwise: one rounding more than the dense layer (bias added after the reduction) at most
    # doubles the worst element's error; a wrong element is far outside.
    assert worst <= 4 * dense_worst + floor, (
        f"{what}: max error {worst:.3e} > 4 x dense {dense_worst:.3e} + {floor:.1e}"
    )


def _inputs(dtype, m=1000, k=512, n=768, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    res = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    return x, w, b, res


def _force_nccl() -> None:
    torch.cuda.set_device(0)
    tpext.ops.set_nccl_options(local_fast_path=False)


def _check_world1_nccl(dtype_name: str) -> None:
    _force_nccl()
    dtype = DTYPES[dtype_name]
    # Every call gets inputs of its own seed: an output block the caching allocator hands back still
    # holding an earlier call's result then holds wrong values, never the expected ones.
    seeds = iter(range(1000))
    for chunks, algorithm in PLANS:
        plan = dict(chunks=chunks, algorithm=algorithm)
        what = f"{dtype_name} chunks={chunks} {algorithm.name}"
        for op in ("gemm_all_reduce", "gemm_reduce_scatter"):
            for with_residual in (False, True):
                x, w, b, res = _inputs(dtype, seed=next(seeds))
                ref = x.double() @ w.double().T + b.double()
                dense = F.linear(x, w, b)
                extra = {}
                if with_residual:
                    ref, dense, extra = ref + res.double(), dense + res, {"residual": res}
                _check(
                    getattr(tpext.ops, op)(x, w, b, **extra, **plan),
                    ref,
                    dense,
                    f"{op}{'+residual' if with_residual else ''} {what}",
                )
        x, w, b, _ = _inputs(dtype, seed=next(seeds))
        y, gathered = tpext.ops.all_gather_gemm(x, w, b, **plan)
        _check(y, x.double() @ w.double().T + b.double(), F.linear(x, w, b), f"all_gather_gemm {what}")
        assert torch.equal(gathered, x), f"all_gather_gemm {what}: gathered input differs"
        # The backward duals: the weight transposed (non-contiguous), no bias, as tpext.nn calls them.
        for op in ("gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"):
            _, w, _, dy = _inputs(dtype, seed=next(seeds))  # dy [m, n] like the layer's output, w [n, k]
            out = getattr(tpext.ops, op)(dy, w.t(), None, **plan)
            dx = out[0] if op == "all_gather_gemm" else out
            _check(dx, dy.double() @ w.double(), dy @ w, f"dual {op} {what}")
    torch.cuda.synchronize()
    info = tpext.ops.nccl_comm_info()
    assert info["created"] and info["size"] == 1 and info["device"] == 0, info


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_world1_through_nccl_matches_fp64(dtype_name):
    assert tpext.cuda_compiled, "a CUDA device is visible but tpext was built without CUDA"
    run_ranks(_check_world1_nccl, 1, dtype_name, **GPU_POOL)


def _check_local_fast_path() -> None:
    torch.cuda.set_device(0)
    tpext.ops.set_nccl_options(local_fast_path=True)  # drops any communicator an earlier test made
    x, w, b, _ = _inputs(torch.float32, m=64)
    y = tpext.ops.gemm_all_reduce(x, w, b, chunks=4)
    torch.testing.assert_close(y, F.linear(x, w, b))
    assert not tpext.ops.nccl_comm_info()["created"], "a group of one made an NCCL communicator"


def test_world1_local_fast_path_makes_no_nccl_call():
    run_ranks(_check_local_fast_path, 1, **GPU_POOL)


def _check_graph_capture(op: str) -> None:
    _force_nccl()
    x, w, b, res = _inputs(torch.bfloat16)
    static_x = x.clone()
    plan = dict(chunks=4, algorithm=Algorithm.CHUNKED_TWO_STREAMS)
    extra = {} if op == "all_gather_gemm" else {"residual": res}

    def call(inp):
        out = getattr(tpext.ops, op)(inp, w, b, **extra, **plan)
        return out[0] if op == "all_gather_gemm" else out

    call(static_x)  # warm-up: communicator, streams, cuBLAS workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = call(static_x)
    for seed in (1, 2):
        fresh, *_ = _inputs(torch.bfloat16, seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, call(fresh))


@pytest.mark.parametrize("op", ["gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"])
def test_chunked_schedule_is_cuda_graph_capturable(op):
    run_ranks(_check_graph_capture, 1, op, **GPU_POOL)


def _check_sm_budget() -> None:
    torch.cuda.set_device(0)
    tpext.ops.set_nccl_options()  # defaults first, so the next line changes the options even on a re-run
    tpext.ops.set_nccl_options(max_ctas=2, local_fast_path=False)
    assert not tpext.ops.nccl_comm_info()["created"], "changed options must drop the cached communicator"
    x, w, b, _ = _inputs(torch.float32)
    y = tpext.ops.gemm_all_reduce(x, w, b, chunks=2)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    info = tpext.ops.nccl_comm_info()
    assert info["created"] and info["options"]["max_ctas"] == 2, info
    for bad in (-1, 65):
        with pytest.raises(RuntimeError, match=r"max_ctas must be in \[0, 64\]"):
            tpext.ops.set_nccl_options(max_ctas=bad)


def test_sm_budget_is_set_per_group():
    run_ranks(_check_sm_budget, 1, **GPU_POOL)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype, rel_tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_virtual_ranks_on_one_gpu(world, dtype, rel_tol):
    """Multi-rank schedules in one process: each virtual rank on its own stream, collectives ordered by
    events on the communication stream. A missing wait shows up as stale rows, far outside rel_tol."""
    check_all_ops(world, device="cuda", dtype=dtype, rel_tol=rel_tol, m=300)
    torch.cuda.synchronize()


def _check_two_ranks_one_gpu() -> None:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    os.environ["NCCL_HOSTID"] = f"tpext-virtual-host-{rank}"  # read when the first communicator is made
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # "different hosts" on one machine talk over loopback
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(256, 64, generator=g, dtype=torch.float64) for _ in range(world)]
    ws = [torch.randn(96, 64, generator=g, dtype=torch.float64) for _ in range(world)]
    ref = sum(x @ w.T for x, w in zip(xs, ws))
    x, w = xs[rank].float().cuda(), ws[rank].float().cuda()
    for chunks, algorithm in PLANS:
        y = tpext.ops.gemm_all_reduce(x, w, chunks=chunks, algorithm=algorithm)
        torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-4, atol=1e-4)
        y = tpext.ops.gemm_reduce_scatter(x, w, chunks=chunks, algorithm=algorithm)
        torch.testing.assert_close(y.double().cpu(), ref.chunk(world)[rank], rtol=1e-4, atol=1e-4)
        shard = xs[rank][:128].float().cuda()
        y, gathered = tpext.ops.all_gather_gemm(shard, w, chunks=chunks, algorithm=algorithm)
        full = torch.cat([xs[r][:128] for r in range(world)])
        torch.testing.assert_close(gathered.double().cpu(), full, rtol=0, atol=1e-6)
        torch.testing.assert_close(y.double().cpu(), full @ ws[rank].T, rtol=1e-4, atol=1e-4)
    torch.cuda.synchronize()


@pytest.mark.slow
def test_two_ranks_on_one_gpu_with_nccl_hostid():
    run_ranks(_check_two_ranks_one_gpu, 2, group_timeout_s=62.0, timeout_s=300.0)
