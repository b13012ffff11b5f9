"""Model shapes, GPU and interconnect figures the cost model starts from.

Every GPU and link figure here is a public spec-sheet number (vendor data sheets), not a measurement:
peak dense (no sparsity) tensor-core throughput, HBM capacity and bandwidth, and link bandwidth per
direction. Measured figures replace them through a calibration file (tpext/planner/calibration.py).
Where real kernels reach less than the peak, the published measurement of that fraction is used (each
with its source below); the few figures with no published measurement are marked ASSUMED.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DTYPE_BYTES",
    "ModelSpec",
    "GPUSpec",
    "LinkSpec",
    "MODELS",
    "GPUS",
    "INTER_NODE_LINKS",
    "model_preset",
    "gpu_preset",
    "inter_node_preset",
    "load_hf_config",
    "resolve_model",
    "nccl_model",
]

#: bytes per element of the dtypes the planner knows (names as torch spells them, plus short forms)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
}


def canonical_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(
            f"tpext plan: dtype must be one of {sorted(DTYPE_BYTES) + sorted(DTYPE_ALIASES)}, got {name!r}"
        )
    return name


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer: attention (GQA when kv_heads < heads) + MLP, RMSNorm, no biases.

    `gated_mlp`: SwiGLU (gate, up, down: three [hidden, intermediate] matrices, Llama) or a plain
    two-matrix MLP (GPT-3).
    """

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool = True
    # Mixture of experts (0 experts: dense). Each routed expert is a gated MLP of `expert_intermediate`;
    # `shared_intermediate`: the summed width of the always-on shared experts; `dense_layers`: leading
    # layers that keep the dense MLP of `intermediate` (DeepSeek's first_k_dense_replace).
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_layers: int = 0

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Public configs: Llama-2 7B/13B/70B (meta-llama/Llama-2-*-hf config.json), GPT-3 175B (Brown et al. 2020,
# table 2.1: d_model 12288, 96 layers, 96 heads, 4x MLP, GPT-2 BPE vocabulary), and OpenLLaMA 3B
# (openlm-research/open_llama_3b config.json) as the ~3B Llama-like model: its 32 heads divide TP up to 32,
# the range of the TP-scaling comparison in docs/planner.md.
MODELS = {
    "llama-3b": ModelSpec("llama-3b", 3200, 8640, 32, 32, 26, 32000, False),
    "llama-7b": ModelSpec("llama-7b", 4096, 11008, 32, 32, 32, 32000, False),
    "llama-13b": ModelSpec("llama-13b", 5120, 13824, 40, 40, 40, 32000, False),
    "llama-70b": ModelSpec("llama-70b", 8192, 28672, 64, 8, 80, 32000, False),
    "gpt3-175b": ModelSpec("gpt3-175b", 12288, 49152, 96, 96, 96, 50257, True, gated_mlp=False),
    # Llama 3 / 3.1 (meta-llama/Meta-Llama-3-8B, -70B config.json): GQA with 8 kv heads, 128256 vocab.
    "llama3-8b": ModelSpec("llama3-8b", 4096, 14336, 32, 8, 32, 128256, False),
    "llama3-70b": ModelSpec("llama3-70b", 8192, 28672, 64, 8, 80, 128256, False),
}


@dataclass(frozen=True)
class GPUSpec:
    """One GPU: spec-sheet peaks plus the published fractions of them that real kernels reach.

    `matmul_tflops`: dense tensor-core TFLOP/s per dtype (spec). `gemm_efficiency`: the fraction of it
    cuBLAS reaches on the best large shape (the maximum achievable matmul FLOPS, MAMF); smaller shapes lose
    more to wave quantization over `sms` multiprocessors. `attention_efficiency`: fraction of the spec
    figure flash attention reaches. `nvlink_GBps`: all-reduce bus bandwidth inside a node for large messages
    (nccl-tests busbw). `intra_latency_us`: NCCL's per-step latency of its ring/Simple protocol over NVLink.
    `measured_dtypes`: dtypes whose `matmul_tflops` were measured (already achieved figures, so no
    `gemm_efficiency` applies to them). `measured_latency_us`: the fixed cost of one collective as measured by a calibration (replaces the
    protocol model inside a node when set). `nccl_sms`: SMs an NCCL collective occupies while it runs
    beside a GEMM (what overlap costs the GEMM).
    """

    name: str
    memory_GiB: float
    matmul_tflops: dict
    hbm_GBps: float
    nvlink_GBps: float
    intra_latency_us: float = 0.0
    source: str = "public spec sheet"
    sms: int = 0
    gemm_efficiency: float = 1.0
    attention_efficiency: float = 1.0
    nccl_sms: int = 0
    measured_latency_us: float | None = None
    measured_dtypes: tuple = ()  # dtypes whose matmul_tflops a calibration measured (achieved, not spec)


# NCCL's own cost model of a ring collective (NVIDIA/nccl src/graph/tuning.cc, the ncclTopoTuneModel
# constants): latency = base + steps * per-step latency, steps = 2(n-1) for all-reduce and n-1 for
# reduce-scatter / all-gather, a network step costing more than an NVLink one; the Simple protocol reaches
# the full bus bandwidth, LL a quarter of it at a much lower latency, and NCCL takes the faster.
NCCL_PROTOCOLS = {
    # name: (base latency us, NVLink step us, network step us, fraction of the bus bandwidth)
    "simple": (8.4, 3.4, 9.6, 1.0),
    "ll": (3.6, 0.47, 2.7, 0.25),
}
# NCCL's model: a multi-node ring all-reduce with Simple pays 1.9x its latency (the "plateau effect of ring").
NCCL_MULTINODE_RING_LATENCY_FACTOR = 1.9
# NCCL's model: the LL NVLink step latency is 1.8x when the communicator spans nodes.
NCCL_LL_MULTINODE_INTRA_FACTOR = 1.8
NVLINK_LATENCY_US = NCCL_PROTOCOLS["simple"][1]


def nccl_model() -> dict:
    """The NCCL cost-model constants in use, for a plan's recorded inputs."""
    return {
        "protocols": {
            k: dict(zip(("base_us", "nvlink_step_us", "net_step_us", "bandwidth_fraction"), v))
            for k, v in NCCL_PROTOCOLS.items()
        },
        "multinode_ring_latency_factor": NCCL_MULTINODE_RING_LATENCY_FACTOR,
        "ll_multinode_intra_factor": NCCL_LL_MULTINODE_INTRA_FACTOR,
        "source": "NVIDIA/nccl src/graph/tuning.cc (ncclTopoTuneModel)",
    }


# Spec sheets: NVIDIA H100 Tensor Core GPU data sheet (SXM5 80GB: 989 TFLOP/s dense BF16/FP16, 67 TFLOP/s
# FP32, 3.35 TB/s HBM3, 132 SMs); H200 data sheet (SXM 141GB, 4.8 TB/s HBM3e, same chip and NVLink as
# H100); A100 80GB SXM4 data sheet (312 TFLOP/s BF16/FP16, 19.5 TFLOP/s FP32, 2.039 TB/s HBM2e, 108 SMs);
# V100 SXM3 32GB (DGX-2H: 125 TFLOP/s FP16 tensor, 900 GB/s HBM2, 80 SMs, NVSwitch 300 GB/s per GPU
# bidirectional). NVIDIA's "80GB" is binary: five 16 GiB HBM stacks.
# Measured fractions: MAMF (Stas Bekman's ml-engineering "maximum achievable matmul FLOPS" finder, as
# tabulated by mag-/gpu_benchmark): H100 SXM 792.1 of 989 TFLOP/s bf16 (0.80), A100 SXM 267.9 of 312
# (0.86); H200 has H100's compute, so H100's fraction. No published V100 MAMF was found: A100's fraction is
# used for it (ASSUMED). Flash attention: FlashAttention-3 paper (Shah et al. 2024): FlashAttention-2
# reaches 35% of H100's peak (FlashAttention-3 75%); FlashAttention-2 paper (Dao 2023): 50-73% of A100's
# peak (lower end used). V100 runs (Megatron-LM 2019) had no flash attention: batched GEMMs, so the GEMM
# fraction. All-reduce bus bandwidth for large messages, nccl-tests references: 8xH100 SXM5 460-480 GB/s,
# 8xA100 SXM4 230-250 GB/s (lower ends used; H200 quoted as H100). V100 NVSwitch: spec 150 GB/s per
# direction. NCCL channels: NCCL runs one SM per channel; 16 channels on NVLink nodes (ASSUMED, the order of
# NCCL's default channel count on NVSwitch systems) are taken from a GEMM running beside a collective.


def _nvlink_gpu(
    name: str, memory_GiB: float, matmul_tflops: dict, hbm_GBps: float, nvlink_GBps: float, **fractions
) -> GPUSpec:
    """A GPU of an NVLink/NVSwitch node: NVLink's per-step latency and 16 NCCL channels (above); `fractions`
    are its sms, gemm_efficiency and attention_efficiency."""
    return GPUSpec(
        name,
        memory_GiB,
        matmul_tflops,
        hbm_GBps,
        nvlink_GBps,
        intra_latency_us=NVLINK_LATENCY_US,
        nccl_sms=16,
        **fractions,
    )


# fmt: off
# name, memory GiB, dense TFLOP/s per dtype, HBM GB/s, all-reduce GB/s; SMs, GEMM and attention fractions
_H100 = _nvlink_gpu("H100", 80.0, {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 3350.0, 460.0,
                    sms=132, gemm_efficiency=0.80, attention_efficiency=0.35)
GPUS = {
    "H100": _H100,
    # H200: H100's chip (the same compute, SMs and efficiencies) with more, faster HBM.
    "H200": dataclasses.replace(_H100, name="H200", memory_GiB=141.0, hbm_GBps=4800.0),
    "A100": _nvlink_gpu("A100", 80.0, {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
                        2039.0, 230.0, sms=108, gemm_efficiency=0.86, attention_efficiency=0.50),
    "V100": _nvlink_gpu("V100", 32.0, {"float16": 125.0, "float32": 15.7},
                        900.0, 150.0, sms=80, gemm_efficiency=0.86, attention_efficiency=0.86),
}
# fmt: on


@dataclass(frozen=True)
class LinkSpec:
    """The inter-node network: NIC bandwidth per GPU (each GPU has its own NIC) per direction, and NCCL's
    per-step latency of a network hop (Simple protocol)."""

    name: str
    per_gpu_GBps: float
    latency_us: float


# Spec figures: InfiniBand NDR 400 Gb/s and HDR 200 Gb/s per port, one port per GPU (DGX H100 / DGX A100
# reference designs); AWS p5 EFA 3200 Gb/s per 8-GPU instance = 400 Gb/s per GPU. 1 Gb/s = 0.125 GB/s.
# A ring spanning nodes runs one ring per NIC, so its bus bandwidth is at most (GPUs of the group per node)
# x NIC: 8 x 50 = 400 GB/s for NDR, the lower end of the 400-450 GB/s that nccl-tests references give for
# 2+ H100 nodes with NDR. Network step latency: NCCL's model (9.6 us, Simple), the same for every link.
INTER_NODE_LINKS = {
    "ib-ndr400": LinkSpec("ib-ndr400", 50.0, NCCL_PROTOCOLS["simple"][2]),
    "ib-hdr200": LinkSpec("ib-hdr200", 25.0, NCCL_PROTOCOLS["simple"][2]),
    "efa-p5": LinkSpec("efa-p5", 50.0, NCCL_PROTOCOLS["simple"][2]),
}


def _lookup(table: dict, name: str, what: str):
    for key, value in table.items():
        if key.lower() == name.lower():
            return value
    raise ValueError(f"tpext plan: unknown {what} {name!r}; known: {', '.join(table)}")


def model_preset(name: str) -> ModelSpec:
    return _lookup(MODELS, name, "model preset")


def gpu_preset(name: str) -> GPUSpec:
    return _lookup(GPUS, name, "GPU preset")


def inter_node_preset(name: str) -> LinkSpec:
    return _lookup(INTER_NODE_LINKS, name, "inter-node link")


HF_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def require_object(data, required: tuple[str, ...], where: str) -> dict:
    """`data` (parsed JSON) when it is an object holding every key of `required`.

    Args:
        data: the parsed JSON.
        required: the keys it must hold.
        where: what and where it is, the messages' prefix ("tpext plan: model config PATH").

    Returns:
        `data`.

    Raises:
        ValueError: `data` is no object, or lacks a key; the message names the first one missing and all
            of `required`.

    Example:
        >>> require_object({"a": 1}, ("a",), "tpext plan: model config c.json")
        {'a': 1}
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key in required:
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r} (required: {', '.join(required)})")
    return data


def load_hf_config(path: str | Path) -> ModelSpec:
    """A Hugging Face config.json of a Llama-style model (gated MLP assumed), dense or MoE (Mixtral,
    Qwen-MoE, DeepSeek-MoE keys; see _moe_fields).

    `num_key_value_heads` defaults to `num_attention_heads` and `tie_word_embeddings` to false when absent,
    as in transformers' LlamaConfig; the other shape keys are required.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tpext plan: cannot read model config {path}: {e}") from e
    require_object(cfg, HF_REQUIRED, f"tpext plan: model config {path}")
    heads = cfg["num_attention_heads"]
    values = {k: cfg[k] for k in HF_REQUIRED}
    values["num_key_value_heads"] = cfg.get("num_key_value_heads") or heads
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"tpext plan: model config {path}: {key!r} must be a positive int, got {value!r}"
            )
    if values["hidden_size"] % heads:
        raise ValueError(
            f"tpext plan: model config {path}: hidden_size {values['hidden_size']} is not a "
            f"multiple of num_attention_heads {heads}"
        )
    if heads % values["num_key_value_heads"]:
        raise ValueError(
            f"tpext plan: model config {path}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {values['num_key_value_heads']}"
        )
    return ModelSpec(
        name=(
            cfg.get("_name_or_path") or (path.parent.name if path.stem == "config" else path.stem) or "model"
        ),
        hidden=values["hidden_size"],
        intermediate=values["intermediate_size"],
        heads=heads,
        kv_heads=values["num_key_value_heads"],
        layers=values["num_hidden_layers"],
        vocab=values["vocab_size"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **_moe_fields(cfg, path, values["num_hidden_layers"], values["intermediate_size"]),
    )


# Keys of the MoE configs in transformers: Mixtral (num_local_experts; experts of intermediate_size),
# Qwen2/Qwen3-MoE (num_experts, moe_intermediate_size, shared_expert_intermediate_size, decoder_sparse_step,
# mlp_only_layers), DeepSeek-MoE (n_routed_experts, n_shared_experts, moe_intermediate_size,
# first_k_dense_replace, moe_layer_freq).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _moe_fields(cfg: dict, path: Path, layers: int, intermediate: int) -> dict:
    """The MoE fields of ModelSpec from a config, or {} for a dense model; ValueError for what the planner
    does not model (naming the key and why)."""
    if cfg.get("kv_lora_rank") or cfg.get("q_lora_rank"):
        raise ValueError(
            f"tpext plan: model config {path} uses multi-head latent attention (kv_lora_rank / q_lora_rank, "
            f"DeepSeek-V2/V3): its compressed K/V projections are not modelled (their sharding under TP "
            f"differs from Llama attention); plan a Llama-style approximation with a config without them"
        )
    key = next((k for k in EXPERT_COUNT_KEYS if cfg.get(k)), None)
    if key is None:
        return {}
    experts = cfg[key]
    k = cfg.get("num_experts_per_tok")
    for name, value in ((key, experts), ("num_experts_per_tok", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"tpext plan: model config {path}: a MoE config needs {name!r} as a positive "
                f"int, got {value!r}"
            )
    expert_i = cfg.get("moe_intermediate_size") or intermediate
    shared = cfg.get("shared_expert_intermediate_size") or 0
    if cfg.get("n_shared_experts"):
        shared = cfg["n_shared_experts"] * expert_i
    dense = cfg.get("first_k_dense_replace") or 0
    step = cfg.get("decoder_sparse_step") or cfg.get("moe_layer_freq") or 1
    only_mlp = cfg.get("mlp_only_layers") or []
    if step != 1 or only_mlp and sorted(only_mlp) != list(range(len(only_mlp))):
        raise ValueError(
            f"tpext plan: model config {path}: MoE layers interleaved with dense ones "
            f"(decoder_sparse_step / moe_layer_freq = {step}, mlp_only_layers = {only_mlp}) are "
            f"not modelled; only leading dense layers are (first_k_dense_replace)"
        )
    dense = max(dense, len(only_mlp))
    if dense >= layers:
        return {}
    return {
        "experts": experts,
        "experts_per_token": k,
        "expert_intermediate": expert_i,
        "shared_intermediate": shared,
        "dense_layers": dense,
    }


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset name, or a path to a config.json (anything that exists on disk or ends in .json)."""
    if Path(name_or_path).exists() or name_or_path.endswith(".json"):
        return load_hf_config(name_or_path)
    return model_preset(name_or_path)
