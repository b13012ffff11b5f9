"""P2P ops on gloo (their host references and the c10d fallback) vs an fp64 dense oracle; the fused
all-reduce + residual + RMSNorm with its backward; the size policy and its wiring into the layers; the
fallback log; opcheck; error messages. GPU-only checks (the kernels themselves, IPC) are in
tests/test_p2p_gpu.py and tests/cpp/test_p2p.cu.
"""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as tdist
from dist import CaseBatches, case_result, run_cases, run_ranks

import tpext
from tpext import p2p

f64, f32, bf16 = torch.float64, torch.float32, torch.bfloat16
SHAPES = [(7,), (3, 5), (2, 3, 13)]  # odd sizes: no multiple of any vector width


def _inputs(world: int, shape, dtype, seed: int) -> list[torch.Tensor]:
    """Every rank's input (each rank can build all of them, so each checks against the same oracle)."""
    return [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 31 + r), dtype=f64).to(dtype)
        for r in range(world)
    ]


def _ordered_f32_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The kernels' arithmetic: rank-order sum in fp32 (fp64 for fp64), one rounding."""
    acc = parts[0].to(f64 if parts[0].dtype == f64 else f32).clone()
    for p in parts[1:]:
        acc += p.to(acc.dtype)
    return acc.to(parts[0].dtype)


def _rmsnorm_oracle(parts, residual, bias, weight, eps):
    h = sum(p.to(f64) for p in parts)
    if bias is not None:
        h = h + bias.to(f64)
    if residual is not None:
        h = h + residual.to(f64)
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * weight.to(f64), h


