"""`tpext bench`: tpext's parallel layers vs PyTorch's own tensor parallelism vs tpext sequential.

    python -m tpext bench [--tp 2 4] [--sizes 2048x512 ...] [--quick] [--out DIR] [--calibration PATH]

For every tp degree it starts that many local ranks (tpext/commands/launch.py; under torchrun it runs on
the job's ranks instead), checks every implementation against the dense layer, then times forward and
forward+backward. Prints one table; writes layers.json and layers.png to bench/results/<device>/ (or
--out; without matplotlib, which it checks before starting, the JSON alone), and with --calibration
the measured GEMM rate and all-reduce bandwidth for `tpext plan`.
The rank side is benchmark_layers.py beside this file; timing and probes are benchmark.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys

__all__ = ["add_arguments", "run"]

KiB, MiB = 2**10, 2**20
# Presets per device. CPU sizes keep a full run within minutes on 2 cores (fp32, ~100 GFLOP/s per core);
# GPU sizes are those of 7B-70B models' MLPs, where the GEMM and the collective are both milliseconds.
PRESETS = {
    "quick": {
        "sizes": [(64, 32)],
        "reps": 3,
        "warmup": 1,
        "probe": {"gemm_n": 128, "allreduce_bytes": [4 * KiB, 256 * KiB]},
    },
    "cpu": {
        "sizes": [(1024, 128), (2048, 256), (2048, 512)],
        "reps": 15,
        "warmup": 3,
        "probe": {"gemm_n": 1024, "allreduce_bytes": [64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]},
    },
    "cuda": {
        "sizes": [(4096, 4096), (8192, 8192)],
        "reps": 30,
        "warmup": 5,
        "probe": {"gemm_n": 8192, "allreduce_bytes": [1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]},
    },
}


def _size(text: str) -> tuple[int, int]:
    try:
        tokens, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENSxHIDDEN such as 2048x512, got {text!r}") from None
    if tokens < 1 or hidden < 1:
        raise argparse.ArgumentTypeError(f"tokens and hidden must be >= 1, got {text!r}")
    return tokens, hidden


def _chunks(text: str):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 1, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tp",
        type=int,
        nargs="+",
        metavar="N",
        help="tensor-parallel degrees, one launch each (default: 2 on CPU; 2, 4, 8 up to the GPU count)",
    )
    parser.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        metavar="TxH",
        help="tokens x hidden; the MLP is hidden -> ffn-mult * hidden -> hidden "
        "(default: 1024x128 2048x256 2048x512 on CPU, 4096x4096 8192x8192 on GPU)",
    )
    parser.add_argument("--ffn-mult", type=int, default=4, help="ffn = ffn-mult * hidden (default 4)")
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="any of column row column_sp row_sp mlp mlp_sp (default: all)",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on GPU"
    )
    parser.add_argument("--chunks", type=_chunks, default="auto", help="tpext's chunk count (default: auto)")
    parser.add_argument("--reps", type=int, help="timed repeats, median reported (default 15 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default 3 CPU, 5 GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a CI smoke test")
    parser.add_argument(
        "--backend", choices=["gloo", "nccl"], help="default: nccl when CUDA is visible, else gloo"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="directory for layers.json and layers.png (default: bench/results/<device>)",
    )
    parser.add_argument(
        "--calibration",
        metavar="PATH",
        help="also write the planner's calibration JSON (tpext-calibration/1) here",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _fail(message: str):
    raise SystemExit(f"tpext bench: {message}")


def _config(args) -> dict:
    """The run's configuration from the arguments and the device's preset; every check before any launch."""
    import torch

    from tpext.commands.benchmark_layers import LAYERS
    from tpext.commands.launch import default_backend, launched_by_torchrun

    unknown = sorted(set(args.layers or []) - set(LAYERS))
    if unknown:
        _fail(f"--layers takes {' '.join(LAYERS)}; got unknown {' '.join(unknown)}")
    for name, low in (("reps", 1), ("warmup", 0), ("ffn_mult", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            _fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    backend = args.backend or default_backend()
    device_type = "cuda" if backend == "nccl" else "cpu"
    preset = PRESETS["quick" if args.quick else device_type]
    gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    if launched_by_torchrun():  # the job's ranks are the group: one tp degree, its world size
        world = int(os.environ["WORLD_SIZE"])
        if args.tp and args.tp != [world]:
            _fail(
                f"under torchrun the tp degree is the job's world size {world}; got --tp "
                f"{' '.join(map(str, args.tp))}"
            )
        tp = [world]
    else:
        tp = args.tp or ([2] if device_type == "cpu" else [n for n in (2, 4, 8) if n <= gpus] or [1])
        for n in tp:
            if n < 1:
                _fail(f"--tp must be >= 1, got {n}")
            if device_type == "cuda" and n > gpus:
                _fail(f"--tp {n} needs {n} GPUs (NCCL takes one per rank), {gpus} visible")
    sizes = args.sizes or preset["sizes"]
    for n in tp:
        for tokens, hidden in sizes:
            if tokens % n or (hidden * args.ffn_mult) % n:
                _fail(
                    f"size {tokens}x{hidden} at tp={n} needs tokens and ffn = {args.ffn_mult}*{hidden} "
                    f"divisible by {n} (sequence shards, even feature shards)"
                )
    return {
        "backend": backend,
        "device_type": device_type,
        "tp": tp,
        "sizes": sizes,
        "ffn_mult": args.ffn_mult,
        "layers": args.layers or list(LAYERS),
        "chunks": args.chunks,
        "dtype": args.dtype or ("bfloat16" if device_type == "cuda" else "float32"),
        "reps": args.reps or preset["reps"],
        "warmup": preset["warmup"] if args.warmup is None else args.warmup,
        "seed": args.seed,
        "probe": preset["probe"],
        "progress": args.progress,
        "quick": args.quick,
    }


def _command_line() -> str:
    prog = "python -m tpext" if sys.argv[0].endswith("__main__.py") else os.path.basename(sys.argv[0])
    return prog + " " + shlex.join(sys.argv[1:])


def run(args) -> int:
    from tpext.commands.benchmark import device_name, load_average
    from tpext.commands.benchmark_layers import worker
    from tpext.commands.launch import launch, launched_by_torchrun

    cfg = _config(args)
    plot = _can_plot()
    if not plot:  # said before the minutes of work, not after them
        print(
            "tpext bench: note: matplotlib is not installed; layers.json will be written and the plot "
            "skipped (pip install matplotlib for layers.png)",
            file=sys.stderr,
        )
    load_before = load_average()
    results: dict[int, dict] = {}
    if launched_by_torchrun():
        out = worker(cfg)
        if int(os.environ["RANK"]) != 0:  # rank 0 reports; the others only their own failures
            for msg in out["failures"]:
                print(f"tpext bench: {msg}", file=sys.stderr)
            return 1 if out["failures"] else 0
        results[cfg["tp"][0]] = {0: out}
    else:
        if cfg["device_type"] == "cpu" and max(cfg["tp"]) > (os.cpu_count() or 1):
            print(f"tpext bench: note: {max(cfg['tp'])} ranks share {os.cpu_count()} cores", file=sys.stderr)
        for n in cfg["tp"]:
            results[n] = launch(worker, n, cfg)
            if any(out["failures"] for out in results[n].values()):
                break

    failures = [msg for per_rank in results.values() for out in per_rank.values() for msg in out["failures"]]
    if failures:
        print(
            "tpext bench: correctness check failed; stopped, no results written:\n  " + "\n  ".join(failures),
            file=sys.stderr,
        )
        return 1

    device = device_name(cfg["device_type"])
    env = {  # the largest group's (its local ranks: the devices that share the link the planner sizes)
        **results[max(results)][0]["environment"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    report = {
        "format": "tpext-bench-layers/1",
        "command": _command_line(),
        "device": device,
        "config": {k: v for k, v in cfg.items() if k != "progress"},
        "environment": env,
        "probes": {str(n): results[n][0]["probes"] for n in cfg["tp"]},
        "results": [row for n in cfg["tp"] for row in results[n][0]["rows"]],
    }
    print(_table(report["results"], cfg))
    print(_probe_lines(report["probes"]))
    print(
        f"load average (1 min) on {env['cpu_count']} cores: {load_before[0] if load_before else '?'} before, "
        f"{env['load_average_after'][0] if env['load_average_after'] else '?'} after"
    )
    out_dir = args.out or os.path.join("bench", "results", device)
    print(_write_report(report, out_dir, f"{device}, {cfg['dtype']}, {cfg['backend']}", plot))
    if args.calibration:
        _write_calibration(args.calibration, report)
    return 0


def _write_calibration(path: str, report: dict) -> None:
    """The planner's inputs, read from the report as tpext.planner reads a report given as calibration (the
    probes of the largest group measured, the closest to the groups the planner sizes); format
    tpext-calibration/1."""
    from tpext.planner.calibration import from_bench_report

    calibration = from_bench_report(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(calibration, f, indent=1)
    print(f"wrote {path}")


def _table(rows: list[dict], cfg: dict) -> str:
    head = (
        f"{'layer':<10} {'tokens':>6} {'hidden':>6} {'tp':>3} {'mode':<8} {'torch_tp':>9} {'tpext_seq':>9} "
        f"{'tpext':>9} {'GFLOP/s':>8} {'vs torch':>8} {'vs seq':>7} {'T_gemm':>8} {'T_comm':>8} "
        f"{'napkin':>8} {'check':>5}"
    )
    lines = [
        f"tpext bench: {cfg['dtype']} on {cfg['backend']}, times in ms (median of {cfg['reps']}, slowest "
        f"rank); GFLOP/s of the whole layer over all ranks",
        head,
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"{r['layer']:<10} {r['tokens']:>6} {r['hidden']:>6} {r['tp']:>3} {r['mode']:<8} "
            f"{ms['torch_tp']:>9.3f} {ms['tpext_seq']:>9.3f} {ms['tpext']:>9.3f} {r['gflops']['tpext']:>8.1f} "
            f"{r['speedup_vs_torch_tp']:>7.2f}x {r['speedup_vs_seq']:>6.2f}x {r['t_gemm_ms']:>8.3f} "
            f"{r['t_comm_ms']:>8.3f} {r['napkin_ms']:>8.3f} {'ok' if all(r['correct'].values()) else 'FAIL':>5}"
        )
    lines.append(
        "vs torch / vs seq: time of torch's TP / of tpext sequential (chunks=1) over tpext's time; "
        "napkin = max(T_gemm, T_comm),\nthe layer's GEMMs alone and its collectives alone: no schedule "
        "finishes sooner; check: outputs and gradients match the dense layer"
    )
    return "\n".join(lines)


def _probe_lines(probes: dict) -> str:
    lines = []
    for n, p in probes.items():
        tflops, ar = p["matmul_tflops"], p["allreduce"]
        lines.append(
            f"probes tp={n}: GEMM {p['gemm_n']}^3 fp32 {tflops['float32']:.3f} TFLOP/s per rank"
            + (f", bf16 {tflops['bfloat16']:.1f}" if tflops["bfloat16"] else "")
            + (f"; all-reduce bus {ar['bus_GBps']:.2f} GB/s" if ar["bus_GBps"] is not None else "")
            + f"; 4-byte all-reduce {ar['latency_us']:.1f} us"
        )
    return "\n".join(lines)


def _can_plot() -> bool:
    """Whether the optional plotting dependency (matplotlib) can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def _write_report(report: dict, out_dir: str, title: str, plot: bool) -> str:
    """Writes layers.json (always) and layers.png (when `plot`) to out_dir; returns what was written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "layers.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    if not plot:
        return f"wrote {json_path}; plot skipped (matplotlib is not installed)"
    _plot(report["results"], os.path.join(out_dir, "layers.png"), title)
    return f"wrote {json_path} and layers.png"


def _plot(rows: list[dict], path: str, title: str) -> None:
    """Speedup over PyTorch's TP per case, tpext and tpext sequential, with the napkin limit's speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["fwd", "fwd_bwd"]
    per_panel = max(1, len(rows) // len(modes))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 0.7 * per_panel), 8), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        xs = list(range(len(sel)))
        best = [r["ms"]["torch_tp"] / r["napkin_ms"] if r["napkin_ms"] > 0 else float("nan") for r in sel]
        ax.bar([x - 0.2 for x in xs], [r["speedup_vs_torch_tp"] for r in sel], 0.4, label="tpext")
        ax.bar(
            [x + 0.2 for x in xs],
            [r["ms"]["torch_tp"] / r["ms"]["tpext_seq"] for r in sel],
            0.4,
            label="tpext sequential (chunks=1)",
        )
        ax.scatter(
            xs,
            best,
            marker="_",
            s=300,
            color="k",
            zorder=3,
            label="napkin limit: torch_tp / max(T_gemm, T_comm)",
        )
        ax.axhline(1.0, color="gray", lw=1, ls="--", label="PyTorch TP (DTensor)")
        labels = [f"{r['layer']}\n{r['tokens']}x{r['hidden']}\ntp{r['tp']}" for r in sel]
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("speedup over PyTorch TP")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}: {title}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
