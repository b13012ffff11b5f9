"""The rank side of `tpext bench`: tpext's parallel linear layers and MLP vs PyTorch's own tensor
parallelism (DTensor `parallelize_module`) vs tpext sequential (chunks=1), checked, then timed.

Layers (tokens T, hidden h, ffn = mult * h, R ranks; activations 2-D and sequence-first):
    column      h -> ffn   x replicated [T, h]          -> y [T, ffn/R]
    row         ffn -> h   x [T, ffn/R]                 -> y [T, h] replicated (all-reduce)
    column_sp   h -> ffn   x sequence shard [T/R, h]    -> y [T, ffn/R] (all-gather)
    row_sp      ffn -> h   x [T, ffn/R]                 -> y sequence shard [T/R, h] (reduce-scatter)
    mlp         column -> GELU -> row,          replicated in and out
    mlp_sp      column_sp -> GELU -> row_sp,    sequence shards in and out
PyTorch's equivalents: ColwiseParallel / RowwiseParallel, with input_layouts=Shard(0) /
output_layouts=Shard(0) for the sequence-parallel variants (what SequenceParallel regions hand them).
"""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tpext.commands.benchmark import probe_allreduce, probe_matmul_tflops, slowest_times
from tpext.mappings import _all_gather_single, _reduce_scatter_single

__all__ = [
    "LAYERS",
    "IMPLS",
    "MODES",
    "Spec",
    "worker",
    "check_close",
    "check_layer",
    "dense_layer",
    "layer_flops",
    "tpext_layer",
    "torch_tp_layer",
]

LAYERS = ("column", "row", "column_sp", "row_sp", "mlp", "mlp_sp")
IMPLS = ("tpext", "tpext_seq", "torch_tp")
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class Spec:
    """One layer at one size: which linears (in order), SP or not, and how its tensors are laid out."""

    layer: str
    tokens: int
    hidden: int
    ffn: int

    @property
    def sp(self) -> bool:
        return self.layer.endswith("_sp")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("column", "row") if self.layer.startswith("mlp") else (self.layer.split("_")[0],)

    @property
    def in_features(self) -> int:
        return self.ffn if self.kinds == ("row",) else self.hidden

    @property
    def out_features(self) -> int:
        return self.ffn if self.kinds == ("column",) else self.hidden

    @property
    def x_layout(self) -> str:  # "rep": replicated, "seq": dim-0 shard, "feat": last-dim shard
        return "feat" if self.kinds == ("row",) else ("seq" if self.sp else "rep")

    @property
    def y_layout(self) -> str:
        return "feat" if self.kinds == ("column",) else ("seq" if self.sp else "rep")

    def param_shard_dims(self) -> dict[str, int | None]:
        """Parameter name -> the dim sharded over the ranks (None: replicated), same names in all three."""
        dims = {"column": {"weight": 0, "bias": 0}, "row": {"weight": 1, "bias": None}}
        if len(self.kinds) == 1:
            return dims[self.kinds[0]]
        return {f"{i}.{p}": d for i, kind in zip((0, 2), self.kinds) for p, d in dims[kind].items()}


def layer_flops(spec: Spec, mode: str) -> float:
    """FLOPs of the whole (unsharded) layer: 2 T K N per linear forward, 3x that with the backward."""
    return 2 * spec.tokens * spec.hidden * spec.ffn * len(spec.kinds) * (3 if mode == "fwd_bwd" else 1)


# ---- the three implementations, built from one dense layer ------------------------------------------


