"""Peak memory per rank while tpext.from_pretrained loads a ~100M-parameter Hugging Face Llama, tp 1, 2, 4 (gloo).

    python bench/checkpoints_from_pretrained.py [--tp 1 2 4] [--layers 8] [--out bench/results]

Each tp size runs in fresh processes (one per rank). A rank resets its peak RSS (/proc/self/clear_refs)
after the imports, calls tpext.from_pretrained on a save_pretrained directory (fp32, one file), and
reports its peak RSS above where it started (VmHWM - VmRSS before; the file's memory-mapped pages count).
Beside it: this rank's local share of the model, the largest dense tensor, and the baseline, the
path that worked before: transformers' own from_pretrained of the dense model on every rank, then
tpext.parallelize (at the largest tp size). The napkin bound is share + one dense tensor.
JSON + PNG: results/<device>/checkpoints-from-pretrained.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.multiprocessing as mp

MB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _rank(rank: int, world: int, path: str, init_file: str, out: str, dense_baseline: bool) -> None:
    import torch.distributed as dist
    import transformers

    import tpext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cls = transformers.LlamaForCausalLM  # transformers imports a model's code lazily: not part of the load
    with torch.device("meta"):
        cls(config(1))
    before = _status("VmRSS")
    _reset_peak()
    if dense_baseline:
        model = tpext.parallelize(cls.from_pretrained(path, dtype=torch.float32))  # today's dense path
    else:
        model = tpext.from_pretrained(cls, path, dtype=torch.float32)
    peak = _status("VmHWM") - before
    # parameters() and buffers(), not state_dict(): that hands out sharded tensors with their dense shapes
    local = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "peak_rss_above_start_mb": peak / MB, "local_mb": local / MB}, f)
    dist.destroy_process_group()


def _spawn(world: int, path: str, dense_baseline: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_rank, args=(world, path, os.path.join(tmp, "init"), out, dense_baseline), nprocs=world)
        ranks = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
    return ranks


def config(layers: int = 8):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )


def measure(tp_sizes=(1, 2, 4), layers: int = 8, workdir: str | None = None) -> list[dict]:
    """Rows {"load", "tp", "rank", "peak_rss_above_start_mb", "local_mb", "dense_mb", "largest_tensor_mb",
    "napkin_mb"}, the baseline (dense from_pretrained, then parallelize) first."""
    import transformers

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        torch.manual_seed(0)
        dense = transformers.LlamaForCausalLM(config(layers))
        dense.save_pretrained(tmp)
        tensors = list(dense.state_dict().values())
        dense_mb = sum(t.numel() * t.element_size() for t in tensors) / MB
        largest_mb = max(t.numel() * t.element_size() for t in tensors) / MB
        params = sum(p.numel() for p in dense.parameters())
        del dense, tensors
        rows = []
        for load, tp in [("dense, then parallelize", max(tp_sizes))] + [
            ("tpext.from_pretrained", tp) for tp in tp_sizes
        ]:
            for r in _spawn(tp, tmp, dense_baseline=load != "tpext.from_pretrained"):
                rows.append(
                    {
                        "load": load,
                        "tp": tp,
                        **r,
                        "dense_mb": dense_mb,
                        "largest_tensor_mb": largest_mb,
                        "napkin_mb": r["local_mb"] + largest_mb,
                        "params": params,
                    }
                )
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = sorted({r["tp"] for r in rows if r["load"] == "tpext.from_pretrained"})
    worst = [
        max(
            r["peak_rss_above_start_mb"]
            for r in rows
            if r["tp"] == tp and r["load"] != "dense, then parallelize"
        )
        for tp in tps
    ]
    share = [
        max(r["local_mb"] for r in rows if r["tp"] == tp and r["load"] != "dense, then parallelize")
        for tp in tps
    ]
    napkin = [
        max(r["napkin_mb"] for r in rows if r["tp"] == tp and r["load"] != "dense, then parallelize")
        for tp in tps
    ]
    baseline = max(r["peak_rss_above_start_mb"] for r in rows if r["load"] == "dense, then parallelize")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(tps, worst, "o-", label="tpext.from_pretrained: peak RSS above start (worst rank)")
    ax.plot(tps, napkin, "s--", label="bound: share + largest dense tensor")
    ax.plot(tps, share, "^:", label="this rank's share of the model")
    ax.axhline(
        baseline,
        color="gray",
        label=f"transformers from_pretrained + parallelize, tp={max(tps)} (worst rank)",
    )
    ax.set_xlabel("tensor-parallel size")
    ax.set_ylabel("MiB per rank")
    ax.set_xticks(tps)
    ax.set_title(f"Loading a {rows[0]['params'] / 1e6:.0f}M-parameter Llama (fp32), gloo")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from tpext.commands.benchmark import commit, device_name

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    rows = measure(tuple(args.tp), args.layers)
    for r in rows:
        print(
            f"{r['load']:>22} tp={r['tp']} rank {r['rank']}: peak {r['peak_rss_above_start_mb']:7.1f} MiB above "
            f"start; share {r['local_mb']:6.1f}, bound share+largest {r['napkin_mb']:6.1f}, dense {r['dense_mb']:.1f}"
        )
    out = os.path.join(args.out, device_name())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "checkpoints-from-pretrained.json"), "w") as f:
        json.dump({"commit": commit(), "torch": torch.__version__, "results": rows}, f, indent=1)
    plot(rows, os.path.join(out, "checkpoints-from-pretrained.png"))


if __name__ == "__main__":
    main()
