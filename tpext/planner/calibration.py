"""Calibration files: measured figures of one device, written by the benchmarks, read by `tpext plan`.

Format "tpext-calibration/1" (a JSON object; extra keys are allowed and ignored):

    format                 "tpext-calibration/1"
    device                 name of the measured device, e.g. "cpu-amd-epyc-2cores"
    source                 the command that measured it
    matmul_tflops          {dtype: achieved dense GEMM TFLOP/s or null when not measured}
    allreduce_bus_GBps     achieved all-reduce bus bandwidth (nccl-tests definition) or null
    collective_latency_us  fixed cost of one collective, microseconds, or null
    memory_GiB             device memory, GiB, or null
    gpus_per_node          devices that share the measured link (a TP group up to this size uses it)

Every key must be present; a measured value may be null (not measured), and the planner then falls back
to the preset's figure for it. A `tpext bench` report (layers.json, "tpext-bench-layers/1") is accepted
too: its probes of the largest group measured are read as this format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from tpext.planner.presets import DTYPE_BYTES, GPUSpec, require_object

__all__ = [
    "FORMAT",
    "REQUIRED",
    "BENCH_FORMAT",
    "Calibration",
    "load_calibration",
    "write_calibration",
    "apply_calibration",
    "from_bench_report",
]

FORMAT = "tpext-calibration/1"
#: The keys every calibration file holds (`load_calibration` refuses a file without one of them).
REQUIRED = (
    "format",
    "device",
    "source",
    "matmul_tflops",
    "allreduce_bus_GBps",
    "collective_latency_us",
    "memory_GiB",
    "gpus_per_node",
)


@dataclass(frozen=True)
class Calibration:
    device: str
    source: str
    matmul_tflops: dict
    allreduce_bus_GBps: float | None
    collective_latency_us: float | None
    memory_GiB: float | None
    gpus_per_node: int
    path: str = ""


def _number(value, key: str, where: str, *, nullable: bool = True) -> float | None:
    if value is None and nullable:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        expected = "a positive number or null" if nullable else "a positive number"
        raise ValueError(f"tpext calibration {where}: {key!r} must be {expected}, got {value!r}")
    return float(value)


def validate(data, where: str = "<object>") -> Calibration:
    """`data` (a parsed calibration file) -> Calibration, or ValueError naming the key and `where`."""
    require_object(data, REQUIRED, f"tpext calibration {where}")
    if data["format"] != FORMAT:
        raise ValueError(f"tpext calibration {where}: 'format' must be {FORMAT!r}, got {data['format']!r}")
    for key in ("device", "source"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(
                f"tpext calibration {where}: {key!r} must be a non-empty string, got {data[key]!r}"
            )
    tflops = data["matmul_tflops"]
    if not isinstance(tflops, dict):
        raise ValueError(
            f"tpext calibration {where}: 'matmul_tflops' must be an object {{dtype: TFLOP/s}}, got {tflops!r}"
        )
    matmul = {}
    for dtype, value in tflops.items():
        if dtype not in DTYPE_BYTES:
            raise ValueError(
                f"tpext calibration {where}: 'matmul_tflops' has unknown dtype {dtype!r} "
                f"(known: {', '.join(DTYPE_BYTES)})"
            )
        matmul[dtype] = _number(value, f"matmul_tflops.{dtype}", where)
    gpn = data["gpus_per_node"]
    if isinstance(gpn, bool) or not isinstance(gpn, int) or gpn < 1:
        raise ValueError(f"tpext calibration {where}: 'gpus_per_node' must be an int >= 1, got {gpn!r}")
    return Calibration(
        device=data["device"],
        source=data["source"],
        matmul_tflops=matmul,
        allreduce_bus_GBps=_number(data["allreduce_bus_GBps"], "allreduce_bus_GBps", where),
        collective_latency_us=_number(data["collective_latency_us"], "collective_latency_us", where),
        memory_GiB=_number(data["memory_GiB"], "memory_GiB", where),
        gpus_per_node=gpn,
        path=where,
    )


BENCH_FORMAT = "tpext-bench-layers/1"


def _from_probes(report: dict, probes: dict, env: dict) -> dict:
    """Calibration data (format tpext-calibration/1) from one group's probes and environment, with the
    device and command of the `tpext bench` report they belong to."""
    return {
        "format": FORMAT,
        "device": report["device"],
        "source": report["command"],
        "matmul_tflops": probes["matmul_tflops"],
        "allreduce_bus_GBps": probes["allreduce"]["bus_GBps"],
        "collective_latency_us": probes["allreduce"]["latency_us"],
        "memory_GiB": env["memory_GiB"],
        "gpus_per_node": env["local_ranks"],
    }


def from_bench_report(report: dict, where: str = "<bench report>") -> dict:
    """A `tpext bench` report (layers.json, format tpext-bench-layers/1) -> calibration data: the probes
    of the largest group measured (the closest to the groups the planner sizes), as `tpext bench
    --calibration` writes them."""
    probes = report.get("probes")
    if not isinstance(probes, dict) or not probes:
        raise ValueError(
            f"tpext calibration {where}: a {BENCH_FORMAT} report needs a non-empty 'probes' "
            f"object {{tp: probes}}"
        )
    try:
        n = max(probes, key=int)
        return _from_probes(report, probes[n], report["environment"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"tpext calibration {where}: a {BENCH_FORMAT} report lacks {e} (expected probes."
            f"<tp>.matmul_tflops / allreduce.bus_GBps / allreduce.latency_us, environment."
            f"memory_GiB / local_ranks, device, command)"
        ) from e


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file, or a `tpext bench` report (layers.json) read straight as one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tpext calibration {path}: cannot read it: {e}") from e
    if isinstance(data, dict) and data.get("format") == BENCH_FORMAT:
        data = from_bench_report(data, str(path))
    return validate(data, str(path))


def write_calibration(
    path: str | Path,
    *,
    device: str,
    source: str,
    matmul_tflops: dict,
    allreduce_bus_GBps: float | None,
    collective_latency_us: float | None,
    memory_GiB: float | None,
    gpus_per_node: int,
    **extra,
) -> Path:
    """Write a calibration file (validated first, so a bad one is never written). `extra` keys are kept."""
    data = {
        "format": FORMAT,
        "device": device,
        "source": source,
        "matmul_tflops": dict(matmul_tflops),
        "allreduce_bus_GBps": allreduce_bus_GBps,
        "collective_latency_us": collective_latency_us,
        "memory_GiB": memory_GiB,
        "gpus_per_node": gpus_per_node,
        **extra,
    }
    validate(data, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def apply_calibration(gpu: GPUSpec, cal: Calibration) -> GPUSpec:
    """`gpu` with every measured figure of `cal` in place of the spec figure; nulls keep the spec figure."""
    matmul = dict(gpu.matmul_tflops)
    matmul.update({k: v for k, v in cal.matmul_tflops.items() if v is not None})
    return replace(
        gpu,
        name=cal.device,
        matmul_tflops=matmul,
        memory_GiB=cal.memory_GiB if cal.memory_GiB is not None else gpu.memory_GiB,
        nvlink_GBps=cal.allreduce_bus_GBps if cal.allreduce_bus_GBps is not None else gpu.nvlink_GBps,
        measured_latency_us=cal.collective_latency_us,
        measured_dtypes=tuple(k for k, v in cal.matmul_tflops.items() if v is not None),
        source=f"calibration {cal.path} (measured by: {cal.source}); spec figures of {gpu.name} where null",
    )
