"""The cost model: small pure functions, units in their names. Formulas and sources: docs/planner.md.

Conventions: `tokens` = rows of one micro-batch's activations (seq * micro_batch, or micro_batch when
decoding one token per sequence); `*_bytes` are bytes, `*_s` seconds, `*_GBps` 1e9 bytes/s, `n`/`tp` group
sizes. A collective's `payload_bytes` is the size of the full (unsharded) tensor it produces or reduces.
"""

from __future__ import annotations

import math

__all__ = [
    "shard_size",
    "column_shard_output_bytes",
    "allreduce_bytes_per_layer",
    "largest_activation_elems",
    "ring_allreduce_time_s",
    "ring_reduce_scatter_time_s",
    "ring_allgather_time_s",
    "collective_wire_bytes_per_gpu",
    "kv_heads_per_gpu",
    "check_tp",
    "layer_params",
    "mlp_params",
    "mlp_width",
    "moe_layer_counts",
    "model_params",
    "params_per_gpu",
    "weights_bytes",
    "training_state_bytes_per_param",
    "layer_activation_bytes",
    "logits_bytes",
    "kv_cache_bytes",
    "gemm_time_s",
    "pipelined_time_s",
    "pipeline_bubble_fraction",
    "wave_efficiency",
    "nccl_ring_time_s",
    "overlapped_time_s",
]

GB = 1e9


# --------------------------------------------------------------------------------------------- shapes/bytes
def shard_size(n: int, tp: int) -> int:
    """Largest per-rank share of n features over tp ranks (tpext gives the first n % tp ranks one more)."""
    return -(-n // tp)


def column_shard_output_bytes(tokens: int, out_features: int, tp: int, dtype_bytes: int) -> int:
    """Output of a column-parallel projection on one GPU: [tokens, out_features / tp]."""
    return tokens * shard_size(out_features, tp) * dtype_bytes


def allreduce_bytes_per_layer(tokens: int, hidden: int, dtype_bytes: int) -> int:
    """Payload of the all-reduce after one row-parallel layer: the full [tokens, hidden] activation."""
    return tokens * hidden * dtype_bytes


def largest_activation_elems(seq: int, hidden: int, tp: int, sequence_parallel: bool) -> int:
    """Largest activation a GPU holds in a TP layer: [seq, hidden] in the replicated regions without SP;
    with SP the replicated regions are [seq/tp, hidden] and the TP region [seq, hidden/tp]."""
    if not sequence_parallel or tp == 1:
        return seq * hidden
    return max(shard_size(seq, tp) * hidden, seq * shard_size(hidden, tp))


# ------------------------------------------------------------------------------------------ collectives
def ring_reduce_scatter_time_s(payload_bytes: float, n: int, bus_GBps: float, latency_s: float) -> float:
    """Ring reduce-scatter: every GPU sends (n-1)/n of the payload. (All-gather: the same.)"""
    if n <= 1:
        return 0.0
    return latency_s + (n - 1) / n * payload_bytes / (bus_GBps * GB)


ring_allgather_time_s = ring_reduce_scatter_time_s


def ring_allreduce_time_s(payload_bytes: float, n: int, bus_GBps: float, latency_s: float) -> float:
    """Ring all-reduce = reduce-scatter + all-gather: 2(n-1)/n of the payload over the bus bandwidth
    (nccl-tests' busbw is defined so that this holds), one fixed latency per collective."""
    if n <= 1:
        return 0.0
    return latency_s + 2 * (n - 1) / n * payload_bytes / (bus_GBps * GB)


def collective_wire_bytes_per_gpu(kind: str, payload_bytes: float, n: int) -> float:
    """Bytes each GPU sends in a ring collective (what the bus bandwidth is spent on)."""
    factor = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}
    if kind not in factor:
        raise ValueError(f"tpext plan: collective kind must be one of {sorted(factor)}, got {kind!r}")
    return 0.0 if n <= 1 else factor[kind] * (n - 1) / n * payload_bytes