COLLECTIVE_ALGOS = {
    "all_reduce": (p2p.ALGO_C10D, p2p.ALGO_ONE_SHOT, p2p.ALGO_TWO_SHOT),
    "reduce_scatter": (p2p.ALGO_C10D, p2p.ALGO_ONE_SHOT),
    "all_gather": (p2p.ALGO_C10D, p2p.ALGO_ONE_SHOT),
}
DTYPES = (f64, f32, bf16)
DTYPE_NAMES = {f64: "f64", f32: "f32", bf16: "bf16"}
COLLECTIVE_CASES = [
    (op, shape, dtype, algo)
    for op, algos in COLLECTIVE_ALGOS.items()
    for shape in SHAPES
    for dtype in DTYPES
    for algo in algos
]


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _collective_case(op: str, shape: tuple, dtype: torch.dtype, algo: p2p.P2PAlgorithm) -> bytes | None:
    """One P2P collective vs the fp64 oracle; the all-reduce's bits (P2P paths) for the cross-rank check."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    xs = _inputs(world, shape, dtype, seed=len(shape))
    tol = {f64: 1e-12, f32: 1e-5, bf16: 2e-2}[dtype]
    what = f"{op} shape={shape} {dtype} algo={algo}"
    if op == "all_reduce":
        oracle = sum(x.to(f64) for x in xs)
        y = tpext.ops.p2p_all_reduce(xs[rank], algorithm=algo)
        torch.testing.assert_close(y.to(f64), oracle, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
        if algo == p2p.ALGO_C10D:
            return None
        assert torch.equal(y, _ordered_f32_sum(xs)), f"{what}: not the kernels' rank-order sum"
        return y.view(-1).to(f64).numpy().tobytes()
    if op == "reduce_scatter":
        rows = shape[0] * world
        xs_rs = _inputs(world, (rows, *shape[1:]), dtype, seed=7)
        want = sum(x.to(f64) for x in xs_rs)[rank * shape[0] : (rank + 1) * shape[0]]
        y = tpext.ops.p2p_reduce_scatter(xs_rs[rank], algorithm=algo)
        torch.testing.assert_close(y.to(f64), want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
        return None
    g = tpext.ops.p2p_all_gather(xs[rank], algorithm=algo)
    assert torch.equal(g, torch.cat(xs, 0)), what
    return None


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"tp{w}")
def p2p_results(request):
    """The collective and the fused-norm cases, one round trip each per world size."""
    return {
        "collectives": run_cases(_collective_case, request.param, COLLECTIVE_CASES),
        "fused": run_cases(_fused_case, request.param, FUSED_CASES),
    }


@pytest.mark.parametrize(
    "case",
    COLLECTIVE_CASES,
    ids=[f"{op}-{_shape_id(s)}-{DTYPE_NAMES[d]}-{a.name}" for op, s, d, a in COLLECTIVE_CASES],
)
def test_collectives_match_the_oracle_and_agree_bitwise(p2p_results, case):
    digests = case_result(p2p_results["collectives"], case)
    assert all(d == digests[0] for d in digests), "the P2P paths must give every rank the same bits"


FUSED_CASES = [
    (hidden, with_res, with_bias, dtype, algo)
    for hidden in (13, 64)
    for with_res in (True, False)
    for with_bias in (True, False)
    for dtype in DTYPES
    for algo in (p2p.ALGO_C10D, p2p.ALGO_ONE_SHOT)
]


def _fused_case(hidden: int, with_res: bool, with_bias: bool, dtype: torch.dtype, algo) -> None:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    eps = 1e-6
    xs = _inputs(world, (3, 2, hidden), dtype, seed=hidden)
    g = torch.Generator().manual_seed(hidden + 1)
    res = torch.randn(3, 2, hidden, generator=g, dtype=f64).to(dtype) if with_res else None
    bias = torch.randn(hidden, generator=g, dtype=f64).to(dtype) if with_bias else None
    w = torch.randn(hidden, generator=g, dtype=f64).to(dtype)
    out_ref, h_ref = _rmsnorm_oracle(xs, res, bias, w, eps)
    tol = {f64: 1e-12, f32: 1e-5, bf16: 5e-2}[dtype]
    out, h = tpext.ops.p2p_all_reduce_residual_rmsnorm(xs[rank], res, w, bias, eps, algorithm=algo)
    torch.testing.assert_close(h.to(f64), h_ref, rtol=tol, atol=tol, msg=lambda m: f"h: {m}")
    torch.testing.assert_close(out.to(f64), out_ref, rtol=tol, atol=tol, msg=lambda m: f"out: {m}")
    # out is exactly rms_norm of the stored new residual, as an unfused norm would see it
    acc = f64 if dtype == f64 else f32
    hf = h.to(acc)
    unfused = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps) * w.to(acc)).to(dtype)
    torch.testing.assert_close(out, unfused, rtol=1e-6 if dtype != f64 else 1e-14, atol=0)


@pytest.mark.parametrize(
    "case",
    FUSED_CASES,
    ids=[
        f"hidden{h}{'-residual' if r else ''}{'-bias' if b else ''}-{DTYPE_NAMES[d]}-{a.name}"
        for h, r, b, d, a in FUSED_CASES
    ],
)
def test_fused_all_reduce_residual_rmsnorm_matches_the_oracle(p2p_results, case):
    case_result(p2p_results["fused"], case)


def _fused_autograd_data(world: int):
    hidden = 11
    xs = _inputs(world, (4, hidden), f64, seed=3)
    g = torch.Generator().manual_seed(5)
    res, bias, w = (torch.randn(s, generator=g, dtype=f64) for s in ((4, hidden), (hidden,), (hidden,)))
    dout, dh = torch.randn(4, hidden, generator=g, dtype=f64), torch.randn(4, hidden, generator=g, dtype=f64)
    return xs, res, bias, w, dout, dh


def _fused_autograd_case(kind: str, *args) -> None:
    """("dense", mode): gradients vs autograd through the fp64 formula, with the P2P reference op ("always")
    or the c10d path ("never"); ("gradcheck", residual, bias) and ("gradcheck_rmsnorm_backward",): gradcheck,
    meaningful for a group of one (it perturbs one rank's input at a time)."""
    from tpext.nn.functional import all_reduce_residual_rmsnorm

    rank, world = tdist.get_rank(), tdist.get_world_size()
    eps = 1e-6
    xs, res, bias, w, dout, dh = _fused_autograd_data(world)
    if kind == "dense":
        (mode,) = args
        # Dense oracle: autograd through the fp64 formula of the summed inputs.
        dense = [t.clone().requires_grad_() for t in (sum(xs), res, bias, w)]
        out_ref, h_ref = _rmsnorm_oracle([dense[0]], dense[1], dense[2], dense[3], eps)
        ((out_ref * dout).sum() + (h_ref * dh).sum()).backward()
        with p2p.mode(mode):
            ins = [t.clone().requires_grad_() for t in (xs[rank], res, bias, w)]
            out, h = all_reduce_residual_rmsnorm(ins[0], ins[1], ins[3], eps, bias=ins[2])
            ((out * dout).sum() + (h * dh).sum()).backward()
        for name, mine, ref in zip(("x", "residual", "bias", "weight"), ins, dense):
            torch.testing.assert_close(
                mine.grad, ref.grad, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad_{name}: {m}"
            )
    elif kind == "gradcheck":
        with_res, with_bias = args
        inputs = (
            xs[0].clone().requires_grad_(),
            res.clone().requires_grad_() if with_res else None,
            w.clone().requires_grad_(),
            eps,
        )
        b = bias.clone().requires_grad_() if with_bias else None
        assert torch.autograd.gradcheck(
            lambda x, r, ww, e: all_reduce_residual_rmsnorm(x, r, ww, e, bias=b), inputs
        )
    else:
        hidden = w.shape[0]
        dy, hh = torch.randn(3, hidden, dtype=f64), torch.randn(3, hidden, dtype=f64).requires_grad_()
        ww = w.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda h_, w_: torch.ops.tpext.p2p_rmsnorm_backward(dy, None, h_, w_, eps)[0].sum(-1), (hh, ww)
        )


