"""Overhead of tpext's layers at tp=1 (no collective at all) against plain nn.Linear, on CPU.

    python bench/tp1_overhead.py [--reps 50]

Forward + backward of ColumnParallelLinear / RowParallelLinear built with from_dense on a world of one
rank, vs the nn.Linear they came from; median of repeats, interleaved so drift hits both alike. The
napkin limit is 0% (a size-1 group runs F.linear); the goal is <= 5%. JSON: results/<device>/tp1_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from tpext.commands.benchmark import commit, device_name
from tpext.nn import ColumnParallelLinear, RowParallelLinear

SHAPES = [(64, 256, 256), (512, 1024, 1024), (2048, 1024, 4096)]  # (tokens, in, out)


def _step(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)

    rows = []
    print(
        f"{'layer':<22} {'tokens':>6} {'in':>5} {'out':>5} {'nn.Linear ms':>13} {'tpext ms':>9} {'overhead':>9}"
    )
    for tokens, k, n in SHAPES:
        dense = torch.nn.Linear(k, n)
        x = torch.randn(tokens, k, requires_grad=True)
        for cls in (ColumnParallelLinear, RowParallelLinear):
            layer = cls.from_dense(dense)
            torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)
            reps = args.reps if tokens * k * n <= 2**26 else max(5, args.reps // 10)  # big shapes: fewer
            t_dense, t_tp = [], []
            for _ in range(3):
                _step(dense, x), _step(layer, x)
            for _ in range(reps):
                t0 = time.perf_counter()
                _step(dense, x)
                t1 = time.perf_counter()  # noqa: E702
                _step(layer, x)
                t2 = time.perf_counter()  # noqa: E702
                t_dense.append(t1 - t0), t_tp.append(t2 - t1)
            d, t = statistics.median(t_dense) * 1e3, statistics.median(t_tp) * 1e3
            rows.append(
                {
                    "layer": cls.__name__,
                    "tokens": tokens,
                    "in": k,
                    "out": n,
                    "reps": reps,
                    "nn_linear_ms": d,
                    "tpext_ms": t,
                    "overhead": t / d - 1,
                }
            )
            print(
                f"{cls.__name__:<22} {tokens:>6} {k:>5} {n:>5} {d:>13.3f} {t:>9.3f} {100 * (t / d - 1):>8.1f}%"
            )
    out_dir = os.path.join(args.out, device_name("cpu"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tp1_overhead.json")
    with open(path, "w") as f:
        json.dump({"commit": commit(), "torch": torch.__version__, "results": rows}, f, indent=1)
    print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
