"""`tpext plan`: predict per-GPU memory, communication, compute and throughput of TP configurations.

Example: python -m tpext plan --model llama-70b --gpu H100 --gpus 64 --pp 4 --tp 1 2 4 8 --out plan/
The cost model and its assumptions: docs/planner.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path


def _chunks(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 1, got {value!r}")
    return n


def _reference(value: str):
    tp, sep, rel = value.partition("=")
    try:
        return int(tp), float(rel)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be TP=RELATIVE_THROUGHPUT such as 16=0.45, got {value!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tpext.planner.presets import GPUS, INTER_NODE_LINKS, MODELS

    g = parser.add_argument_group("model and hardware")
    g.add_argument(
        "--model",
        default="llama-7b",
        help=f"preset ({', '.join(MODELS)}) or a Hugging Face config.json path (default: llama-7b)",
    )
    g.add_argument(
        "--gpu", default="H100", help=f"GPU preset, public curves ({', '.join(GPUS)}; default H100)"
    )
    g.add_argument(
        "--calibration",
        metavar="PATH",
        help="calibration file written by the benchmarks, or a `tpext bench` report "
        "(layers.json): its measured figures replace the preset's",
    )
    g.add_argument(
        "--inter-node",
        default="ib-ndr400",
        help=f"network between nodes ({', '.join(INTER_NODE_LINKS)}; default ib-ndr400)",
    )
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs sharing NVLink (default: the calibration's, else 8)",
    )
    g.add_argument(
        "--nvlink-GBps", type=float, help="override the intra-node bus bandwidth, GB/s per direction"
    )
    g.add_argument("--inter-node-GBps", type=float, help="override the inter-node bandwidth per GPU, GB/s")
    g.add_argument(
        "--matmul-efficiency",
        type=float,
        default=1.0,
        help="a further factor on every GEMM and attention rate, on top of the public "
        "curves (default 1.0: the curves as given)",
    )

    w = parser.add_argument_group("workload")
    w.add_argument(
        "--mode",
        choices=("train", "prefill", "decode"),
        default="train",
        help="training step, inference prefill, or inference decode of one token per sequence",
    )
    w.add_argument("--seq", type=int, default=4096, help="sequence length (decode: the KV-cache context)")
    w.add_argument(
        "--mbs", "--micro-batch", dest="mbs", type=int, default=1, help="sequences per micro-batch"
    )
    w.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
    w.add_argument("--sp", action="store_true", help="sequence parallelism on")
    w.add_argument(
        "--keep-gathered-inputs",
        action="store_true",
        help="SP: column layers keep their gathered input for the weight gradient (more memory, "
        "one all-gather less per GEMM group in backward)",
    )
    w.add_argument("--recompute", choices=("none", "full"), default="none", help="activation recomputation")
    w.add_argument(
        "--zero",
        type=int,
        default=0,
        choices=(0, 1, 2, 3),
        help="shard optimizer (1), + grads (2), + weights (3) over DP",
    )
    w.add_argument(
        "--microbatches",
        type=int,
        default=1,
        help="micro-batches per optimizer step per replica (gradient accumulation / pipeline)",
    )
    w.add_argument(
        "--chunks", type=_chunks, default="auto", help="chunks of the overlapped schedule, or auto"
    )
    w.add_argument(
        "--allow-kv-replication",
        action="store_true",
        help="accept TP above the kv head count (kv heads replicated) instead of an error",
    )
    w.add_argument(
        "--reserve-gib",
        type=float,
        default=0.0,
        help="memory per GPU kept for the framework (CUDA context, allocator slack)",
    )

    p = parser.add_argument_group("parallelism")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="TP degrees to compare")
    p.add_argument("--gpus", type=int, help="total GPUs: DP = gpus / (TP * PP) for each TP")
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree when --gpus is not given")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")

    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write plan.json and plan.png there")
    o.add_argument("--json", metavar="PATH", help="JSON output path (default DIR/plan.json with --out)")
    o.add_argument("--png", metavar="PATH", help="PNG output path (default DIR/plan.png with --out)")
    o.add_argument(
        "--reference",
        type=_reference,
        nargs="+",
        metavar="TP=REL",
        help="measured relative throughputs to plot beside the prediction",
    )
    o.add_argument("--reference-label", default="reference", help="legend label of --reference")


def _hardware(args):
    from tpext.planner.calibration import apply_calibration, load_calibration
    from tpext.planner.presets import gpu_preset, inter_node_preset

    gpu, link = gpu_preset(args.gpu), inter_node_preset(args.inter_node)
    gpus_per_node = 8
    if args.calibration:
        cal = load_calibration(args.calibration)
        gpu, gpus_per_node = apply_calibration(gpu, cal), cal.gpus_per_node
    if args.gpus_per_node is not None:
        gpus_per_node = args.gpus_per_node
    if args.nvlink_GBps is not None:
        gpu = dataclasses.replace(gpu, nvlink_GBps=args.nvlink_GBps, source=gpu.source + "; --nvlink-GBps")
    if args.inter_node_GBps is not None:
        link = dataclasses.replace(link, per_gpu_GBps=args.inter_node_GBps)
    return gpu, link, gpus_per_node


def _command_line() -> str | None:
    """The command as typed, when this process was started as `tpext plan` / `python -m tpext plan`."""
    argv = sys.argv[1:]
    if not argv or argv[0] != "plan":
        return None
    return "python -m tpext " + " ".join(shlex.quote(a) for a in argv)


def build(args) -> dict:
    """Parsed arguments -> the plan document (raises ValueError on bad input)."""
    from tpext.planner.estimate import Workload, estimate
    from tpext.planner.presets import canonical_dtype, nccl_model, resolve_model
    from tpext.planner.report import FORMAT, summarize

    model = resolve_model(args.model)
    gpu, link, gpus_per_node = _hardware(args)
    base = dict(
        mode=args.mode,
        seq=args.seq,
        micro_batch=args.mbs,
        dtype=canonical_dtype(args.dtype),
        sequence_parallel=args.sp,
        keep_gathered_inputs=args.keep_gathered_inputs,
        pp=args.pp,
        microbatches=args.microbatches,
        zero=args.zero,
        recompute=args.recompute == "full",
        chunks=args.chunks,
        gpus_per_node=gpus_per_node,
        allow_kv_replication=args.allow_kv_replication,
        matmul_efficiency=args.matmul_efficiency,
        reserve_GiB=args.reserve_gib,
    )
    configs, errors, baseline = [], [], None
    notes = ["figures are predictions of the cost model in docs/planner.md, not measurements"]
    for tp in args.tp:
        try:
            dp = args.dp
            if args.gpus is not None:
                if args.gpus % (tp * args.pp):
                    raise ValueError(f"--gpus {args.gpus} is not a multiple of TP * PP = {tp} * {args.pp}")
                dp = args.gpus // (tp * args.pp)
            result = estimate(model, gpu, link, Workload(dp=dp, **base), tp)
        except ValueError as e:
            errors.append({"tp": tp, "error": str(e).removeprefix("tpext plan: ")})
            continue
        baseline = baseline or result
        configs.append(summarize(result, baseline))
        layer = result["layer"]
        if layer["exposed_comm_overlap_s"] > layer["comm_s"]:  # only an explicit --chunks gets here
            c = layer["overlap_costs_s"]
            notes.append(
                f"TP={tp}: overlap with --chunks {args.chunks} is slower than none by "
                f"{(layer['exposed_comm_overlap_s'] - layer['comm_s']) * 1e6:.0f} us per layer: "
                f"splitting each collective adds {c['chunk_latency'] * 1e6:.0f} us of latency, more "
                f"than the GEMMs beside it hide (NCCL's SMs take up to {c['nccl_sms'] * 1e6:.0f} us "
                f"of that); --chunks auto never picks a slower schedule"
            )
    doc = {
        "format": FORMAT,
        "command": _command_line(),
        "inputs": {
            "model": dataclasses.asdict(model),
            "gpu": dataclasses.asdict(gpu),
            "inter_node": dataclasses.asdict(link),
            "workload": {**base, "gpus": args.gpus},
            "nccl_model": nccl_model(),
        },
        "configs": configs,
        "errors": errors,
        "notes": notes,
    }
    if args.reference:
        doc["reference"] = {
            "label": args.reference_label,
            "relative_throughput": {str(tp): rel for tp, rel in args.reference},
        }
    return doc


def run(args) -> int:
    from tpext.planner.report import format_table, write_json, write_png

    try:
        doc = build(args)
    except ValueError as e:
        print(f"tpext plan: error: {str(e).removeprefix('tpext plan: ')}", file=sys.stderr)
        return 2
    print(format_table(doc))
    json_path = args.json or (Path(args.out) / "plan.json" if args.out else None)
    png_path = args.png or (Path(args.out) / "plan.png" if args.out else None)
    if json_path:
        print(f"wrote {write_json(doc, json_path)}")
    if png_path and doc["configs"]:
        print(f"wrote {write_png(doc, png_path)}")
    return 2 if doc["errors"] else 0
