"""Results of `tpext plan` as a plain-text table, a JSON document and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from tpext.planner.estimate import GiB

__all__ = ["FORMAT", "summarize", "format_table", "write_json", "write_png"]

FORMAT = "tpext-plan/1"
ABBREV = {"all_reduce": "AR", "reduce_scatter": "RS", "all_gather": "AG"}
MEMORY_TERMS = ("weights", "grads", "optimizer", "activations", "kv_cache")


def summarize(result: dict, baseline: dict | None) -> dict:
    """One configuration's estimate -> the JSON entry (GiB, ms, us; relative to `baseline`'s throughput)."""
    mem, layer = result["memory"], result["layer"]
    entry = {
        "tp": result["tp"],
        "dp": result["dp"],
        "pp": result["pp"],
        "gpus": result["gpus"],
        "fits": mem["fits"],
        "memory_GiB": {k: mem["bytes"][k] / GiB for k in MEMORY_TERMS},
        "memory_total_GiB": mem["total_bytes"] / GiB,
        "memory_capacity_GiB": mem["capacity_bytes"] / GiB,
        "memory_dominant": mem["dominant"],
        "params_per_gpu": mem["params_per_gpu"],
        "comm_per_layer": {
            kind: {
                "count": c["count"],
                "payload_bytes": c["payload_bytes"],
                "wire_bytes_per_gpu": c["wire_bytes_per_gpu"],
                "time_us": c["time_s"] * 1e6,
            }
            for kind, c in layer["collectives"].items()
        },
        "comm_per_layer_us": layer["comm_s"] * 1e6,
        "exposed_comm_per_layer_us": {
            "no_overlap": layer["comm_s"] * 1e6,
            "overlap": layer["exposed_comm_overlap_s"] * 1e6,
        },
        "chunks": layer["chunks"],
        "overlap_costs_per_layer_us": {k: v * 1e6 for k, v in layer["overlap_costs_s"].items()},
        "compute_per_layer_us": layer["compute_s"] * 1e6,
        "compute_ms": result["compute_s"] * 1e3,
        "exposed_comm_ms": {k: v * 1e3 for k, v in result["exposed_comm_s"].items()},
        "step_ms": {k: v * 1e3 for k, v in result["step_s"].items()},
        "tokens_per_s_per_gpu": result["tokens_per_s_per_gpu"],
    }
    if "reason" in mem:
        entry["not_fitting_reason"] = mem["reason"]
    if "dp_grad_sync_s" in result:
        entry["dp_grad_sync_ms"] = result["dp_grad_sync_s"] * 1e3
        entry["pipeline_bubble"] = result["pipeline_bubble"]
    tps = result["tokens_per_s_per_gpu"]
    entry["overlap_gain"] = tps["overlap"] / tps["no_overlap"]
    if baseline is not None:
        # Both relative to the baseline's throughput WITHOUT overlap, so the two columns compare directly
        # (relative to each column's own baseline, a TP degree gaining less from overlap than the baseline
        # would read as overlap being slower, which it never is).
        base = baseline["tokens_per_s_per_gpu"]["no_overlap"]
        entry["relative_throughput"] = {k: v / base for k, v in tps.items()}
    return entry


def _row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def format_table(doc: dict) -> str:
    inp = doc["inputs"]
    w = inp["workload"]
    lines = [
        f"tpext plan: {inp['model']['name']} on {inp['gpu']['name']} ({inp['gpu']['source']}), "
        f"{w['mode']}, seq {w['seq']} x micro-batch {w['micro_batch']}, {w['dtype']}, "
        f"SP {'on' if w['sequence_parallel'] else 'off'}, {w['gpus_per_node']} GPUs/node, "
        f"inter-node {inp['inter_node']['name']} {inp['inter_node']['per_gpu_GBps']:g} GB/s per GPU",
        (
            "memory per GPU in GiB (W weights, G grads, O optimizer, A activations, KV cache); bytes each GPU "
            "sends per layer and the time of those collectives; times per micro-batch of the slowest pipeline "
            "stage; rel / rel+ovl = tokens/s per GPU without / with overlap, both relative to the first TP's "
            "without overlap; gain = with / without overlap at the same TP"
        ),
    ]
    head = [
        "TP",
        "DP",
        "PP",
        "W",
        "G",
        "O",
        "A",
        "KV",
        "total",
        "fits",
        "collectives/layer",
        "sent/GPU/layer",
        "compute",
        "exposed",
        "exposed+ovl",
        "tok/s/GPU",
        "rel",
        "rel+ovl",
        "gain",
    ]
    units = [
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "count x payload",
        "MB (us)",
        "ms",
        "ms",
        "ms",
        "",
        "",
        "",
        "",
    ]
    rows = []
    for c in doc["configs"]:
        m = c["memory_GiB"]
        mb = sum(k["wire_bytes_per_gpu"] for k in c["comm_per_layer"].values()) / 1e6
        rel = c.get("relative_throughput", {})
        colls = (
            " + ".join(
                f"{k['count']} {ABBREV[kind]} x {k['payload_bytes'] / 1e6:.3g} MB"
                for kind, k in c["comm_per_layer"].items()
            )
            or "-"
        )
        rows.append(
            [
                c["tp"],
                c["dp"],
                c["pp"],
                *(f"{m[k]:.1f}" for k in MEMORY_TERMS),
                f"{c['memory_total_GiB']:.1f}",
                "yes" if c["fits"] else "NO",
                colls,
                f"{mb:.1f} ({c['comm_per_layer_us']:.0f})",
                f"{c['compute_ms']:.2f}",
                f"{c['exposed_comm_ms']['no_overlap']:.2f}",
                f"{c['exposed_comm_ms']['overlap']:.2f}",
                f"{c['tokens_per_s_per_gpu']['no_overlap']:.0f}",
                f"{rel.get('no_overlap', float('nan')):.0%}",
                f"{rel.get('overlap', float('nan')):.0%}",
                f"{c['overlap_gain']:.2f}x",
            ]
        )
    widths = [max(len(str(r[i])) for r in [head, units, *rows]) for i in range(len(head))]
    lines += [_row(head, widths), _row(units, widths)] + [_row(r, widths) for r in rows]
    for c in doc["configs"]:
        if not c["fits"]:
            lines.append(f"TP={c['tp']} does not fit: {c['not_fitting_reason']}")
    for e in doc["errors"]:
        named = f"TP={e['tp']}" in e["error"]
        lines.append(f"error: {e['error']}" if named else f"error (TP={e['tp']}): {e['error']}")
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_json(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def write_png(doc: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = doc["configs"]
    labels = [f"TP={c['tp']}" for c in configs]
    fig, (ax_mem, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0.0] * len(configs)
    for term in MEMORY_TERMS:
        vals = [c["memory_GiB"][term] for c in configs]
        if any(vals):
            ax_mem.bar(labels, vals, bottom=bottom, label=term)
            bottom = [b + v for b, v in zip(bottom, vals)]
    for i, c in enumerate(configs):
        if not c["fits"]:
            ax_mem.annotate(
                "does not fit",
                (i, c["memory_total_GiB"]),
                ha="center",
                va="bottom",
                fontsize=8,
                color="firebrick",
            )
    if configs:
        ax_mem.axhline(configs[0]["memory_capacity_GiB"], color="k", ls="--", lw=1, label="GPU memory")
    ax_mem.set_ylabel("GiB per GPU")
    ax_mem.set_title("memory per GPU")
    ax_mem.legend(fontsize=8)
    tps = [c["tp"] for c in configs]
    for key, style in (("no_overlap", "o-"), ("overlap", "s--")):
        ax_tp.plot(
            tps,
            [c.get("relative_throughput", {}).get(key, float("nan")) for c in configs],
            style,
            label=f"predicted, {key.replace('_', ' ')}",
        )
    for tp, rel in doc.get("reference", {}).get("relative_throughput", {}).items():
        ax_tp.plot([int(tp)], [rel], "k*", ms=10)
    if doc.get("reference"):
        ax_tp.plot([], [], "k*", label=doc["reference"]["label"])
    gpn = doc["inputs"]["workload"]["gpus_per_node"]
    if tps and max(tps) > gpn:
        ax_tp.axvline(gpn, color="gray", ls=":", lw=1, label=f"node boundary ({gpn} GPUs)")
    ax_tp.set_xscale("log", base=2)
    ax_tp.set_xticks(tps, [str(t) for t in tps])
    ax_tp.set_xlabel("TP degree")
    ax_tp.set_ylabel(f"tokens/s per GPU relative to TP={tps[0]}" if tps else "relative throughput")
    ax_tp.set_ylim(0, 1.1)
    ax_tp.set_title("predicted throughput")
    ax_tp.legend(fontsize=8)
    inp = doc["inputs"]
    fig.suptitle(
        f"{inp['model']['name']} on {inp['gpu']['name']}, {inp['workload']['mode']}, "
        f"seq {inp['workload']['seq']}, mbs {inp['workload']['micro_batch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
