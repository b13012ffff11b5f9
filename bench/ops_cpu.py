"""CPU microbenchmark of the three overlapped ops on gloo: sequential (chunks=1) vs chunked.

    torchrun --nproc-per-node 2 bench/ops_cpu.py [--reps 15] [--chunks 2 4 8] [--out bench/results]
                                                 [--ops gemm_reduce_scatter ...] [--name ops_cpu]

For every shape it measures, on the same ranks and buffers:
  T_gemm  the local GEMM alone (torch.mm on this rank's operands)
  T_comm  the collective alone (torch.distributed on a tensor of the op's communicated size)
  T(c)    the tpext op with c chunks (c = 1 is the sequential algorithm)
and prints speedup T(1)/T(c) beside the napkin limit: no schedule beats max(T_gemm, T_comm), so the
best possible speedup is (T_gemm + T_comm) / max(T_gemm, T_comm) (2x when the two are equal), and the
GEMM calls one op makes for each c (tpext.commands.benchmark.gemm_calls: one launch each on CUDA).
Each time is the median over repeats of the slowest rank. Results are checked against chunks=1 first.
--ops keeps the shapes of those ops only. JSON goes to <out>/<device>/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import tpext
from tpext.commands.benchmark import commit, device_name, gemm_calls, load_average, median_slowest

# (op, rows M of the full activation, K, N). fp32. For gemm_all_reduce, x is [M, K] per rank and the
# all-reduce moves [M, N]; the reduce-scatter/all-gather ops split M across ranks. K is chosen so the
# GEMM and the collective take similar time on a 2-rank gloo group (the case overlap is for), and one
# GEMM-heavy shape shows the other regime.
SHAPES = [
    ("gemm_all_reduce", 2048, 128, 1024),
    ("gemm_all_reduce", 2048, 512, 1024),
    ("gemm_all_reduce", 2048, 2048, 1024),
    ("gemm_reduce_scatter", 2048, 256, 1024),
    ("all_gather_gemm", 2048, 1024, 128),
]


def _case(op: str, m: int, k: int, n: int, chunks_list: list[int], reps: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(n, k, generator=g)
    if op == "gemm_all_reduce":
        x = torch.randn(m, k, generator=g)
        run = lambda c: tpext.ops.gemm_all_reduce(x, w, chunks=c)  # noqa: E731
        gemm = lambda: torch.mm(x, w.t())  # noqa: E731
        buf = torch.empty(m, n)
        comm = lambda: dist.all_reduce(buf)  # noqa: E731
        comm_bytes = buf.numel() * buf.element_size()
    elif op == "gemm_reduce_scatter":
        x = torch.randn(m, k, generator=g)
        run = lambda c: tpext.ops.gemm_reduce_scatter(x, w, chunks=c)  # noqa: E731
        gemm = lambda: torch.mm(x, w.t())  # noqa: E731
        send, recv = torch.empty(m, n), torch.empty(m // world, n)
        comm = lambda: dist.reduce_scatter_tensor(recv, send)  # noqa: E731
        comm_bytes = send.numel() * send.element_size()
    else:
        x = torch.randn(m // world, k, generator=g)
        run = lambda c: tpext.ops.all_gather_gemm(x, w, chunks=c)[0]  # noqa: E731
        x_full = torch.empty(m, k)
        gemm = lambda: torch.mm(x_full, w.t())  # noqa: E731
        comm = lambda: dist.all_gather_into_tensor(x_full, x)  # noqa: E731
        comm_bytes = x_full.numel() * x_full.element_size()

    reference = run(1)
    for c in chunks_list:
        torch.testing.assert_close(run(c), reference, rtol=1e-5, atol=1e-4)

    t_gemm = median_slowest(gemm, reps)
    t_comm = median_slowest(comm, reps)
    calls = {c: gemm_calls(lambda c=c: run(c)) for c in [1, *chunks_list]}
    t = {c: median_slowest(lambda c=c: run(c), reps) for c in [1, *chunks_list]}
    best_c = min(chunks_list, key=lambda c: t[c])
    return {
        "op": op,
        "M": m,
        "K": k,
        "N": n,
        "dtype": "float32",
        "world_size": world,
        "gemm_gflop": 2
        * m
        * k
        * n
        / world ** (op != "gemm_all_reduce" and op != "gemm_reduce_scatter")
        / 1e9,
        "comm_bytes": comm_bytes,
        "t_gemm_ms": 1e3 * t_gemm,
        "t_comm_ms": 1e3 * t_comm,
        "t_ms": {str(c): 1e3 * v for c, v in t.items()},
        "gemm_calls": {str(c): n for c, n in calls.items()},
        "best_chunks": best_c,
        "speedup": t[1] / t[best_c],
        "napkin_speedup": (t_gemm + t_comm) / max(t_gemm, t_comm),
        "napkin_limit_ms": 1e3 * max(t_gemm, t_comm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=sorted({s[0] for s in SHAPES}),
        default=None,
        help="only the shapes of these ops (default: all)",
    )
    parser.add_argument("--name", default="ops_cpu", help="JSON file name, without .json")
    args = parser.parse_args()
    shapes = [s for s in SHAPES if args.ops is None or s[0] in args.ops]

    torch.set_num_threads(1)  # one BLAS thread per rank: the ranks share the machine's cores
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    load_before = load_average()
    rows = [_case(op, m, k, n, args.chunks, args.reps) for op, m, k, n in shapes]
    load_after = load_average()

    if rank == 0:
        head = (
            f"{'op':<20} {'M':>5} {'K':>5} {'N':>5} {'T_gemm':>8} {'T_comm':>8} {'seq c=1':>8} "
            + " ".join(f"{'c=' + str(c):>8}" for c in args.chunks)
            + f" {'speedup':>8} {'napkin':>7}"
        )
        print(
            f"tpext ops on gloo, {dist.get_world_size()} ranks, fp32, times in ms "
            f"(median of {args.reps}, slowest rank); load average {load_before} before, {load_after} after"
        )
        print(head)
        for r in rows:
            print(
                f"{r['op']:<20} {r['M']:>5} {r['K']:>5} {r['N']:>5} {r['t_gemm_ms']:>8.2f} {r['t_comm_ms']:>8.2f} "
                f"{r['t_ms']['1']:>8.2f} "
                + " ".join(f"{r['t_ms'][str(c)]:>8.2f}" for c in args.chunks)
                + f" {r['speedup']:>7.2f}x {r['napkin_speedup']:>6.2f}x"
            )
        print(
            "speedup = T(c=1) / T(best c); napkin = (T_gemm + T_comm) / max(T_gemm, T_comm), "
            "the best any overlap can do"
        )
        print(
            "GEMM calls per op: "
            + "; ".join(
                f"{r['op']} " + " ".join(f"c={c}: {n}" for c, n in r["gemm_calls"].items()) for r in rows
            )
        )
        out_dir = os.path.join(args.out, device_name("cpu"))
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{args.name}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "commit": commit(),
                    "torch": torch.__version__,
                    "backend": "gloo",
                    "world_size": dist.get_world_size(),
                    "reps": args.reps,
                    "load_average": {"before": load_before, "after": load_after},
                    "results": rows,
                },
                f,
                indent=1,
            )
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
