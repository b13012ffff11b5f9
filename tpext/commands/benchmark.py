"""What every tpext benchmark shares: timing across ranks, the device's name, the environment, and the
calibration probes (dense GEMM rate, all-reduce bandwidth and latency) that the planner's cost model reads.

Timing rule: a barrier before each iteration, the wall time of the slowest rank for that iteration (a
collective finishes when its last rank does), the median over repeats after a warm-up. On CUDA the
device is synchronized before each clock read, so the time covers the kernels and not their launch.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = [
    "slowest_times",
    "median_slowest",
    "gemm_calls",
    "device_name",
    "commit",
    "environment",
    "load_average",
    "memory_gib",
    "probe_matmul_tflops",
    "probe_allreduce",
    "CALIBRATION_FORMAT",
]

CALIBRATION_FORMAT = "tpext-calibration/1"


CPU = torch.device("cpu")  # the default device of the timers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest_times(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3, device: torch.device = CPU
) -> dict[str, list[float]]:
    """Per timed iteration and per function, the slowest rank's wall time in seconds (`reps` values each).

    The functions take turns within each iteration, so a change of machine load during the measurement
    hits all of them alike. `device` is where the ranks compute: CUDA is synchronized around each call,
    and the per-iteration max is reduced with a tensor on it (NCCL only reduces device tensors).
    """
    if reps < 1:
        raise ValueError(f"tpext.commands.benchmark: reps must be >= 1, got {reps}")
    names = list(fns)
    elapsed = torch.zeros(len(names), dtype=torch.float64, device=device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + reps):
        for j, name in enumerate(names):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            elapsed[j] = time.perf_counter() - t0
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            for name, t in zip(names, elapsed.tolist()):
                times[name].append(t)
    return times


def median_slowest(fn: Callable[[], object], reps: int, warmup: int = 3, device: torch.device = CPU) -> float:
    """Median over `reps` of the slowest rank's wall time for fn(), in seconds."""
    return statistics.median(slowest_times({"fn": fn}, reps, warmup, device)["fn"])


# The ATen GEMM entry points a tpext schedule (or an epilogue) can reach: each call is one GEMM launch on
# CUDA (cuBLAS gemm or strided-batched gemm), whatever its batch size.
GEMM_OPS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"})


def gemm_calls(fn: Callable[[], object]) -> int:
    """GEMM calls fn() makes on this thread: ATen GEMM ops (GEMM_OPS) not nested inside another one.

    Counted with torch.profiler on the CPU, so it sees the calls the C++ schedules make through the
    dispatcher; a GEMM op that ATen splits internally (a CPU bmm into per-batch BLAS calls) counts once.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def inside_gemm(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in GEMM_OPS:
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name in GEMM_OPS and not inside_gemm(e))


def _slug(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def device_name(device_type: str = "cpu") -> str:
    """Directory name for results measured on this machine's `device_type` ("cpu" or "cuda").

    CPU: "cpu-" + the model name from /proc/cpuinfo + the core count (e.g. cpu-amd-epyc-2cores);
    CUDA: the GPU's name (e.g. nvidia-h100-80gb-hbm3).
    """
    if device_type == "cuda":
        return _slug(torch.cuda.get_device_name())
    return f"cpu-{_slug(_cpu_model())}-{os.cpu_count()}cores"


def commit() -> str:
    """`git rev-parse HEAD` of the checkout tpext is imported from ("unknown" outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=here, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def memory_gib(device: torch.device) -> float:
    """Memory of one device (CUDA) or of the host (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return kib / 2**20
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def environment(device: torch.device, backend: str) -> dict:
    """What a result depends on besides its configuration."""
    env = {
        "torch": torch.__version__,
        "backend": backend,
        "device": str(device.type),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "threads_per_rank": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "memory_GiB": round(memory_gib(device), 2),
        "commit": commit(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        version = torch.cuda.nccl.version()  # a tuple in recent releases, an int in older ones
        env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return env


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages of the host: how busy the machine was around a measurement."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


# ---- calibration probes ---------------------------------------------------------------------------
# Run on every rank at once, as the layers run: on CPU the ranks share the machine's cores and memory
# bandwidth, so a GEMM timed alone on an idle machine would overstate what a rank gets.


def probe_matmul_tflops(
    n: int, dtype: torch.dtype, device: torch.device, reps: int, warmup: int = 2
) -> float:
    """Achieved dense GEMM rate of one rank, [n, n] @ [n, n], TFLOP/s (median of the slowest rank)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = median_slowest(lambda: torch.mm(a, b, out=out), reps, warmup, device)
    return 2 * n**3 / t / 1e12


def probe_allreduce(
    sizes_bytes: list[int], device: torch.device, reps: int, warmup: int = 2, tiny_reps: int | None = None
) -> dict:
    """All-reduce sweep over fp32 buffers: time and bus bandwidth per size, plus a 4-byte latency.

    Bus bandwidth is NCCL-tests' convention: 2 (n - 1) / n * bytes / time, the per-link rate a ring
    all-reduce needs, comparable across group sizes.
    """
    world = dist.get_world_size()
    sweep = []
    for nbytes in sizes_bytes:
        buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        t = median_slowest(lambda buf=buf: dist.all_reduce(buf), reps, warmup, device)
        bus = 2 * (world - 1) / world * buf.numel() * 4 / t / 1e9
        sweep.append({"bytes": buf.numel() * 4, "time_us": 1e6 * t, "bus_GBps": bus})
    tiny = torch.ones(1, dtype=torch.float32, device=device)
    latency = median_slowest(lambda: dist.all_reduce(tiny), tiny_reps or 4 * reps, warmup, device)
    return {
        "sweep": sweep,
        "latency_us": 1e6 * latency,
        "bus_GBps": max(s["bus_GBps"] for s in sweep) if world > 1 else None,
    }
