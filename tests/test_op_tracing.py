"""The ops are real torch ops: schema, fake kernels, opcheck, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from dist import run_ranks

import tpext

f64 = torch.float64


def _inputs(rows: int):
    g = torch.Generator().manual_seed(tdist.get_rank())
    x = torch.randn(rows, 3, 8, generator=g, dtype=f64)
    w = torch.randn(6, 8, generator=g, dtype=f64)
    b = torch.randn(6, generator=g, dtype=f64)
    return x, w, b


def _check_opcheck() -> None:
    name = tpext.group_name()
    world = tdist.get_world_size()
    x, w, b = _inputs(2 * world)
    residual = torch.randn(2 * world, 3, 6, dtype=f64)
    for args in [(x, w, b, name, 3), (x, w, None, name, 1), (x, w, b, name, 1, 0), (x, w, b, name, 2, 2)]:
        torch.library.opcheck(torch.ops.tpext.gemm_all_reduce.default, args)
        torch.library.opcheck(torch.ops.tpext.gemm_reduce_scatter.default, args)
        torch.library.opcheck(torch.ops.tpext.all_gather_gemm.default, args)
    torch.library.opcheck(torch.ops.tpext.gemm_all_reduce.default, (x, w, b, name, 2, 1, residual))
    torch.library.opcheck(torch.ops.tpext.gemm_reduce_scatter.default, (x, w, b, name, 2, 2, residual[:2]))


def test_opcheck():
    run_ranks(_check_opcheck, 2)


def _check_fake_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    name = tpext.group_name()
    world = tdist.get_world_size()
    with FakeTensorMode():
        x, w, b = torch.empty(4 * world, 5, 8), torch.empty(6, 8), torch.empty(6)
        assert torch.ops.tpext.gemm_all_reduce(x, w, b, name, 2).shape == (4 * world, 5, 6)
        assert torch.ops.tpext.gemm_reduce_scatter(x, w, b, name, 2).shape == (4, 5, 6)
        y, gathered = torch.ops.tpext.all_gather_gemm(x, w, b, name, 2)
        assert y.shape == (4 * world * world, 5, 6) and gathered.shape == (4 * world * world, 5, 8)


def test_fake_kernels_give_the_real_shapes():
    run_ranks(_check_fake_shapes, 3)


def _layer(x, w, b, w2, name: str):
    # All three ops in one graph: reduce-scatter, a pointwise op, all-gather back, then the all-reduce.
    y = torch.ops.tpext.gemm_reduce_scatter(x, w, b, name, 2)  # [M/R, 3, 6]
    z, _ = torch.ops.tpext.all_gather_gemm(torch.nn.functional.gelu(y), w2, None, name, 3)  # [M, 3, 8]
    return torch.ops.tpext.gemm_all_reduce(z, w, b, name, 4) * 0.5  # [M, 3, 6]


def _check_compile() -> None:
    name = tpext.group_name()
    x, w, b = _inputs(2 * tdist.get_world_size())
    w2 = torch.randn(8, 6, dtype=f64)
    eager = _layer(x, w, b, w2, name)
    compiled = torch.compile(_layer, fullgraph=True)(x, w, b, w2, name)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_matches_eager():
    run_ranks(_check_compile, 2, timeout_s=240)


def test_build_info():
    assert isinstance(tpext.cuda_compiled, bool)
    assert tpext._C.built_with_torch == torch.__version__.split("+")[0]
