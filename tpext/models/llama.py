"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, optional tied embeddings,
optional Qwen3 per-head q/k norms) in dense form, with the parameter names of the Hugging Face Llama
family, so that its state dict and Hugging Face checkpoints of the same shape are interchangeable.

Attention and MLP read their head counts from module attributes (`num_heads`, `num_key_value_heads`),
not from the config: tpext.parallelize sets them to the local counts. `packed=True` stores the
projections packed, as Phi-3 does (`self_attn.qkv_proj`, `mlp.gate_up_proj`). Activations are
batch-first [b, s, h]; under sequence parallelism the sequence dim (1) is the sharded one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LlamaConfig", "LlamaForCausalLM", "PRESETS"]


@dataclass
class LlamaConfig:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    mlp_bias: bool = False
    initializer_range: float = 0.02
    packed: bool = False  # qkv_proj / gate_up_proj instead of q/k/v_proj and gate/up_proj
    qk_norm: bool = False  # Qwen3: RMSNorm of each query / key head (q_norm, k_norm over head_dim)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"tpext.models.LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"tpext.models.LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face config dict (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LlamaConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return asdict(self)


#: Shapes for the demo, tests and benches, with the default 8 query and 4 kv heads. "tiny" trains in seconds
#: on 2 CPU ranks.
PRESETS = {
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2),
    "small": LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4),
}


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [seq_len, head_dim] for positions 0..seq_len-1, computed in fp32 (fp64 if asked)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=compute) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=compute), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, heads, s, d] rotated by position (the Hugging Face rotate-half convention)."""
    return x * cos + _rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        factory = {"device": device, "dtype": dtype}
        q_out, kv_out = self.num_heads * d, self.num_key_value_heads * d
        if config.packed:
            self.qkv_proj = nn.Linear(h, q_out + 2 * kv_out, bias=bias, **factory)
        else:
            self.q_proj = nn.Linear(h, q_out, bias=bias, **factory)
            self.k_proj = nn.Linear(h, kv_out, bias=bias, **factory)
            self.v_proj = nn.Linear(h, kv_out, bias=bias, **factory)
        self.o_proj = nn.Linear(q_out, h, bias=False, **factory)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(d, config.rms_norm_eps, **factory)
            self.k_norm = LlamaRMSNorm(d, config.rms_norm_eps, **factory)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if hasattr(self, "qkv_proj"):
            q_out, kv_out = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            return self.qkv_proj(x).split([q_out, kv_out, kv_out], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._project(x)
        b, s = q.shape[:2]  # the full sequence: under SP the projections gathered it
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_key_value_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(s, self.head_dim, self.rope_theta, q.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.num_heads != self.num_key_value_heads:  # each kv head serves a group of query heads
            groups = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        factory = {"device": device, "dtype": dtype}
        if config.packed:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias, **factory)
        else:
            self.gate_proj = nn.Linear(h, i, bias=bias, **factory)
            self.up_proj = nn.Linear(h, i, bias=bias, **factory)
        self.down_proj = nn.Linear(i, h, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # both halves are sharded alike
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.self_attn = LlamaAttention(config, **factory)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.mlp = LlamaMLP(config, **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, **factory) for _ in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, **factory)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """input_ids [b, s] -> logits [b, s, V]. After tpext.parallelize the lm_head is vocab-parallel and
    the logits are this rank's vocabulary slice [b, s, V/R]; `loss` handles both."""

    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.model = LlamaModel(config, **factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Hugging Face's init: normal(0, initializer_range) weights, zero biases, unit norm weights."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.initializer_range)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, LlamaRMSNorm):
                module.weight.fill_(1.0)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.model(input_ids))

    def loss(self, logits: Tensor, input_ids: Tensor) -> Tensor:
        """Next-token cross entropy, mean over the b * (s - 1) predicted tokens; vocab-parallel logits
        are reduced without ever being gathered."""
        logits, target = logits[:, :-1], input_ids[:, 1:]
        lm_head = self.lm_head
        if getattr(lm_head, "tp_size", 1) > 1 and not getattr(lm_head, "gather_output", True):
            from tpext.nn.functional import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(
                logits, target, group=lm_head.group, vocab_size=lm_head.out_features
            )
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
