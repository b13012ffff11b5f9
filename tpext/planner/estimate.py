"""One configuration -> its predicted memory, communication, compute and throughput (a plain dict).

Composes the pure functions of cost_model.py; the formulas and their assumptions are in docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpext.ops.schedule import resolve_chunks
from tpext.planner import cost_model as cm
from tpext.planner.presets import (
    DTYPE_BYTES,
    NCCL_LL_MULTINODE_INTRA_FACTOR,
    NCCL_MULTINODE_RING_LATENCY_FACTOR,
    NCCL_PROTOCOLS,
    NVLINK_LATENCY_US,
    GPUSpec,
    LinkSpec,
    ModelSpec,
)

__all__ = ["Workload", "estimate", "GiB"]

GiB = 2**30
MODES = ("train", "prefill", "decode")
# Memory-bound passes over a [rows, hidden] tensor per layer forward: two RMSNorms (read + write each) and
# two residual adds (two reads + one write each). Backward: twice the traffic.
ELEMENTWISE_PASSES_PER_LAYER = 10
# Flash-attention backward does five [s, s]-sized products to the forward's two.
ATTENTION_BACKWARD_FLOP_RATIO = 2.5
CHUNK_CANDIDATES = (1, 2, 4, 8)


REMEDIES = {
    "weights": "larger TP or PP (or --zero 3 with DP > 1)",
    "grads": "larger TP or PP, or --zero 2 with DP > 1",
    "optimizer": "larger TP or PP, or --zero 1 with DP > 1 (shards the fp32 states over DP)",
    "activations": "{sp}{recompute}a smaller --mbs / --seq, or larger TP / PP",
    "kv_cache": "fewer sequences (--mbs), a shorter context (--seq), or larger TP",
}


@dataclass(frozen=True)
class Workload:
    mode: str = "train"
    seq: int = 4096
    micro_batch: int = 1
    dtype: str = "bfloat16"
    sequence_parallel: bool = False
    keep_gathered_inputs: bool = False  # SP: column layers keep x_full (tpext's keep_gathered_input)
    dp: int = 1
    pp: int = 1
    microbatches: int = 1
    zero: int = 0
    recompute: bool = False
    chunks: int | str = "auto"
    gpus_per_node: int = 8
    allow_kv_replication: bool = False
    matmul_efficiency: float = 1.0
    reserve_GiB: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"tpext plan: mode must be one of {MODES}, got {self.mode!r}")
        for name in ("seq", "micro_batch", "dp", "pp", "microbatches", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tpext plan: {name} must be an int >= 1, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"tpext plan: zero stage must be 0, 1, 2 or 3, got {self.zero!r}")
        if not 0 < self.matmul_efficiency <= 1:
            raise ValueError(
                f"tpext plan: matmul efficiency must be in (0, 1], got {self.matmul_efficiency!r}"
            )


class _Net:
    """Collective times for groups laid out on nodes of `gpus_per_node` GPUs (NCCL's ring cost model)."""

    def __init__(self, gpu: GPUSpec, link: LinkSpec, gpus_per_node: int):
        self.gpu, self.link, self.gpn = gpu, link, gpus_per_node

    def time_s(
        self, kind: str, payload: float, n: int, members_per_node: int | None = None
    ) -> tuple[float, float]:
        """(bandwidth seconds, latency seconds) of one collective over n GPUs, `members_per_node` of them
        on each node (default: as many as fit). Inside a node the bus bandwidth is the NVLink figure;
        across nodes a ring runs one ring per NIC, so it is at most members_per_node x the NIC figure."""
        if n <= 1:
            return 0.0, 0.0
        g = members_per_node or min(n, self.gpn)
        nodes = -(-n // g)
        bus = self.gpu.nvlink_GBps if nodes == 1 else min(self.gpu.nvlink_GBps, g * self.link.per_gpu_GBps)
        if nodes == 1 and self.gpu.measured_latency_us is not None:  # calibrated: its own latency
            return (
                cm.collective_wire_bytes_per_gpu(kind, payload, n) / (bus * cm.GB),
                self.gpu.measured_latency_us * 1e-6,
            )
        return cm.nccl_ring_time_s(
            kind,
            payload,
            n,
            nodes,
            bus,
            NCCL_PROTOCOLS,
            nvlink_step_scale=self.gpu.intra_latency_us / NVLINK_LATENCY_US,
            net_step_us=self.link.latency_us,
            multinode_ring_factor=NCCL_MULTINODE_RING_LATENCY_FACTOR,
            ll_multinode_intra_factor=NCCL_LL_MULTINODE_INTRA_FACTOR,
        )

    @property
    def sm_fraction(self) -> float:
        """Share of the SMs an NCCL collective takes from a GEMM running beside it."""
        return self.gpu.nccl_sms / self.gpu.sms if self.gpu.sms else 0.0


def _mlp_shapes(model: ModelSpec, T: int, tp: int, moe_layer: bool) -> dict:
    """name -> (count, m, k, n) of the MLP's GEMMs on one GPU. A MoE layer's tokens go to their k experts
    (balanced routing: the T*k routed rows spread evenly over the experts they reach); each expert is a
    [rows, h] x [h, i_e/t] GEMM, so small experts lose to wave quantization; the router is replicated."""
    h, mats = model.hidden, (2 if model.gated_mlp else 1)
    if not moe_layer:
        i_local = cm.shard_size(model.intermediate, tp)
        return {"gate_up": (1, T, h, mats * i_local), "down": (1, T, i_local, h)}
    active = min(model.experts, T * model.experts_per_token)
    rows = -(-T * model.experts_per_token // active)
    e_local = cm.shard_size(model.expert_intermediate, tp)
    shapes = {
        "gate_up": (active, rows, h, mats * e_local),
        "down": (active, rows, e_local, h),
        "router": (1, T, h, model.experts),
    }
    if model.shared_intermediate:
        s_local = cm.shard_size(model.shared_intermediate, tp)
        shapes.update(shared_gate_up=(1, T, h, mats * s_local), shared_down=(1, T, s_local, h))
    return shapes


def _layer(model: ModelSpec, gpu: GPUSpec, w: Workload, tp: int, net: _Net, moe_layer: bool = False) -> dict:
    b = DTYPE_BYTES[w.dtype]
    tflops = gpu.matmul_tflops.get(w.dtype)
    if not tflops:
        raise ValueError(f"tpext plan: no matmul throughput for {w.dtype} on {gpu.name}")
    tflops *= w.matmul_efficiency
    hbm = gpu.hbm_GBps
    decode = w.mode == "decode"
    T = w.micro_batch if decode else w.micro_batch * w.seq
    h, d = model.hidden, model.head_dim
    q_local = (model.heads // tp) * d
    kv_local = cm.kv_heads_per_gpu(model.kv_heads, tp) * d
    i_local = cm.mlp_width(model, tp, moe_layer)
    shapes = {
        "qkv": (1, T, h, q_local + 2 * kv_local),
        "o_proj": (1, T, q_local, h),
        **_mlp_shapes(model, T, tp, moe_layer),
    }
    measured = w.dtype in gpu.measured_dtypes  # a calibrated rate is already what cuBLAS reaches
    gemm_eff = 1.0 if measured else gpu.gemm_efficiency
    eff = {"sms": gpu.sms, "efficiency": gemm_eff}
    fwd = {k: c * cm.gemm_time_s(m, kk, n, b, tflops, hbm, **eff) for k, (c, m, kk, n) in shapes.items()}
    dgrad = {k: c * cm.gemm_time_s(m, n, kk, b, tflops, hbm, **eff) for k, (c, m, kk, n) in shapes.items()}
    wgrad = {k: c * cm.gemm_time_s(kk, m, n, b, tflops, hbm, **eff) for k, (c, m, kk, n) in shapes.items()}
    # the GEMMs a collective of the MLP is paired with (a MoE layer's shared experts run beside its routed)
    for table in (fwd, dgrad):
        table["mlp_in"] = table["gate_up"] + table.get("shared_gate_up", 0.0)
        table["mlp_out"] = table["down"] + table.get("shared_down", 0.0)

    if decode:
        attn_flops = 4.0 * w.micro_batch * w.seq * q_local
        attn_bytes = 2.0 * w.micro_batch * w.seq * kv_local * b
    else:
        attn_flops = 4.0 * w.micro_batch * w.seq * w.seq * q_local * 0.5  # causal: half the score matrix
        attn_bytes = (2 * q_local + 2 * kv_local) * T * b
    # flash attention's published fraction is of the spec peak; a measured GEMM rate stands for spec x MAMF
    attn_tflops = tflops * gpu.attention_efficiency / (gpu.gemm_efficiency if measured else 1.0)
    attn_fwd = max(attn_flops / (attn_tflops * 1e12), attn_bytes / (hbm * 1e9))
    rows_sp = cm.shard_size(T, tp) if w.sequence_parallel else T
    elem_bytes = b * (
        ELEMENTWISE_PASSES_PER_LAYER * rows_sp * h + T * (3 * i_local + 2 * (q_local + kv_local))
    )  # + SwiGLU, RoPE on the shards
    elem_fwd = elem_bytes / (hbm * 1e9)

    gemm_names = list(shapes)
    compute_fwd = sum(fwd[k] for k in gemm_names) + attn_fwd + elem_fwd
    compute_bwd = 0.0
    if w.mode == "train":
        compute_bwd = (
            sum(dgrad[k] + wgrad[k] for k in gemm_names)
            + ATTENTION_BACKWARD_FLOP_RATIO * attn_fwd
            + 2 * elem_fwd
            + (compute_fwd if w.recompute else 0.0)
        )

    # (kind, partner GEMM time) of each collective; every payload is the full [T, h] activation.
    if w.sequence_parallel:
        fwd_colls = [
            ("all_gather", fwd["qkv"]),
            ("reduce_scatter", fwd["o_proj"]),
            ("all_gather", fwd["mlp_in"]),
            ("reduce_scatter", fwd["mlp_out"]),
        ]
        bwd_colls = [
            ("reduce_scatter", dgrad["qkv"]),
            ("all_gather", dgrad["o_proj"]),
            ("reduce_scatter", dgrad["mlp_in"]),
            ("all_gather", dgrad["mlp_out"]),
        ]
        if not w.keep_gathered_inputs:  # the column layers gather their input again for wgrad, not overlapped
            bwd_colls += [("all_gather", 0.0), ("all_gather", 0.0)]
    else:
        fwd_colls = [("all_reduce", fwd["o_proj"]), ("all_reduce", fwd["mlp_out"])]
        bwd_colls = [("all_reduce", dgrad["qkv"]), ("all_reduce", dgrad["mlp_in"])]
    colls = list(fwd_colls) if tp > 1 else []
    if w.mode == "train" and tp > 1:
        colls += bwd_colls + (fwd_colls if w.recompute else [])
    payload = cm.allreduce_bytes_per_layer(T, h, b)
    # "auto": the best chunk count of the schedule for each GEMM + collective pair under this model. More
    # chunks hide more of the collective but pay its latency once per chunk, and while a collective runs
    # beside the GEMM it holds net.sm_fraction of the SMs; chunks=1 (sequential) is always a candidate, so
    # "auto" is never slower than no overlap.
    candidates = CHUNK_CANDIDATES if w.chunks == "auto" else (resolve_chunks(w.chunks, T, tp),)
    by_kind: dict = {}
    chunks_used = []
    comm_s = exposed_overlap_s = 0.0
    costs = {"chunk_latency": 0.0, "nccl_sms": 0.0}
    for kind, partner_s in colls:
        bw_s, lat_s = net.time_s(kind, payload, tp)
        comm_s += bw_s + lat_s

        def chunk_s(c, kind=kind):
            return sum(net.time_s(kind, payload / c, tp))

        def pipelined(c, partner_s=partner_s):
            return cm.overlapped_time_s(partner_s, chunk_s(c), c, net.sm_fraction)

        best = min(candidates, key=pipelined)
        chunks_used.append(best)
        exposed_overlap_s += pipelined(best) - partner_s
        # The two costs overlap can pay (what bounds its loss against the sequential schedule, since
        # max(c, g + f c) <= c + g + f c): the collective split in `best` pieces costs more than whole
        # (a latency per piece), and each overlapped stage gives f of its collective's time to NCCL's SMs.
        costs["chunk_latency"] += best * chunk_s(best) - (bw_s + lat_s)
        costs["nccl_sms"] += (best - 1) * net.sm_fraction * chunk_s(best)
        e = by_kind.setdefault(
            kind, {"count": 0, "payload_bytes": payload, "wire_bytes_per_gpu": 0.0, "time_s": 0.0}
        )
        e["count"] += 1
        e["wire_bytes_per_gpu"] += cm.collective_wire_bytes_per_gpu(kind, payload, tp)
        e["time_s"] += bw_s + lat_s
    return {
        "tokens": T,
        "chunks": chunks_used,
        "compute_fwd_s": compute_fwd,
        "compute_bwd_s": compute_bwd,
        "compute_s": compute_fwd + compute_bwd,
        "comm_s": comm_s,
        "exposed_comm_overlap_s": exposed_overlap_s,
        "overlap_costs_s": costs,
        "collectives": by_kind,
        "gemm_fwd_s": fwd,
        "attention_fwd_s": attn_fwd,
        "elementwise_fwd_s": elem_fwd,
        "tflops_used": tflops,
        "gemm_efficiency": gemm_eff,
        "moe_layer": moe_layer,
    }


_LAYER_SUMS = ("compute_fwd_s", "compute_bwd_s", "compute_s", "comm_s", "exposed_comm_overlap_s")


def _stage_layer(model: ModelSpec, gpu: GPUSpec, w: Workload, tp: int, net: _Net) -> dict:
    """The average layer of the slowest stage: a dense model's layer, or for a MoE model the mean of its
    dense and MoE layers weighted by how many of each the stage holds (the collectives are the same)."""
    dense, moe = cm.moe_layer_counts(model, math.ceil(model.layers / w.pp))
    if not moe:
        return _layer(model, gpu, w, tp, net)
    out = _layer(model, gpu, w, tp, net, moe_layer=True)
    if dense:
        d = _layer(model, gpu, w, tp, net)
        out = {**out, **{k: (dense * d[k] + moe * out[k]) / (dense + moe) for k in _LAYER_SUMS}}
    out["dense_layers_in_stage"], out["moe_layers_in_stage"] = dense, moe
    return out


def _head(model: ModelSpec, gpu: GPUSpec, w: Workload, tp: int, net: _Net, tflops: float) -> dict:
    """Embedding, LM head and vocabulary-parallel cross entropy, once per micro-batch."""
    b = DTYPE_BYTES[w.dtype]
    rows = w.micro_batch if w.mode != "train" else w.micro_batch * w.seq  # serving needs last-token logits
    T = w.micro_batch if w.mode == "decode" else w.micro_batch * w.seq
    v_local = cm.shard_size(model.vocab, tp)
    fwd = cm.gemm_time_s(
        rows,
        model.hidden,
        v_local,
        b,
        tflops,
        gpu.hbm_GBps,
        sms=gpu.sms,
        efficiency=1.0 if w.dtype in gpu.measured_dtypes else gpu.gemm_efficiency,
    )
    compute = fwd * (3 if w.mode == "train" else 1)
    comm = 0.0
    if tp > 1:
        kind = "reduce_scatter" if w.sequence_parallel else "all_reduce"
        # Embedding output: all-reduced also under SP, which splits the sequence at the first layer's input
        # (tpext.parallelize) and all-gathers its gradient there in backward.
        comm += sum(net.time_s("all_reduce", T * model.hidden * b, tp))
        if w.mode == "train":
            comm += sum(net.time_s(kind, T * model.hidden * b, tp))  # head input gradient
            if w.sequence_parallel:
                comm += sum(net.time_s("all_gather", T * model.hidden * b, tp))
            comm += 3 * sum(net.time_s("all_reduce", rows * 4, tp))  # CE: max, sum-exp, target logit
        if w.sequence_parallel:
            comm += sum(net.time_s("all_gather", rows * model.hidden * b, tp))
            if w.mode == "train" and not w.keep_gathered_inputs:  # lm_head's input, gathered again for wgrad
                comm += sum(net.time_s("all_gather", rows * model.hidden * b, tp))
    return {"compute_s": compute, "comm_s": comm}


def _memory(model: ModelSpec, w: Workload, tp: int, capacity_GiB: float) -> dict:
    b = DTYPE_BYTES[w.dtype]
    params = cm.params_per_gpu(model, tp, w.pp)
    layers = math.ceil(model.layers / w.pp)
    mem = {
        "weights": cm.weights_bytes(params, b),
        "grads": 0.0,
        "optimizer": 0.0,
        "activations": 0.0,
        "kv_cache": 0.0,
    }
    T = w.micro_batch if w.mode == "decode" else w.micro_batch * w.seq
    if w.mode == "train":
        per = cm.training_state_bytes_per_param(b)
        mem["weights"] = params * per["weights"] / (w.dp if w.zero >= 3 else 1)
        mem["grads"] = params * per["grads"] / (w.dp if w.zero >= 2 else 1)
        mem["optimizer"] = params * per["optimizer"] / (w.dp if w.zero >= 1 else 1)
        dense, moe = cm.moe_layer_counts(model, layers)
        acts = [
            cm.layer_activation_bytes(model, T, tp, b, w.sequence_parallel, w.keep_gathered_inputs, m)
            for m in (False, True)
        ]
        in_flight = min(w.pp, w.microbatches)  # 1F1B: the first stage holds pp micro-batches
        if w.recompute:
            rows = cm.shard_size(T, tp) if w.sequence_parallel else T
            stored = layers * rows * model.hidden * b * in_flight + acts[moe > 0]
        else:
            stored = (dense * acts[0] + moe * acts[1]) * in_flight
        mem["activations"] = stored + cm.logits_bytes(T, model.vocab, tp)
    else:
        mem["kv_cache"] = cm.kv_cache_bytes(model, w.micro_batch, w.seq, tp, layers, b)
        i_local = cm.mlp_width(model, tp, model.moe)
        mem["activations"] = T * (2 * model.hidden + 3 * i_local) * b + cm.logits_bytes(
            w.micro_batch, model.vocab, tp
        )
    total = sum(mem.values()) + w.reserve_GiB * GiB
    capacity = capacity_GiB * GiB
    dominant = max(mem, key=mem.get)
    out = {
        "bytes": mem,
        "total_bytes": total,
        "capacity_bytes": capacity,
        "fits": total <= capacity,
        "dominant": dominant,
        "params_per_gpu": params,
    }
    if not out["fits"]:
        out["reason"] = (
            f"needs {total / GiB:.1f} GiB per GPU of {capacity_GiB:.1f} GiB "
            f"(over by {(total - capacity) / GiB:.1f} GiB); largest term: {dominant} "
            f"{mem[dominant] / GiB:.1f} GiB ({mem[dominant] / total:.0%}); try "
            + REMEDIES[dominant].format(
                sp="" if w.sequence_parallel else "--sp, ",
                recompute="" if w.recompute else "--recompute full, ",
            )
        )
    return out


def estimate(model: ModelSpec, gpu: GPUSpec, link: LinkSpec, w: Workload, tp: int) -> dict:
    """Predicted figures of one TP degree (DP, PP and the rest from `w`), for one GPU of the slowest stage."""
    cm.check_tp(model.heads, model.kv_heads, tp, allow_kv_replication=w.allow_kv_replication)
    if tp > w.gpus_per_node and tp % w.gpus_per_node:
        raise ValueError(
            f"tpext plan: TP={tp} spans nodes of {w.gpus_per_node} GPUs but does not fill whole "
            f"nodes (use a multiple of {w.gpus_per_node})"
        )
    net = _Net(gpu, link, w.gpus_per_node)
    layer = _stage_layer(model, gpu, w, tp, net)
    head = _head(model, gpu, w, tp, net, layer["tflops_used"])
    layers = math.ceil(model.layers / w.pp)
    mem = _memory(model, w, tp, gpu.memory_GiB)

    compute = layers * layer["compute_s"] + head["compute_s"]
    stage_no_overlap = compute + layers * layer["comm_s"] + head["comm_s"]
    stage_overlap = compute + layers * layer["exposed_comm_overlap_s"] + head["comm_s"]
    out = {
        "tp": tp,
        "dp": w.dp,
        "pp": w.pp,
        "gpus": tp * w.dp * w.pp,
        "memory": mem,
        "layer": layer,
        "head": head,
        "compute_s": compute,
        "exposed_comm_s": {"no_overlap": stage_no_overlap - compute, "overlap": stage_overlap - compute},
    }

    tokens = layer["tokens"]
    dp_exposed = {"no_overlap": 0.0, "overlap": 0.0}
    if w.mode == "train":
        m = w.microbatches
        grad_bytes = mem["params_per_gpu"] * DTYPE_BYTES[w.dtype]
        dp_comm = 0.0
        if w.dp > 1:
            per_node = max(1, min(w.dp, w.gpus_per_node // tp))  # DP ranks are tp apart (TP innermost)
            dp_comm = sum(net.time_s("all_reduce", grad_bytes, w.dp, per_node))
            dp_comm *= 1.5 if w.zero >= 3 else 1.0  # + parameter all-gathers
        backward = layers * layer["compute_bwd_s"]
        dp_exposed = {k: max(0.0, dp_comm - backward) for k in dp_exposed}
        out["dp_grad_sync_s"] = dp_comm
        out["pipeline_bubble"] = cm.pipeline_bubble_fraction(w.pp, m)
        steps = {"no_overlap": stage_no_overlap, "overlap": stage_overlap}
        step_s = {k: (m + w.pp - 1) * v + dp_exposed[k] for k, v in steps.items()}
        tokens_per_step = m * tokens
    else:
        step_s = {"no_overlap": stage_no_overlap, "overlap": stage_overlap}  # steady-state pipeline
        tokens_per_step = tokens
    out["step_s"] = step_s
    out["tokens_per_s_per_gpu"] = {k: tokens_per_step / (v * tp * w.pp) for k, v in step_s.items()}
    return out
