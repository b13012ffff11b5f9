"""Model shapes, GPU and interconnect figures the cost model starts from.

Every GPU and link figure here is a public spec-sheet number (vendor data sheets), not a measurement:
peak dense (no sparsity) tensor-core throughput, HBM capacity and bandwidth, and link bandwidth per
direction. Measured figures replace them through a calibration file (tpext/planner/calibration.py).
The few figures that are not on a spec sheet (collective latencies) are marked ASSUMED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DTYPE_BYTES", "ModelSpec", "GPUSpec", "LinkSpec", "MODELS", "GPUS", "INTER_NODE_LINKS",
    "model_preset", "gpu_preset", "inter_node_preset", "load_hf_config", "resolve_model",
]

#: bytes per element of the dtypes the planner knows (names as torch spells them, plus short forms)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "float": "float32"}


def canonical_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"tpext plan: dtype must be one of {sorted(DTYPE_BYTES) + sorted(DTYPE_ALIASES)}, "
                         f"got {name!r}")
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
}


@dataclass(frozen=True)
class GPUSpec:
    """One GPU. `matmul_tflops`: dense GEMM TFLOP/s per dtype (None: unknown). `nvlink_GBps`: bus
    bandwidth of the intra-node link per direction, the figure a ring collective can reach at best."""

    name: str
    memory_GiB: float
    matmul_tflops: dict
    hbm_GBps: float
    nvlink_GBps: float
    intra_latency_us: float = 0.0
    source: str = "public spec sheet"


# ASSUMED, not from a spec sheet: the fixed cost of one NCCL collective inside an NVLink node, of the
# order NCCL's own tests report for small messages. Only small messages (decode) are sensitive to it.
NVLINK_LATENCY_US = 8.0

# Spec sheets: NVIDIA H100 Tensor Core GPU data sheet (SXM5 80GB: 989 TFLOP/s dense BF16/FP16, 67 TFLOP/s
# FP32, 3.35 TB/s HBM3, NVLink 4 900 GB/s bidirectional = 450 GB/s per direction); H200 data sheet (SXM
# 141GB, 4.8 TB/s HBM3e, same compute and NVLink as H100); A100 80GB SXM4 data sheet (312 TFLOP/s BF16/FP16,
# 19.5 TFLOP/s FP32, 2.039 TB/s HBM2e, NVLink 3 600 GB/s bidirectional). NVIDIA's "80GB" is binary: five
# 16 GiB HBM stacks (nvidia-smi shows about 79.6 GiB usable on an H100).
GPUS = {
    "H100": GPUSpec("H100", 80.0, {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 3350.0, 450.0,
                    intra_latency_us=NVLINK_LATENCY_US),
    "H200": GPUSpec("H200", 141.0, {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 4800.0, 450.0,
                    intra_latency_us=NVLINK_LATENCY_US),
    "A100": GPUSpec("A100", 80.0, {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}, 2039.0, 300.0,
                    intra_latency_us=NVLINK_LATENCY_US),
}


@dataclass(frozen=True)
class LinkSpec:
    """The inter-node network: bandwidth per GPU (each GPU has its own NIC) per direction."""

    name: str
    per_gpu_GBps: float
    latency_us: float


# Spec figures: InfiniBand NDR 400 Gb/s and HDR 200 Gb/s per port, one port per GPU (DGX H100 / DGX A100
# reference designs); AWS p5 EFA 3200 Gb/s per 8-GPU instance = 400 Gb/s per GPU. 1 Gb/s = 0.125 GB/s.
# ASSUMED latency: a cross-node collective step costs more than an NVLink one (NIC + switch hops).
INTER_NODE_LINKS = {
    "ib-ndr400": LinkSpec("ib-ndr400", 50.0, 20.0),
    "ib-hdr200": LinkSpec("ib-hdr200", 25.0, 20.0),
    "efa-p5": LinkSpec("efa-p5", 50.0, 30.0),
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


def load_hf_config(path: str | Path) -> ModelSpec:
    """A Hugging Face config.json of a Llama-style model (gated MLP assumed).

    `num_key_value_heads` defaults to `num_attention_heads` and `tie_word_embeddings` to false when absent,
    as in transformers' LlamaConfig; the other shape keys are required.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tpext plan: cannot read model config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"tpext plan: model config {path} must hold a JSON object, got {type(cfg).__name__}")
    for key in HF_REQUIRED:
        if key not in cfg:
            raise ValueError(f"tpext plan: model config {path} is missing the key {key!r} "
                             f"(required: {', '.join(HF_REQUIRED)})")
    heads = cfg["num_attention_heads"]
    values = {k: cfg[k] for k in HF_REQUIRED}
    values["num_key_value_heads"] = cfg.get("num_key_value_heads") or heads
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tpext plan: model config {path}: {key!r} must be a positive int, "
                             f"got {value!r}")
    if values["hidden_size"] % heads:
        raise ValueError(f"tpext plan: model config {path}: hidden_size {values['hidden_size']} is not a "
                         f"multiple of num_attention_heads {heads}")
    if heads % values["num_key_value_heads"]:
        raise ValueError(f"tpext plan: model config {path}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {values['num_key_value_heads']}")
    return ModelSpec(
        name=(cfg.get("_name_or_path") or (path.parent.name if path.stem == "config" else path.stem)
              or "model"),
        hidden=values["hidden_size"], intermediate=values["intermediate_size"], heads=heads,
        kv_heads=values["num_key_value_heads"], layers=values["num_hidden_layers"],
        vocab=values["vocab_size"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset name, or a path to a config.json (anything that exists on disk or ends in .json)."""
    if Path(name_or_path).exists() or name_or_path.endswith(".json"):
        return load_hf_config(name_or_path)
    return model_preset(name_or_path)