_DENSE_CASES = [("dense", "always"), ("dense", "never")]
FUSED_AUTOGRAD_CASES = {
    1: [
        *_DENSE_CASES,
        ("gradcheck", True, True),
        ("gradcheck", False, False),
        ("gradcheck_rmsnorm_backward",),
    ],
    2: _DENSE_CASES,
}


fused_autograd_batches = CaseBatches.fixture(_fused_autograd_case, FUSED_AUTOGRAD_CASES)


@pytest.mark.parametrize(("world", "case"), CaseBatches.pairs(FUSED_AUTOGRAD_CASES), ids=CaseBatches.id)
def test_fused_autograd_matches_dense_and_gradcheck(fused_autograd_batches, world, case):
    fused_autograd_batches.result(world, case)


def test_p2p_algorithm_values_match_the_op_schema():
    # csrc/ops/p2p.h: P2PAlgorithm kCollective = 0, kOneShot = 1, kTwoShot = 2; the ALGO_* names alias them.
    assert [(a.name, int(a)) for a in p2p.P2PAlgorithm] == [
        ("COLLECTIVE", 0),
        ("ONE_SHOT", 1),
        ("TWO_SHOT", 2),
    ]
    assert (p2p.ALGO_C10D, p2p.ALGO_ONE_SHOT, p2p.ALGO_TWO_SHOT) == tuple(p2p.P2PAlgorithm)
    assert isinstance(p2p.choose_algorithm(512, world_size=2, p2p_ready=True), p2p.P2PAlgorithm)


def test_policy_picks_p2p_for_small_messages_and_nccl_for_large():
    assert p2p.choose_algorithm(512, world_size=8, p2p_ready=True) == p2p.ALGO_ONE_SHOT
    assert p2p.choose_algorithm(p2p.ONE_SHOT_MAX_BYTES, world_size=2, p2p_ready=True) == p2p.ALGO_ONE_SHOT
    assert p2p.choose_algorithm(p2p.ONE_SHOT_MAX_BYTES + 1, world_size=2, p2p_ready=True) == p2p.ALGO_TWO_SHOT
    assert p2p.choose_algorithm(p2p.P2P_MAX_BYTES, world_size=4, p2p_ready=True) == p2p.ALGO_TWO_SHOT
    assert p2p.choose_algorithm(p2p.P2P_MAX_BYTES + 1, world_size=4, p2p_ready=True) == p2p.ALGO_C10D
    assert p2p.choose_algorithm(512, world_size=4, p2p_ready=False) == p2p.ALGO_C10D
    assert p2p.choose_algorithm(512, world_size=1, p2p_ready=True) == p2p.ALGO_C10D
    with pytest.raises(
        ValueError, match=r"mode must be one of \('auto', 'always', 'never'\), got 'sometimes'"
    ):
        p2p.set_mode("sometimes")