def dense_layer(spec: Spec, seed: int) -> nn.Module:
    """The unsharded layer of `spec`, seeded: what every implementation is built from and checked against.

    Args:
        spec: the layer and its sizes.
        seed: seeds torch's global generator before the weights are drawn (the same on every rank).

    Returns:
        ``nn.Linear(in_features, out_features)`` for a single linear, or ``nn.Sequential(Linear, GELU,
        Linear)`` (hidden -> ffn -> hidden) for ``mlp`` / ``mlp_sp``; fp32 on the CPU.

    Example:
        >>> dense = dense_layer(Spec("mlp_sp", tokens=8, hidden=4, ffn=12), seed=0)
    """
    torch.manual_seed(seed)  # the same on every rank: every implementation shards these weights
    if spec.kinds == ("column", "row"):
        return nn.Sequential(nn.Linear(spec.hidden, spec.ffn), nn.GELU(), nn.Linear(spec.ffn, spec.hidden))
    return nn.Linear(spec.in_features, spec.out_features)


def tpext_layer(dense: nn.Module, spec: Spec, chunks: int | str) -> nn.Module:
    """tpext's layers sharded from `dense`: this rank's ColumnParallelLinear / RowParallelLinear (GELU
    between them for an MLP), sequence-parallel for the ``*_sp`` layers.

    Args:
        dense: the layer from `dense_layer` (the same on every rank).
        spec: the layer it is.
        chunks: the layers' ``chunks`` (an int, or ``"auto"``); 1 is tpext's sequential schedule.

    Returns:
        The sharded module, on `dense`'s device and dtype.

    Raises:
        RuntimeError: without an initialized default process group.

    Example:
        >>> layer = tpext_layer(dense, spec, "auto")  # on every rank of the group
    """
    from tpext.nn import ColumnParallelLinear, RowParallelLinear

    cls = {"column": ColumnParallelLinear, "row": RowParallelLinear}
    if isinstance(dense, nn.Sequential):
        kw = {"sequence_parallel": spec.sp, "chunks": chunks}
        return nn.Sequential(
            cls["column"].from_dense(dense[0], **kw), nn.GELU(), cls["row"].from_dense(dense[2], **kw)
        )
    return cls[spec.kinds[0]].from_dense(dense, sequence_parallel=spec.sp, chunks=chunks)


def torch_tp_layer(dense: nn.Module, spec: Spec, mesh) -> nn.Module:
    """PyTorch's tensor parallelism of a copy of `dense`: `parallelize_module` with ColwiseParallel /
    RowwiseParallel (``input_layouts=Shard(0)`` / ``output_layouts=Shard(0)`` for the ``*_sp`` layers).

    Args:
        dense: the layer from `dense_layer` (left unchanged).
        spec: the layer it is.
        mesh: the 1-D DeviceMesh of the tensor-parallel group.

    Returns:
        The parallelized copy (DTensor parameters).

    Example:
        >>> layer = torch_tp_layer(dense, spec, init_device_mesh("cpu", (2,)))
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    style = {
        "column": ColwiseParallel(input_layouts=Shard(0)) if spec.sp else ColwiseParallel(),
        "row": RowwiseParallel(output_layouts=Shard(0)) if spec.sp else RowwiseParallel(),
    }
    plan = style[spec.kinds[0]] if len(spec.kinds) == 1 else {"0": style["column"], "2": style["row"]}
    return parallelize_module(copy.deepcopy(dense), mesh, plan)


def _local(t: Tensor | None) -> Tensor | None:
    """The finished local tensor: DTensor -> its shard; a pending functional collective -> waited for.

    PyTorch's TP returns outputs (and gradients) whose collective may still be in flight; timing must
    include it, and a comparison must see its result.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    if isinstance(t, AsyncCollectiveTensor):
        t = t.wait()
    return t


def _shard(t: Tensor, dim: int | None, rank: int, world: int) -> Tensor:
    return t if dim is None else t.chunk(world, dim)[rank]


_LAYOUT_DIM = {"rep": None, "seq": 0, "feat": -1}


# ---- correctness ----------------------------------------------------------------------------------