# -------------------------------------------------------------------------------------- sharding rules
def kv_heads_per_gpu(kv_heads: int, tp: int) -> int:
    """KV heads a GPU holds: kv/tp, or one replicated head when tp > kv (GQA caps useful TP at kv)."""
    return max(1, kv_heads // tp)


def check_tp(heads: int, kv_heads: int, tp: int, *, allow_kv_replication: bool = False) -> None:
    """Raise ValueError when `tp` cannot shard the attention heads."""
    if tp < 1:
        raise ValueError(f"tpext plan: TP degree must be >= 1, got {tp}")
    if heads % tp:
        raise ValueError(
            f"tpext plan: TP={tp} does not divide the {heads} attention heads (each GPU must own whole heads)"
        )
    if tp > kv_heads:
        if not allow_kv_replication:
            raise ValueError(
                f"tpext plan: TP={tp} exceeds the {kv_heads} key/value heads: with GQA the useful TP is at "
                f"most the kv head count ({kv_heads}); beyond it every kv head is replicated on "
                f"{tp // kv_heads} GPUs (pass --allow-kv-replication to model that)"
            )
        if tp % kv_heads:
            raise ValueError(
                f"tpext plan: TP={tp} must be a multiple of the {kv_heads} kv heads to replicate them"
            )
    elif kv_heads % tp:
        raise ValueError(f"tpext plan: TP={tp} does not divide the {kv_heads} key/value heads")


# ---------------------------------------------------------------------------------------- parameters
def mlp_params(model, tp: int = 1, moe_layer: bool = False) -> int:
    """MLP parameters of one layer on one GPU. A MoE layer under TP (no expert parallelism) shards every
    routed and shared expert like the dense MLP (gate/up column-, down row-parallel: Megatron-LM's expert
    tensor parallelism); its router [hidden, experts] is replicated."""
    mats = 3 if model.gated_mlp else 2
    if not moe_layer:
        return mats * model.hidden * shard_size(model.intermediate, tp)
    width = model.experts * shard_size(model.expert_intermediate, tp) + shard_size(
        model.shared_intermediate, tp
    )
    return mats * model.hidden * width + model.hidden * model.experts


def moe_layer_counts(model, layers: int | None = None) -> tuple[int, int]:
    """(dense, MoE) layers among `layers` (default: the model's); the dense ones come first."""
    layers = model.layers if layers is None else layers
    if not model.moe:
        return layers, 0
    moe = min(layers, model.layers - model.dense_layers)
    return layers - moe, moe


def layer_params(model, tp: int = 1, moe_layer: bool = False) -> int:
    """Parameters of one transformer layer held by one GPU (norm weights replicated)."""
    d = model.head_dim
    q_and_o = 2 * model.hidden * (model.heads // tp) * d
    kv = 2 * model.hidden * kv_heads_per_gpu(model.kv_heads, tp) * d
    return q_and_o + kv + mlp_params(model, tp, moe_layer) + 2 * model.hidden


def embedding_params(model, tp: int = 1, pp: int = 1) -> int:
    """Vocabulary-parallel embedding and LM head on the GPU that holds the most of them. With PP the
    embedding sits on the first stage and the head on the last (a tied head is a second copy there)."""
    table = shard_size(model.vocab, tp) * model.hidden
    if pp > 1:
        return table
    return table if model.tied_embeddings else 2 * table


def model_params(model) -> int:
    dense, moe = moe_layer_counts(model)
    return (
        dense * layer_params(model)
        + moe * layer_params(model, 1, True)
        + embedding_params(model)
        + model.hidden
    )


def params_per_gpu(model, tp: int, pp: int) -> int:
    """Parameters on the most loaded GPU: ceil(layers / pp) layers plus the embedding or the head."""
    dense, moe = moe_layer_counts(model, math.ceil(model.layers / pp))  # a stage of MoE layers, if any
    return (
        dense * layer_params(model, tp)
        + moe * layer_params(model, tp, True)
        + embedding_params(model, tp, pp)
    )


def weights_bytes(params: float, dtype_bytes: int) -> float:
    return params * dtype_bytes


def training_state_bytes_per_param(dtype_bytes: int) -> dict:
    """Mixed-precision Adam (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1): weights and gradients in the
    training dtype, optimizer = fp32 master weights + Adam's two fp32 moments (16 bytes/param with bf16).
    Training in fp32 needs no master copy."""
    optimizer = 8 if dtype_bytes == 4 else 12
    return {"weights": dtype_bytes, "grads": dtype_bytes, "optimizer": optimizer}


# ---------------------------------------------------------------------------------------- activations
def layer_activation_bytes(
    model,
    tokens: int,
    tp: int,
    dtype_bytes: int,
    sequence_parallel: bool,
    keep_gathered_inputs: bool = False,
    moe_layer: bool = False,
) -> int:
    """Bytes one layer saves for backward (no recomputation; flash attention: no [s, s] scores).

    Replicated-region tensors [tokens, hidden]: the two norm inputs (residual stream) and the two norm
    outputs (inputs of the QKV and gate/up GEMMs); SP shards them by tp (tpext's SP column layers keep
    their input shard and gather it again for the weight gradient), all but the norm outputs when the
    layers keep the gathered input (keep_gathered_inputs, tpext's keep_gathered_input=True). TP-region tensors are always sharded: q, k, v (for attention backward),
    the attention output (input of o_proj), gate and up outputs and their product (input of down_proj).
    Plus fp32 per-row statistics: norm rstd (2 per token) and attention log-sum-exp (one per local head).
    """
    h, d = model.hidden, model.head_dim
    rows_sp = shard_size(tokens, tp) if sequence_parallel else tokens
    rows_norm_out = tokens if (sequence_parallel and keep_gathered_inputs) else rows_sp
    replicated = (2 * rows_sp + 2 * rows_norm_out) * h
    q_local = (model.heads // tp) * d
    kv_local = kv_heads_per_gpu(model.kv_heads, tp) * d
    sharded = tokens * (
        2 * q_local + 2 * kv_local + (3 if model.gated_mlp else 2) * mlp_width(model, tp, moe_layer)
    )
    stats_fp32 = rows_sp * 2 + tokens * (model.heads // tp)
    if moe_layer:  # fp32 router logits and the routed copies of each token's input to its k experts
        stats_fp32 += tokens * model.experts
        sharded += tokens * model.experts_per_token * h
    return (replicated + sharded) * dtype_bytes + 4 * stats_fp32


def mlp_width(model, tp: int, moe_layer: bool = False) -> int:
    """Intermediate features one token activates on one GPU: the dense MLP's shard, or its k routed
    experts' shards plus the shared experts' shard."""
    if not moe_layer:
        return shard_size(model.intermediate, tp)
    return model.experts_per_token * shard_size(model.expert_intermediate, tp) + shard_size(
        model.shared_intermediate, tp
    )


def logits_bytes(tokens: int, vocab: int, tp: int) -> int:
    """fp32 logits of the vocabulary-parallel cross entropy, [tokens, vocab / tp]."""
    return tokens * shard_size(vocab, tp) * 4


def kv_cache_bytes(model, sequences: int, context: int, tp: int, layers: int, dtype_bytes: int) -> int:
    """K and V for `context` positions of `sequences` sequences in `layers` layers, on one GPU."""
    kv_width = kv_heads_per_gpu(model.kv_heads, tp) * model.head_dim
    return 2 * layers * sequences * context * kv_width * dtype_bytes


# -------------------------------------------------------------------------------------------- compute
# Output tiles cuBLAS uses for large bf16/fp16 GEMMs on Hopper/Ampere (NVIDIA, "Matrix Multiplication
# Background User's Guide": tile and wave quantization); the best-filling one is taken.
GEMM_TILES = ((128, 256), (256, 128), (128, 128))


def wave_efficiency(m: int, n: int, sms: int) -> float:
    """Fraction of the GPU a GEMM with an [m, n] output keeps busy: its output tiles run in waves of one
    tile per SM, and a last partial wave leaves SMs idle (wave quantization). 1.0 when sms is 0 (unknown)."""
    if sms <= 0:
        return 1.0
    best = 0.0
    for tm, tn in GEMM_TILES:
        tiles = -(-m // tm) * -(-n // tn)
        best = max(best, tiles / (-(-tiles // sms) * sms))
    return best


def gemm_time_s(
    m: int,
    k: int,
    n: int,
    dtype_bytes: int,
    tflops: float,
    hbm_GBps: float,
    *,
    sms: int = 0,
    efficiency: float = 1.0,
) -> float:
    """Roofline of one [m, k] x [k, n] GEMM: the larger of its FLOP time and its HBM traffic time
    (reading both operands and writing the output once). The FLOP rate is the spec figure times the
    measured fraction cuBLAS reaches on large shapes (`efficiency`) times the wave efficiency on `sms`."""
    flops = 2.0 * m * k * n
    traffic = (m * k + k * n + m * n) * dtype_bytes
    rate = tflops * 1e12 * efficiency * wave_efficiency(m, n, sms)
    return max(flops / rate, traffic / (hbm_GBps * GB))


def nccl_ring_time_s(
    kind: str,
    payload_bytes: float,
    n: int,
    nodes: int,
    bus_GBps: float,
    protocols: dict,
    *,
    nvlink_step_scale: float = 1.0,
    net_step_us: float | None = None,
    multinode_ring_factor: float = 1.0,
    ll_multinode_intra_factor: float = 1.0,
) -> tuple[float, float]:
    """(bandwidth seconds, latency seconds) of one ring collective under NCCL's cost model, with the
    protocol NCCL would pick (the fastest): latency = base + intra-node steps x NVLink step + inter-node
    steps x network step; bandwidth = wire bytes / (bus bandwidth x the protocol's fraction).

    protocols: {name: (base_us, nvlink_step_us, net_step_us, bandwidth_fraction)}; nvlink_step_scale scales
    every protocol's NVLink step (a calibrated or overridden step latency); net_step_us replaces Simple's
    network step (the link preset's)."""
    if n <= 1:
        return 0.0, 0.0
    wire = collective_wire_bytes_per_gpu(kind, payload_bytes, n)
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    inter = (2 * (nodes - 1) if kind == "all_reduce" else nodes - 1) if nodes > 1 else 0
    best = None
    for name, (base, nvl, net, fraction) in protocols.items():
        nvl *= nvlink_step_scale
        if name == "simple" and net_step_us is not None:
            net = net_step_us
        if nodes > 1 and name == "ll":
            nvl *= ll_multinode_intra_factor
        lat = base + (steps - inter) * nvl + inter * net
        if nodes > 1 and name == "simple" and kind == "all_reduce":
            lat *= multinode_ring_factor
        if name == "ll" and nodes == 1 and kind != "all_reduce":
            fraction = max(fraction, 1 / 3)  # NCCL: LL reaches a third for intra-node RS / AG
        bw_s = wire / (bus_GBps * fraction * GB)
        if best is None or bw_s + lat * 1e-6 < sum(best):
            best = (bw_s, lat * 1e-6)
    return best


def overlapped_time_s(gemm_s: float, chunk_comm_s: float, chunks: int, sm_fraction: float = 0.0) -> float:
    """A GEMM split into `chunks` row chunks, the collective of chunk i (chunk_comm_s each, latency
    included) running while chunk i+1 is multiplied. While a collective runs it holds `sm_fraction` of the
    SMs, so the GEMM beside it runs that much slower: a stage takes max(c, g + f c) (the GEMM does c (1-f)
    of work while the collective runs, the rest at full speed). The first GEMM chunk and the last
    collective are never hidden; chunks=1 is the sequential sum, with no SM cost."""
    if chunks < 1:
        raise ValueError(f"tpext plan: chunks must be >= 1, got {chunks}")
    if not 0 <= sm_fraction < 1:
        raise ValueError(f"tpext plan: sm_fraction must be in [0, 1), got {sm_fraction}")
    g = gemm_s / chunks
    c = chunk_comm_s
    return g + (chunks - 1) * max(c, g + sm_fraction * c) + c


def pipelined_time_s(gemm_s: float, comm_bw_s: float, latency_s: float, chunks: int) -> float:
    """A GEMM and its collective split into `chunks` row chunks, the collective of chunk i running while
    chunk i+1 is multiplied (tpext's schedule). The first GEMM chunk and the last collective chunk are
    never hidden; every chunk's collective pays the fixed latency. chunks=1 is the sequential sum."""
    if chunks < 1:
        raise ValueError(f"tpext plan: chunks must be >= 1, got {chunks}")
    g = gemm_s / chunks
    c = comm_bw_s / chunks + latency_s if comm_bw_s > 0 else 0.0
    return g + (chunks - 1) * max(g, c) + c


def pipeline_bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle fraction of a 1F1B / GPipe schedule: (pp - 1) / (microbatches + pp - 1)."""
    return (pp - 1) / (microbatches + pp - 1)