def _check_policy_and_layers() -> None:
    from tpext.nn import RowParallelLinear

    world = tdist.get_world_size()
    pg = tdist.group.WORLD
    x = torch.ones(4, 8)
    assert p2p.algorithm_for(x, pg) is None, "CPU tensors take the layer's own path in auto mode"
    with p2p.mode("always"):  # a group of one never communicates, P2P or not
        assert p2p.algorithm_for(x, pg) == (p2p.ALGO_ONE_SHOT if world > 1 else None)
        assert p2p.algorithm_for(x, pg, nbytes=10 * p2p.P2P_MAX_BYTES) == (
            p2p.ALGO_TWO_SHOT if world > 1 else None
        )
    with p2p.mode("never"):
        assert p2p.algorithm_for(x, pg) is None
    # The row-parallel layer through the P2P op: same values and gradients as the dense layer.
    torch.manual_seed(0)
    dense = torch.nn.Linear(10, 6, dtype=f64)
    xin = torch.randn(3, 10, dtype=f64, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(3, 6, dtype=f64, generator=torch.Generator().manual_seed(2))
    xd = xin.clone().requires_grad_()
    (dense(xd) * dy).sum().backward()
    layer = RowParallelLinear.from_dense(dense, input_is_parallel=False)
    xl = xin.clone().requires_grad_()
    with p2p.mode("always"), tpext.comm_stats() as s:
        y = layer(xl)
        (y * dy).sum().backward()
    torch.testing.assert_close(y, dense(xin), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xl.grad, xd.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-12, atol=1e-12)
    if world > 1:
        assert s.by_kind("forward") == {"all_reduce": 1}, s.table()


@pytest.mark.parametrize("world", [1, 2])
def test_policy_and_row_parallel_layer_on_the_p2p_path(world):
    run_ranks(_check_policy_and_layers, world)


class _Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _fallback_reason() -> str:
    """What this machine lacks for P2P: the CUDA kernels (a CPU build), or a GPU (a CUDA build)."""
    return "no CUDA device is visible" if tpext.cuda_compiled else "tpext was built without CUDA"


def _check_fallback_logs_once() -> list[str]:
    p2p._reset_log()
    handler = _Count()
    logging.getLogger("tpext.p2p").addHandler(handler)
    try:
        assert p2p.enable() is False, "P2P cannot be enabled without a CUDA build and a GPU"
        assert p2p.enable() is False
        reason = p2p.status()
        assert _fallback_reason() in reason, reason
        # The ops' own note (TORCH_WARN from C++) goes to the process's stderr: capture fd 2.
        with tempfile.TemporaryFile() as f:
            saved = os.dup(2)
            os.dup2(f.fileno(), 2)
            try:
                for _ in range(3):
                    tpext.ops.p2p_all_reduce(torch.ones(5), algorithm=p2p.ALGO_ONE_SHOT)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            f.seek(0)
            said = [line for line in f.read().decode().splitlines() if "P2P kernels not used" in line]
        assert len(said) == 1 and "on the CPU" in said[0], said
        p2p.release()
    finally:
        logging.getLogger("tpext.p2p").removeHandler(handler)
    return handler.messages


def test_enable_without_p2p_falls_back_and_logs_the_reason_once():
    if tpext.cuda_compiled and torch.cuda.is_available():
        pytest.skip("this machine can use P2P; the fallback is tested where it cannot")
    messages = run_ranks(_check_fallback_logs_once, 2)
    for m in messages:
        assert len(m) == 1 and _fallback_reason() in m[0], m


OPCHECK_OPS = ("all_reduce", "reduce_scatter", "all_gather", "rmsnorm", "rmsnorm_no_residual_bias")
OPCHECK_CASES = [(algo, op) for algo in (0, 1) for op in OPCHECK_OPS]


def _opcheck_case(algo: int, op: str) -> None:
    name = tpext.group_name()
    world = tdist.get_world_size()
    x = torch.randn(2 * world, 5, dtype=f64)
    w, b = torch.randn(5, dtype=f64), torch.randn(5, dtype=f64)
    ops = torch.ops.tpext
    calls = {
        "all_reduce": (ops.p2p_all_reduce.default, (x, name, algo)),
        "reduce_scatter": (ops.p2p_reduce_scatter.default, (x, name, algo)),
        "all_gather": (ops.p2p_all_gather.default, (x, name, algo)),
        "rmsnorm": (ops.p2p_all_reduce_residual_rmsnorm.default, (x, x, b, w, 1e-6, name, algo)),
        "rmsnorm_no_residual_bias": (
            ops.p2p_all_reduce_residual_rmsnorm.default,
            (x, None, None, w, 1e-6, name, algo),
        ),
    }
    torch.library.opcheck(*calls[op])


@pytest.fixture(scope="module")
def opcheck_results():
    return run_cases(_opcheck_case, 2, OPCHECK_CASES)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[f"algo{a}-{op}" for a, op in OPCHECK_CASES])