def check_close(got: Tensor, ref64: Tensor, dense_err: float) -> tuple[float, float]:
    """(error, tolerance) of `got` against the fp64 reference: max |got - ref|, and twice the dense
    layer's own error in the same dtype plus two ulps of the largest reference value (a dense layer
    that happens to be exact must not make an equally rounded result fail)."""
    if got.shape != ref64.shape:
        raise ValueError(
            f"tpext bench: result shape {tuple(got.shape)} != reference shape {tuple(ref64.shape)}"
        )
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    ulp = torch.finfo(got.dtype).eps * (ref64.abs().max().item() if ref64.numel() else 0.0)
    return err, 2 * dense_err + 2 * ulp


def _run_once(model: nn.Module, x: Tensor, dy: Tensor, names: list[str]) -> dict[str, Tensor]:
    with torch.no_grad():
        out = {"y (no_grad)": _local(model(x)).detach()}
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    params = dict(model.named_parameters())
    out.update({"y": _local(y).detach(), "grad x": _local(x.grad)})
    out.update({f"grad {n}": _local(params[n].grad) for n in names})
    return out


def check_layer(
    spec: Spec, dense: nn.Module, impls: dict[str, nn.Module], x: Tensor, dy: Tensor, rank: int, world: int
) -> tuple[dict[str, float], list[str]]:
    """The bench's correctness gate: every implementation's output (with and without grad), input gradient
    and parameter gradients on this rank, against the fp64 dense layer's shard, within `check_close`'s
    tolerance (twice the dense layer's own error in the same dtype).

    Args:
        spec: the layer.
        dense: the layer from `dense_layer` the implementations were built from.
        impls: {name: this rank's sharded module} (from `tpext_layer`, `torch_tp_layer`).
        x: the full input [tokens, in_features], the same on every rank.
        dy: the full output gradient [tokens, out_features], the same on every rank.
        rank: this rank.
        world: the group size.

    Returns:
        ({name: worst error / tolerance over its tensors on this rank}, [one message per tensor over its
        tolerance, naming the implementation, the layer, the rank and the tensor]).

    Example:
        >>> ratios, failures = check_layer(spec, dense, {"tpext": layer}, x, dy, rank, world)
        >>> assert not failures and ratios["tpext"] <= 1
    """
    dims = spec.param_shard_dims()
    ref = _run_once(copy.deepcopy(dense).double(), x.double(), dy.double(), list(dims))
    dense_out = _run_once(dense, x, dy, list(dims))
    sharding = {
        "y (no_grad)": _LAYOUT_DIM[spec.y_layout],
        "y": _LAYOUT_DIM[spec.y_layout],
        "grad x": _LAYOUT_DIM[spec.x_layout],
        **{f"grad {n}": d for n, d in dims.items()},
    }
    x_loc = _shard(x, sharding["grad x"], rank, world)
    dy_loc = _shard(dy, sharding["y"], rank, world)
    ratios, failures = {}, []
    for name, model in impls.items():
        got = _run_once(model, x_loc, dy_loc, list(dims))
        worst = 0.0
        for what, dim in sharding.items():
            dense_err = (dense_out[what].double() - ref[what]).abs().max().item()
            err, tol = check_close(got[what], _shard(ref[what], dim, rank, world), dense_err)
            worst = max(worst, err / tol if tol > 0 else (0.0 if err == 0 else float("inf")))
            if err > tol:
                failures.append(
                    f"{name} on {spec.layer} T={spec.tokens} h={spec.hidden} tp={world}, rank {rank}: {what} "
                    f"differs from the dense layer: max error {err:.3g} > tolerance {tol:.3g} (2x the dense "
                    f"layer's own error {dense_err:.3g} + 2 ulps)"
                )
        ratios[name] = worst
    return ratios, failures


# ---- timing ---------------------------------------------------------------------------------------


def _step(model: nn.Module, x: Tensor, dy: Tensor, mode: str):
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                _local(model(x))

        return fwd
    x = x.detach().clone().requires_grad_()
    params = list(model.parameters())

    def fwd_bwd():
        x.grad = None
        for p in params:
            p.grad = None
        y = model(x)
        _local(y)  # PyTorch's TP: the forward collective completes even though backward never reads y
        y.backward(dy)
        _local(x.grad)
        for p in params:
            _local(p.grad)

    return fwd_bwd


