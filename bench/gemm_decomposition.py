"""Decomposition tax of the chunked GEMM on one GPU: one cuBLAS GEMM vs the same GEMM in c row chunks
on one stream, and on two alternating streams (what tpext's chunked pipelines run, minus the
collective).

Splitting [M, K] x [K, N] into c row chunks costs efficiency: each chunk ends in a partial wave of
output tiles (wave quantization) and re-reads w. With two streams the next chunk fills the SMs the
last wave of the previous one leaves idle. The napkin limit is the single GEMM (ratio 1.0); the table
prints each variant's time relative to it, beside TFLOP/s.

Correctness first: every variant's output is compared with the single GEMM before timing. Timing:
CUDA events around each call, warm-up first, median of the repeats.

usage: python bench/gemm_decomposition.py [--shapes 8192x8192x8192,...] [--chunks 2,4,8]
           [--dtype bf16] [--repeats 30] [--out bench/results/<device>/gemm_decomposition.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes",
        default="4096x8192x8192,8192x8192x8192,8192x8192x28672,16384x8192x8192",
        help="comma-separated MxNxK (rows x out features x in features)",
    )
    p.add_argument("--chunks", default="2,4,8", help="comma-separated chunk counts")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--out", default=None, help="JSON path (default bench/results/<device>/gemm_decomposition.json)"
    )
    return p.parse_args(argv)


def device_dir() -> str:
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def split_rows(rows: int, parts: int, j: int) -> tuple[int, int]:
    """Same near-even split as csrc/common/rows.h."""
    base, extra = divmod(rows, parts)
    return j * base + min(j, extra), base + (1 if j < extra else 0)


def chunked(x, w_t, y, chunks: int, streams) -> None:
    caller = torch.cuda.current_stream()
    for s in streams[1:]:
        s.wait_stream(caller)
    for j in range(chunks):
        begin, size = split_rows(x.shape[0], chunks, j)
        with torch.cuda.stream(streams[j % len(streams)]):
            torch.mm(x[begin : begin + size], w_t, out=y[begin : begin + size])
    for s in streams[1:]:
        caller.wait_stream(s)


def time_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_decomposition: needs an NVIDIA GPU (none visible); nothing measured", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    side = torch.cuda.Stream()
    rows_out = []
    print(f"gemm_decomposition on {torch.cuda.get_device_name()}, {args.dtype}, median of {args.repeats}")
    print(f"{'M':>6} {'N':>6} {'K':>6} {'variant':>14} {'ms':>8} {'TFLOP/s':>8} {'vs 1 GEMM':>9}")
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.lower().split("x"))
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w_t = torch.randn(n, k, device="cuda", dtype=dtype).t()  # nn.Linear layout, as the ops see it
        y_ref, y = (
            torch.empty(m, n, device="cuda", dtype=dtype),
            torch.empty(m, n, device="cuda", dtype=dtype),
        )
        flops = 2.0 * m * n * k
        base = time_ms(
            lambda x=x, w_t=w_t, y_ref=y_ref: torch.mm(x, w_t, out=y_ref), args.warmup, args.repeats
        )
        variants = [("1 gemm", base)]
        for c in (int(v) for v in args.chunks.split(",")):
            for label, streams in (
                (f"{c} chunks 1s", [torch.cuda.current_stream()]),
                (f"{c} chunks 2s", [torch.cuda.current_stream(), side]),
            ):
                y.zero_()
                chunked(x, w_t, y, c, streams)
                torch.cuda.synchronize()
                if not torch.equal(y, y_ref):  # cuBLAS may pick another kernel for a chunk: allow rounding
                    err = (y.float() - y_ref.float()).abs().max().item()
                    scale = y_ref.float().abs().max().item()
                    if err > 2e-2 * scale:
                        raise SystemExit(
                            f"gemm_decomposition: {label} differs from the single GEMM by {err:.3e}"
                        )
                variants.append(
                    (
                        label,
                        time_ms(
                            lambda s=streams, c=c, x=x, w_t=w_t, y=y: chunked(x, w_t, y, c, s),
                            args.warmup,
                            args.repeats,
                        ),
                    )
                )
        for label, ms in variants:
            print(f"{m:>6} {n:>6} {k:>6} {label:>14} {ms:8.3f} {flops / ms / 1e9:8.1f} {ms / base:9.3f}")
            rows_out.append(
                {
                    "m": m,
                    "n": n,
                    "k": k,
                    "variant": label,
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                    "ratio_to_single_gemm": ms / base,
                }
            )
    out = args.out or os.path.join(device_dir(), "gemm_decomposition.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "bench": "gemm_decomposition",
                "device": torch.cuda.get_device_name(),
                "dtype": args.dtype,
                "torch": torch.__version__,
                "statistic": "median",
                "repeats": args.repeats,
                "baseline": "one cuBLAS GEMM (torch.mm) of the whole [M, K] x [K, N]",
                "napkin": "ratio 1.0: chunking cannot beat the single GEMM",
                "results": rows_out,
            },
            f,
            indent=1,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