def test_opcheck_group_ops(opcheck_results, case):
    case_result(opcheck_results, case)


def test_opcheck_local_and_virtual_ops():
    xs = [torch.randn(4, 6, dtype=f64) for _ in range(2)]
    w = torch.randn(6, dtype=f64)
    ops, testing = torch.ops.tpext, torch.ops.tpext_testing
    torch.library.opcheck(ops.p2p_rmsnorm_backward.default, (xs[0], xs[1], xs[0] + 2, w, 1e-6))
    torch.library.opcheck(ops.p2p_rmsnorm_backward.default, (xs[0], None, xs[1], w, 1e-6))
    torch.library.opcheck(testing.p2p_virtual_all_reduce.default, (xs, 2))
    torch.library.opcheck(testing.p2p_virtual_reduce_scatter.default, (xs,))
    torch.library.opcheck(testing.p2p_virtual_all_gather.default, (xs,))
    torch.library.opcheck(testing.p2p_virtual_all_reduce_residual_rmsnorm.default, (xs, xs[0], w, w, 1e-6))


@pytest.mark.parametrize("dtype", [f64, bf16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("world", [2, 3, 8], ids=lambda w: f"tp{w}")
def test_virtual_ops_host_reference(world, shape, dtype):
    xs = _inputs(world, (world * shape[0], *shape[1:]), dtype, seed=world)
    for algo in (p2p.P2PAlgorithm.ONE_SHOT, p2p.P2PAlgorithm.TWO_SHOT):
        outs = torch.ops.tpext_testing.p2p_virtual_all_reduce(xs, algo)
        assert all(torch.equal(o, _ordered_f32_sum(xs)) for o in outs), algo.name
    m = shape[0]
    for r, o in enumerate(torch.ops.tpext_testing.p2p_virtual_reduce_scatter(xs)):
        assert torch.equal(o, _ordered_f32_sum(xs)[r * m : (r + 1) * m])
    assert all(torch.equal(o, torch.cat(xs)) for o in torch.ops.tpext_testing.p2p_virtual_all_gather(xs))


@pytest.mark.parametrize("world", [2, 3, 8], ids=lambda w: f"tp{w}")
def test_virtual_fused_rmsnorm_host_reference(world):
    xs = _inputs(world, (5, 19), f64, seed=1)
    res, w = torch.randn(5, 19, dtype=f64), torch.randn(19, dtype=f64)
    outs, hs = torch.ops.tpext_testing.p2p_virtual_all_reduce_residual_rmsnorm(xs, res, None, w, 1e-5)
    out_ref, h_ref = _rmsnorm_oracle(xs, res, None, w, 1e-5)
    for o, h in zip(outs, hs):
        torch.testing.assert_close(o, out_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def _error_calls() -> dict[str, tuple]:
    """{case: (call, the message's pattern)} on this rank (the calls need the group's name)."""
    name = tpext.group_name()
    ops = torch.ops.tpext
    x, w = torch.ones(4, 6), torch.ones(6)
    return {
        "int_dtype": (
            lambda: ops.p2p_all_reduce(torch.ones(4, dtype=torch.int32), name, 1),
            r"p2p_all_reduce: x must be float32, float16, bfloat16 or float64, got dtype Int",
        ),
        "algorithm_3": (
            lambda: ops.p2p_all_reduce(x, name, 3),
            r"algorithm must be 0 \(c10d collective\), 1 \(one-shot P2P\) or 2",
        ),
        "reduce_scatter_rows": (
            lambda: ops.p2p_reduce_scatter(torch.ones(3, 2), name, 1),
            r"x must be \[R \* m, \*\] with dim 0 divisible by the group size R = 2, got shape \[3, 2\]",
        ),
        "weight_shape": (
            lambda: ops.p2p_all_reduce_residual_rmsnorm(x, None, None, torch.ones(5), 1e-6, name, 1),
            r"weight must be 1-D \[hidden\] = \[6\] to match x \[4, 6\], got shape \[5\]",
        ),
        "residual_shape": (
            lambda: ops.p2p_all_reduce_residual_rmsnorm(x, torch.ones(4, 5), None, w, 1e-6, name, 1),
            r"residual must have the shape of x \[4, 6\], got shape \[4, 5\]",
        ),
        "bias_dtype": (
            lambda: ops.p2p_all_reduce_residual_rmsnorm(x, None, torch.ones(6, dtype=f64), w, 1e-6, name, 1),
            r"bias dtype Double must match x dtype Float",
        ),
        "negative_eps": (
            lambda: ops.p2p_all_reduce_residual_rmsnorm(x, None, None, w, -1.0, name, 1),
            r"eps must be >= 0, got -1",
        ),
        "grad_out_shape": (
            lambda: ops.p2p_rmsnorm_backward(torch.ones(4, 5), None, x, w, 1e-6),
            r"grad_out must match h \(\[4, 6\]",
        ),
        "virtual_shapes_differ": (
            lambda: torch.ops.tpext_testing.p2p_virtual_all_reduce([x, torch.ones(4, 7)], 1),
            r"every virtual rank's input must match xs\[0\] \(\[4, 6\], Float, cpu\), got xs\[1\] \[4, 7\]",
        ),
        "virtual_too_many": (
            lambda: torch.ops.tpext_testing.p2p_virtual_all_reduce([x] * 9, 1),
            r"xs must hold 1 to 8 tensors .* got 9",
        ),
        "unknown_group": (
            lambda: ops.p2p_all_reduce(x, "no-such-group", 1),
            r"group_name 'no-such-group' does not name a registered",
        ),
    }


ERROR_CASES = [
    "int_dtype",
    "algorithm_3",
    "reduce_scatter_rows",
    "weight_shape",
    "residual_shape",
    "bias_dtype",
    "negative_eps",
    "grad_out_shape",
    "virtual_shapes_differ",
    "virtual_too_many",
    "unknown_group",
    "group_still_usable",  # last: after every error above, nobody was left waiting in a collective
]


def _error_case(case: str) -> None:
    if case == "group_still_usable":
        x = torch.ones(4, 6)
        assert torch.equal(torch.ops.tpext.p2p_all_reduce(x, tpext.group_name(), 1), x * 2)
        return
    fn, pattern = _error_calls()[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


@pytest.fixture(scope="module")
def error_results():
    return run_cases(_error_case, 2, [(c,) for c in ERROR_CASES])


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_messages_name_the_argument(error_results, case):
    case_result(error_results, (case,))


def _info(max_blocks: int, timeout_s: float) -> tuple:
    """One rank's entry of enable's exchange:
    (host, reason, handle, capacity, uuid, max_blocks, timeout_s)."""
    return ("node0", "", b"h", 1 << 20, f"GPU-{max_blocks}-{timeout_s}", max_blocks, timeout_s)


def test_enable_agrees_grid_cap_and_timeout_over_ranks():
    # The grid cap is the fewest co-resident blocks of any rank (all blocks of a launch resident on every
    # GPU, the same grid everywhere); the budget is the longest any rank asked for.
    infos = [_info(64, 60.0), _info(32, 5.0), _info(48, 90.5)]
    assert p2p._agreed_launch(infos) == (32, 90_500_000_000)
    assert p2p._agreed_launch([_info(64, 1e-3)]) == (64, 1_000_000)
    # A rank whose GPU holds no block of the kernels makes P2P unavailable on every rank.
    assert "occupancy 0" in p2p._group_obstacle([_info(64, 60.0), _info(0, 60.0)])


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_enable_refuses_a_non_positive_timeout_before_any_exchange(bad):
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        p2p.enable(None, timeout_s=bad)  # raises before resolving the group: no process group needed


def _check_check_and_drain() -> None:
    # Without usable buffers there is nothing aborted: check() is silent, and the safe points (release,
    # enable's drain) have nothing to destroy.
    p2p.check()
    assert tpext._C.p2p_drain() == 0
    assert p2p.enable() is False
    p2p.check()
    p2p.release()


def test_check_and_drain_without_buffers():
    run_ranks(_check_check_and_drain, 2)


def test_nccl_teardown_functions_are_safe_without_communicators():
    tpext.ops.destroy_nccl_communicators()
    tpext.ops.abort_nccl_communicators()