def _napkin_parts(spec: Spec, mode: str, dtype, device) -> dict[str, Callable[[], object]]:
    """{"gemm": this rank's GEMMs of the layer alone, "comm": its collectives alone (when it has any)}.

    Every GEMM is [M, K] x [K, N] with the local shapes (forward; with the backward also dgrad and
    wgrad); every collective moves the full [T, h] activation (all-reduce, or all-gather +
    reduce-scatter under SP). No schedule finishes before max(T_gemm, T_comm); the GELU is left out.
    """
    world, t, h = dist.get_world_size(), spec.tokens, spec.hidden
    new = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    gemms, comms = [], []
    for kind in spec.kinds:
        k, n = (h, spec.ffn // world) if kind == "column" else (spec.ffn // world, h)
        x, w, dy = new(t, k), new(n, k), new(t, n)
        y, dx, dw = torch.empty_like(dy), torch.empty_like(x), torch.empty_like(w)
        gemms.append(lambda x=x, w=w, y=y: torch.mm(x, w.t(), out=y))
        if mode == "fwd_bwd":
            gemms.append(lambda dy=dy, w=w, dx=dx: torch.mm(dy, w, out=dx))
            gemms.append(lambda dy=dy, x=x, dw=dw: torch.mm(dy.t(), x, out=dw))
        full, part = new(t, h), new(t // world, h)
        gather = lambda full=full, part=part: _all_gather_single(full, part)  # noqa: E731
        scatter = lambda full=full, part=part: _reduce_scatter_single(part, full)  # noqa: E731
        reduce = lambda full=full: dist.all_reduce(full)  # noqa: E731
        if spec.sp:
            fwd, bwd = (gather, scatter) if kind == "column" else (scatter, gather)
        else:
            fwd, bwd = (None, reduce) if kind == "column" else (reduce, None)
        comms += [c for c in (fwd, bwd if mode == "fwd_bwd" else None) if c is not None]
    parts = {"gemm": lambda: [g() for g in gemms]}
    if comms and world > 1:
        parts["comm"] = lambda: [c() for c in comms]
    return parts


def _quartiles(times: list[float]) -> tuple[float, float]:
    """First and third quartile: the spread of the repeats, to tell a difference from the noise."""
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=4)
    return q[0], q[2]


# ---- the worker -----------------------------------------------------------------------------------


def _case(spec: Spec, cfg: dict, mesh, device, dtype, rank: int, world: int) -> tuple[list[dict], list[str]]:
    from tpext.ops.schedule import resolve_chunks

    dense = dense_layer(spec, cfg["seed"]).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.randn(spec.tokens, spec.in_features, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(spec.tokens, spec.out_features, generator=g).to(device=device, dtype=dtype)
    impls = {
        "tpext": tpext_layer(dense, spec, cfg["chunks"]),
        "tpext_seq": tpext_layer(dense, spec, 1),
        "torch_tp": torch_tp_layer(dense, spec, mesh),
    }
    ratios, failures = check_layer(spec, dense, impls, x, dy, rank, world)
    failed = torch.tensor([float(bool(failures))], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # every rank stops together, so none waits on a peer
    if failed.item():
        return [], failures or [f"rank {rank}: a peer's correctness check failed (see its message)"]
    x_loc = _shard(x, _LAYOUT_DIM[spec.x_layout], rank, world)
    dy_loc = _shard(dy, _LAYOUT_DIM[spec.y_layout], rank, world)
    chunks = resolve_chunks(cfg["chunks"], spec.tokens, world) if world > 1 else 1  # rows of every GEMM
    rows = []
    for mode in MODES:
        # The implementations and the napkin parts take turns in every iteration: same machine state.
        fns = {name: _step(m, x_loc, dy_loc, mode) for name, m in impls.items()}
        times = slowest_times(
            {**fns, **_napkin_parts(spec, mode, dtype, device)}, cfg["reps"], cfg["warmup"], device
        )
        ms = {name: 1e3 * statistics.median(times[name]) for name in fns}
        quartiles = {name: [1e3 * q for q in _quartiles(times[name])] for name in fns}
        t_gemm = statistics.median(times["gemm"])
        t_comm = statistics.median(times["comm"]) if "comm" in times else 0.0
        flops = layer_flops(spec, mode)
        rows.append(
            {
                "layer": spec.layer,
                "tokens": spec.tokens,
                "hidden": spec.hidden,
                "ffn": spec.ffn,
                "tp": world,
                "mode": mode,
                "dtype": str(dtype).removeprefix("torch."),
                "chunks": chunks,
                "gflop": flops / 1e9,
                "ms": ms,
                "ms_quartiles": quartiles,
                "gflops": {k: flops / v / 1e6 for k, v in ms.items()},
                "speedup_vs_torch_tp": ms["torch_tp"] / ms["tpext"],
                "speedup_vs_seq": ms["tpext_seq"] / ms["tpext"],
                "t_gemm_ms": 1e3 * t_gemm,
                "t_comm_ms": 1e3 * t_comm,
                "napkin_ms": 1e3 * max(t_gemm, t_comm),
                "correct": {k: True for k in impls},
                "max_error_ratio": ratios,
            }
        )
    return rows, []


def worker(cfg: dict) -> dict:
    """One rank of one tp degree: every (size, layer) case, then the calibration probes.

    Returns {"rows", "probes", "environment", "failures"}; rows/probes/environment from rank 0 only.
    """
    from tpext.commands.launch import init_worker

    init_worker(cfg["backend"])
    try:
        return _work(cfg)
    finally:
        dist.destroy_process_group()


def _work(cfg: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from tqdm import tqdm

    from tpext.commands.benchmark import environment

    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cfg["backend"] == "nccl"
        else torch.device("cpu")
    )
    dtype = getattr(torch, cfg["dtype"])
    mesh = init_device_mesh(device.type, (world,))
    cases = [Spec(layer, t, h, h * cfg["ffn_mult"]) for t, h in cfg["sizes"] for layer in cfg["layers"]]
    rows, failures = [], []
    show = rank == 0 and cfg["progress"]
    with tqdm(
        total=len(cases) + 1, desc=f"tpext bench tp={world}", disable=not show, unit="case", leave=False
    ) as bar:
        for spec in cases:
            bar.set_postfix_str(f"{spec.layer} {spec.tokens}x{spec.hidden}")
            case_rows, failures = _case(spec, cfg, mesh, device, dtype, rank, world)
            if failures:
                return {"rows": [], "probes": None, "environment": None, "failures": failures}
            rows += case_rows
            bar.update()
        bar.set_postfix_str("calibration probes")
        n, reps, warmup = cfg["probe"]["gemm_n"], cfg["reps"], cfg["warmup"]
        # bf16 is measured where it is a layer dtype (GPUs); CPU layers here run in fp32.
        dtypes = ("float32", "bfloat16") if device.type == "cuda" else ("float32",)
        probes = {
            "gemm_n": n,
            "allreduce": probe_allreduce(cfg["probe"]["allreduce_bytes"], device, reps, warmup),
            "matmul_tflops": {
                d: probe_matmul_tflops(n, getattr(torch, d), device, reps, warmup) if d in dtypes else None
                for d in ("float32", "bfloat16")
            },
        }
        bar.update()
    env = environment(device, cfg["backend"]) if rank == 0 else None
    if env is not None:
        env["local_ranks"] = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {
        "rows": rows if rank == 0 else [],
        "probes": probes if rank == 0 else None,
        "environment": env,
        "failures": [],
    }
