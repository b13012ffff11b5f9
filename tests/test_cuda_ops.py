"""The ops on an NVIDIA GPU through tpext's own NCCL communicator (marker `gpu`; skipped without CUDA).

World size 1 goes through the real NCCL path (``set_nccl_options(local_fast_path=False)``): a one-rank
ncclComm, the communication stream, the events and both compute lanes all run, so every plan of every
op and of its backward dual is checked against an fp64 reference. Accuracy rule (DESIGN.md): the RMS
error of tpext's output vs fp64 must be at most 2x the RMS error of the dense PyTorch layer
(F.linear in the same dtype) vs fp64, plus a floor of a few ulps for outputs that are exact.

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

import tpext
from dist import run_ranks
from test_op_virtual_ranks import check_all_ops
from tpext.planner import Algorithm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

PLANS = [(1, Algorithm.SEQUENTIAL), (3, Algorithm.CHUNKED_PIPELINE), (4, Algorithm.CHUNKED_TWO_STREAMS)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A dedicated pool (the harness keys pools by group timeout): these ranks hold CUDA contexts and NCCL comms.
GPU_POOL = {"group_timeout_s": 61.0, "timeout_s": 300.0}


def _rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).pow(2).mean().sqrt().item()


def _check(got: torch.Tensor, ref: torch.Tensor, dense: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(ref.shape)}"
    floor = 4 * torch.finfo(got.dtype).eps * ref.abs().mean().item()
    err, dense_err = _rms(got, ref), _rms(dense, ref)
    assert err <= 2 * dense_err + floor, f"{what}: RMS error {err:.3e} > 2 x dense {dense_err:.3e} + {floor:.1e}"


def _inputs(dtype, m=1000, k=512, n=768, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    res = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    return x, w, b, res


def _force_nccl() -> None:
    torch.cuda.set_device(0)
    tpext.ops.set_nccl_options(local_fast_path=False)


def _check_world1_nccl(dtype_name: str) -> None:
    _force_nccl()
    dtype = DTYPES[dtype_name]
    x, w, b, res = _inputs(dtype)
    x64, w64, b64, res64 = x.double(), w.double(), b.double(), res.double()
    ref = x64 @ w64.T + b64
    dense = F.linear(x, w, b)
    for chunks, algorithm in PLANS:
        plan = dict(chunks=chunks, algorithm=algorithm)
        what = f"{dtype_name} chunks={chunks} {algorithm.name}"
        _check(tpext.ops.gemm_all_reduce(x, w, b, **plan), ref, dense, f"gemm_all_reduce {what}")
        _check(tpext.ops.gemm_all_reduce(x, w, b, residual=res, **plan), ref + res64, dense + res,
               f"gemm_all_reduce+residual {what}")
        _check(tpext.ops.gemm_reduce_scatter(x, w, b, **plan), ref, dense, f"gemm_reduce_scatter {what}")
        _check(tpext.ops.gemm_reduce_scatter(x, w, b, residual=res, **plan), ref + res64, dense + res,
               f"gemm_reduce_scatter+residual {what}")
        y, gathered = tpext.ops.all_gather_gemm(x, w, b, **plan)
        _check(y, ref, dense, f"all_gather_gemm {what}")
        assert torch.equal(gathered, x), f"all_gather_gemm {what}: gathered input differs"
        # The backward duals: the weight transposed (non-contiguous), no bias, as tpext.nn calls them.
        dy = y
        dref, ddense = dy.double() @ w64, dy @ w
        _check(tpext.ops.gemm_all_reduce(dy, w.t(), None, **plan), dref, ddense, f"dual gemm_all_reduce {what}")
        _check(tpext.ops.gemm_reduce_scatter(dy, w.t(), None, **plan), dref, ddense, f"dual gemm_reduce_scatter {what}")
        dx, _ = tpext.ops.all_gather_gemm(dy, w.t(), None, **plan)
        _check(dx, dref, ddense, f"dual all_gather_gemm {what}")
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


def _check_graph_capture() -> None:
    _force_nccl()
    x, w, b, res = _inputs(torch.bfloat16)
    static_x = x.clone()
    plan = dict(chunks=4, algorithm=Algorithm.CHUNKED_TWO_STREAMS)
    tpext.ops.gemm_all_reduce(static_x, w, b, residual=res, **plan)  # warm-up: comm, streams, cuBLAS
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tpext.ops.gemm_all_reduce(static_x, w, b, residual=res, **plan)
    for seed in (1, 2):
        fresh, *_ = _inputs(torch.bfloat16, seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager = tpext.ops.gemm_all_reduce(fresh, w, b, residual=res, **plan)
        torch.testing.assert_close(static_y, eager)


def test_chunked_schedule_is_cuda_graph_capturable():
    run_ranks(_check_graph_capture, 1, **GPU_POOL)


def _check_sm_budget() -> None:
    torch.cuda.set_device(0)
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
