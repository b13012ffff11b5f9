"""Checkpoints of a tensor-parallel model at scale: torch.distributed.checkpoint (DCP) vs tpext's dense path.

    PYTHONPATH=. python bench/checkpoints.py [--tp 1 2 4] [--layers 8] [--out bench/results] [--plot]

A Llama-style model of ~100M parameters whose embedding and lm_head are half of it (vocab 32000, hidden
768, 8 layers, fp32, ~400 MB), parallelized at each tp size on gloo (one process per rank, this machine).
Each rank, on the same model:

  load_checkpoint  tpext.load_checkpoint from the dense safetensors (every rank reads only its slices)
  dcp_save         get_model_state_dict + dcp.save (each rank writes its own shards)
  save_checkpoint  tpext.save_checkpoint (gather the dense state dict on every rank, rank 0 writes)
  dcp_load         get_model_state_dict + dcp.load + set_model_state_dict

and reports the time of the slowest rank, the bytes each rank wrote, and each rank's peak RSS above its RSS
before the operation (the kernel's high-water mark, reset before each: /proc/self/clear_refs). Correctness
first: after the timed runs the parameters are zeroed and loaded again from each checkpoint written, and
must equal what was saved, bit for bit. JSON to <out>/<device>/checkpoints.json (+ checkpoints.png, --plot).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

DIMS = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4
)


def _config(layers: int):
    from tpext.models import LlamaConfig

    return LlamaConfig(**DIMS, num_hidden_layers=layers)


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(fn) -> dict:
    """Time of fn on this rank (ranks start together) and its peak RSS above the RSS before it."""
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _rss_mib("VmHWM")
    dist.barrier()
    return {"seconds": seconds, "peak_rss_above_MiB": peak - before, "rss_before_MiB": before}


def _bytes_by_rank(pattern: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(pattern))


def _rank_main(work: str, layers: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import tpext
    from tpext.commands.launch import init_worker
    from tpext.models import LlamaForCausalLM

    rank, _ = init_worker("gloo", timeout_s=1800)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(layers))
    model = tpext.parallelize(model)
    out: dict = {}

    out["load_checkpoint"] = _measure(lambda: tpext.load_checkpoint(model, f"{work}/dense.safetensors"))

    def dcp_save():
        dcp.save(get_model_state_dict(model), checkpoint_id=f"{work}/dcp")

    out["dcp_save"] = _measure(dcp_save)
    out["dcp_save"]["bytes_written"] = _bytes_by_rank(f"{work}/dcp/__{rank}_*.distcp")

    out["save_checkpoint"] = _measure(lambda: tpext.save_checkpoint(model, f"{work}/tpext"))
    out["save_checkpoint"]["bytes_written"] = (
        _bytes_by_rank(f"{work}/tpext/*.safetensors") if rank == 0 else 0
    )

    def dcp_load():
        state = get_model_state_dict(model)
        dcp.load(state, checkpoint_id=f"{work}/dcp")
        set_model_state_dict(model, state)

    out["dcp_load"] = _measure(dcp_load)

    # Correctness: zero, reload from each checkpoint written, compare with what was saved.
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, reload in (("dcp", dcp_load), ("tpext", lambda: tpext.load_checkpoint(model, f"{work}/tpext"))):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        reload()
        bad = [n for n, p in model.named_parameters() if not torch.equal(p, saved[n])]
        if bad:
            raise AssertionError(
                f"rank {rank}: the {name} checkpoint reloads {len(bad)} tensors wrong: {bad[:4]}"
            )
    out["params_local"] = sum(t.numel() for t in saved.values())
    dist.barrier()
    return out


def run(tp: int, layers: int, work: str) -> dict:
    from tpext.commands.launch import launch

    per_rank = launch(_rank_main, tp, work, layers)
    ranks = [per_rank[r] for r in range(tp)]
    result = {"tp": tp, "params_local_per_rank": [r["params_local"] for r in ranks]}
    for op in ("load_checkpoint", "dcp_save", "save_checkpoint", "dcp_load"):
        result[op] = {
            "seconds_slowest_rank": max(r[op]["seconds"] for r in ranks),
            "peak_rss_above_MiB_per_rank": [round(r[op]["peak_rss_above_MiB"], 1) for r in ranks],
            "rss_before_MiB_per_rank": [round(r[op]["rss_before_MiB"], 1) for r in ranks],
        }
        if "bytes_written" in ranks[0][op]:
            result[op]["bytes_written_per_rank"] = [r[op]["bytes_written"] for r in ranks]
    return result


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = [r["tp"] for r in results]
    ops = ("dcp_save", "save_checkpoint", "dcp_load", "load_checkpoint")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.2
    for i, op in enumerate(ops):
        x = [j + (i - 1.5) * width for j in range(len(tps))]
        axes[0].bar(x, [r[op]["seconds_slowest_rank"] for r in results], width, label=op)
        axes[2].bar(x, [max(r[op]["peak_rss_above_MiB_per_rank"]) for r in results], width, label=op)
    for i, op in enumerate(("dcp_save", "save_checkpoint")):
        x = [j + (i - 0.5) * width for j in range(len(tps))]
        axes[1].bar(x, [max(r[op]["bytes_written_per_rank"]) / 2**20 for r in results], width, label=op)
    titles = (
        "time, slowest rank (s)",
        "bytes written, busiest rank (MiB)",
        "peak RSS above start, worst rank (MiB)",
    )
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(tps)), [f"tp={t}" for t in tps])
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        "Checkpoints of a ~100M-parameter Llama (fp32, gloo, one process per rank): DCP vs tpext dense"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()

    import tpext
    from tpext.commands.benchmark import device_name, environment
    from tpext.models import LlamaForCausalLM

    work = tempfile.mkdtemp(prefix="tpext-ckpt-bench-")
    try:
        torch.manual_seed(0)
        dense = LlamaForCausalLM(_config(args.layers))
        params = sum(p.numel() for p in dense.parameters())
        tpext.save_checkpoint(dense, f"{work}/dense.safetensors")  # the input every tp size loads
        del dense
        results = []
        for tp in args.tp:
            for sub in ("dcp", "tpext"):
                shutil.rmtree(f"{work}/{sub}", ignore_errors=True)
            results.append(run(tp, args.layers, work))
            r = results[-1]
            print(
                f"tp={tp}: "
                + "  ".join(
                    f"{op} {r[op]['seconds_slowest_rank']:.2f}s "
                    f"+{max(r[op]['peak_rss_above_MiB_per_rank']):.0f}MiB"
                    for op in ("dcp_save", "save_checkpoint", "dcp_load", "load_checkpoint")
                ),
                flush=True,
            )
            print(
                f"      bytes written per rank: dcp {r['dcp_save']['bytes_written_per_rank']}, "
                f"save_checkpoint {r['save_checkpoint']['bytes_written_per_rank']}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_dir = os.path.join(args.out, device_name("cpu"))
    os.makedirs(out_dir, exist_ok=True)
    record = {
        "bench": "checkpoints",
        "params": params,
        "dtype": "float32",
        "model": {**DIMS, "layers": args.layers},
        "command": " ".join(["python"] + sys.argv),
        "environment": environment(torch.device("cpu"), "gloo"),
        "results": results,
    }
    with open(os.path.join(out_dir, "checkpoints.json"), "w") as f:
        json.dump(record, f, indent=2)
    if args.plot:
        plot(results, os.path.join(out_dir, "checkpoints.png"))
    print(f"wrote {out_dir}/checkpoints.json")


if __name__ == "__main__":
    main()
