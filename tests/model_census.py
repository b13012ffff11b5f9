"""The model-zoo census: every causal-LM family the pinned transformers registers, built from a tiny random
config, parallelized with `tpext.parallelize(model, plan="auto")` at tp 2 and 4 (and with sequence
parallelism), its logits, loss and every parameter gradient compared with the dense model's (fp64).

Outcomes, per family and setting:
  match          logits, loss and every gradient as the dense model's
  refused        tpext raised a ValueError naming the cause (its first line is the reason)
  mismatch       it ran, and the numbers differ: silently wrong
  crash          any other exception, in parallelize, forward or backward
  not buildable  the tiny dense model could not be built or run (transformers' side; the reason says why)

Run as a script it runs the census and writes `docs/model-support.md` and `tests/model_census_expected.json`
(`tests/test_model_census.py` checks the suite against the latter):

    PYTHONPATH=. python tests/model_census.py --write

Only public names of tpext are used (`tpext.parallelize`), so the census measures what a user gets.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from checks import perturb_

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ROOT / "tests" / "model_census_expected.json"
DOC = ROOT / "docs" / "model-support.md"
WRITE_COMMAND = "PYTHONPATH=. python tests/model_census.py --write"

WORLDS = (2, 4)
SP_WORLD = 2  # the world whose families are also run with sequence_parallel=True
BATCH, SEQ = 2, 8  # SEQ divisible by every world size (SP splits it)
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp64 models, but Hugging Face's norms compute in fp32
VOCAB = 128  # divisible by every world size: each rank's logits are an even slice

# The tiny config, by every name transformers' configs give each size (a config takes the names it has).
_HIDDEN = ("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "dim", "hidden_dim")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads")
_TINY = {
    **dict.fromkeys(_HIDDEN, 64),
    **dict.fromkeys(_LAYERS, 2),
    **dict.fromkeys(_HEADS, 8),
    "num_key_value_heads": 2,
    "head_dim": 8,
    "kv_channels": 8,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "ffn_hidden_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "rotary_dim": 4,
    "sliding_window": 4,
    "hidden_size_global": 64,
    "encoder_hash_byte_group_vocab": VOCAB,  # BLT: 500002 hash buckets by default
    # linear-attention and state-space mixers (Qwen3-Next, Kimi-Linear, Mamba hybrids)
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "state_size": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "time_step_rank": 8,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "n_ctx": 64,
    "use_cache": False,
    "tie_word_embeddings": False,
}
#: The tiny config by its usual names only, for the tests that configure a model by hand (override a field with
#: ``dict(TINY_HF, num_key_value_heads=8)``).
TINY_HF = {
    name: _TINY[name]
    for name in (
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "use_cache",
        "tie_word_embeddings",
    )
}
_NO_DROPOUT = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "activation_dropout",
)
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1, "decoder_start_token_id": 1}

# Multi-head latent attention (DeepSeek-V2's MLA and its kin): every head's keys and values come from the
# latent (kv heads = query heads), rotary over qk_rope_head_dim features (head_dim, where the config reads it
# for the rotary embedding); query / key and value heads of different sizes (8 + 4 and 6).
_MLA = {
    "num_key_value_heads": 8,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "head_dim": 4,
    "v_head_dim": 6,
}

# Per-family settings where the generic tiny config does not build or does not run (one table).
OVERRIDES: dict[str, dict[str, Any]] = {
    **dict.fromkeys(("deepseek_v2", "glm4_moe_lite", "longcat_flash", "minicpm3", "youtu"), _MLA),
    "axk1": {**_MLA, "n_group": 2, "topk_group": 1},
    "glm_moe_dsa": {**_MLA, "mlp_layer_types": ["dense", "sparse"], "index_topk": 4},
    # the second layer a mixture of experts (4 experts in 2 groups); DeepSeek-V3.2's indexer keeps 4 tokens
    "deepseek_v3": {**_MLA, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1},
    "deepseek_v32": {**_MLA, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "index_topk": 4},
    "hy_v4": {"index_topk": 4},
    # hybrids: an attention layer first, so that under SP the sequence is split there and the replicated
    # mixer after it runs on the full sequence (with mixers only there is no split point)
    # Mamba-2 mixers in 4 groups (8 heads of 16), so that tp 2 and 4 shard them by heads
    "bamba": {"attn_layer_indices": [0], "mamba_n_groups": 4},
    "jamba": {"attn_layer_offset": 0, "attn_layer_period": 2},
    "granitemoehybrid": {"layer_types": ["attention", "mamba"], "mamba_n_groups": 4},
    "nemotron_h": {"mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 4},
    "mamba2": {"head_dim": 16, "n_groups": 4},
    # d_ssm 1024 by default, not 8 heads of 16; its gated norm on and its multipliers off 1 (mup_vector sliced)
    "falcon_h1": {
        "mamba_d_ssm": None,
        "mamba_n_groups": 4,
        "mamba_rms_norm": True,
        "ssm_multipliers": [0.5, 1.5, 0.25, 2.0, 0.75],
        "ssm_in_multiplier": 0.7,
    },
    # Zamba2's layer types default to dozens of layers; a hybrid (shared attention and a mixer) first
    "zamba2": {"layers_block_type": ["hybrid", "linear_attention"], "mamba_ngroups": 4},
    "recurrent_gemma": {"block_types": ["attention", "recurrent"]},
    # BigBird: 8 tokens are too few for block-sparse attention (the model itself falls back to full attention,
    # rebuilding its attention modules in forward)
    "big_bird": {"attention_type": "original_full"},
    # Whisper: num_key_value_heads is an alias of encoder_attention_heads; the decoder's heads are the 8 query heads
    "whisper": {"num_key_value_heads": 8},
    # X-MOD: a forward needs a language (its adapters are per language)
    "xmod": {"default_language": "en_XX"},
}


VERSIONS_KEY = "_versions"  # the record's torch and transformers versions (not a family)


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def families() -> list[str]:
    """Every model type transformers registers for causal LM, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _tiny_settings(config) -> dict[str, Any]:
    """The tiny sizes among the attributes `config` has (and its sub-configs, as dicts of the same)."""
    settings = {}
    for key, value in _TINY.items():
        if key in vars(config) or key in getattr(config, "attribute_map", {}):
            settings[key] = value
    for key in _NO_DROPOUT:
        if isinstance(getattr(config, key, None), float):
            settings[key] = 0.0
    for key, value in _TOKEN_IDS.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and current >= VOCAB or isinstance(current, list):
            settings[key] = value
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            settings[key] = _tiny_settings(sub)
    return settings


def build(family: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The family's causal-LM model from a tiny config, fp64, with every weight moved off its init (biases,
    norm scales and sinks are not zeros or ones), the same on every rank."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_cls = CONFIG_MAPPING[family]
    settings = {**_tiny_settings(config_cls()), **OVERRIDES.get(family, {})}
    config = config_cls(**settings)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm takes no fp64
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    torch.manual_seed(0)
    return perturb_(model_cls(config).to(dtype).eval())


def has_tp_plan(model: torch.nn.Module) -> bool:
    """Whether the family ships Hugging Face's own base_model_tp_plan (its config's, or its text config's)."""
    config = model.config
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and getattr(c, "base_model_tp_plan", None):
            return True
    return False


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=gen) < 0.2, -100)
    return ids, labels


def _first_line(exc: BaseException) -> str:
    """The reason an exception gives: its first line (for plan='auto''s list of what it could not place, the
    list, which says more than its preamble), at most 240 characters."""
    text = str(exc).strip()
    if "could not place: " in text:
        text = "could not place: " + text.split("could not place: ", 1)[1].split(". Pass plan=", 1)[0]
    lines = text.splitlines()
    line = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return line if len(line) <= 240 else line[:237] + "..."


def dense_run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(logits, labels loss, {parameter name: gradient of the loss}) of the dense model; every name of a tied
    parameter is a key. No loss: no gradients (a parallelized model's logits may be this rank's vocabulary
    slice, so no other objective is the same on both)."""
    ids, labels = inputs()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    loss = getattr(out, "loss", None)
    grads = {}
    if loss is not None:
        loss.backward()
        grads = {
            name: p.grad.detach().clone()
            for name, p in model.named_parameters(remove_duplicate=False)
            if p.grad is not None
        }
        model.zero_grad(set_to_none=True)
    return out.logits.detach(), (loss.detach() if loss is not None else None), grads


# ---- the census, on every rank of a world (tests/dist.py) ----

_SEVERITY = ("match", "not buildable", "refused", "mismatch", "crash")


def _build_and_run(family: str):
    """(dense model, its logits, loss and gradients); fp64 where the family runs in it, fp32 otherwise."""
    try:
        dense = build(family)
        return (dense, *dense_run(dense))
    except Exception:  # noqa: BLE001 - a family that does not run in fp64 is tried in fp32
        dense = build(family, torch.float32)
        return (dense, *dense_run(dense))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dense weights, for every later build to load: a weight the model's init leaves uninitialized
    (torch.empty) differs from one build to the next, and so would the models."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _full_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The dense logits from this rank's: a vocab-parallel lm_head returns an even slice of the vocabulary."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if logits.shape[-1] == vocab or logits.shape[-1] * world != vocab:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(pieces, logits.contiguous())
    return torch.cat(pieces, dim=-1)


def _check(
    family: str, dtype: torch.dtype, state: dict, ref_logits, ref_loss, ref_grads, sequence_parallel: bool
) -> tuple[str, str]:
    """(outcome, reason) of one family at this world size: a fresh copy of the dense model (built again, with
    the dense weights loaded; some models cannot be deep-copied), parallelized, run forward and backward;
    its logits, loss and every parameter's gradient (this rank's slice of the dense one) compared."""
    import tpext

    model = build(family, dtype)
    model.load_state_dict(state)
    try:
        tpext.parallelize(model, plan="auto", sequence_parallel=sequence_parallel)
    except ValueError as exc:
        return ("refused" if str(exc).startswith("tpext") else "crash"), _first_line(exc)
    except Exception as exc:  # noqa: BLE001 - any other exception is a crash, reported
        return "crash", "in parallelize: " + _first_line(exc)
    ids, labels = inputs()
    try:
        out = model(input_ids=ids, labels=labels)
        loss = getattr(out, "loss", None)
        # backward must run; without a loss there is no objective the same on both (logits may be a slice)
        (loss if loss is not None else out.logits.float().pow(2).mean()).backward()
        logits = _full_logits(out.logits.detach(), ref_logits.shape[-1])
    except ValueError as exc:
        if str(exc).startswith("tpext"):
            return "refused", "in forward: " + _first_line(exc)
        return "crash", "in forward/backward: " + _first_line(exc)
    except Exception as exc:  # noqa: BLE001
        return "crash", "in forward/backward: " + _first_line(exc)
    if logits.shape != ref_logits.shape:
        return "mismatch", f"logits of shape {tuple(logits.shape)}, dense {tuple(ref_logits.shape)}"
    if not torch.allclose(logits.to(ref_logits.dtype), ref_logits, **TOL):
        err = (logits.to(ref_logits.dtype) - ref_logits).abs().max().item()
        return "mismatch", f"logits differ by up to {err:.3g}"
    if (loss is None) != (ref_loss is None):
        return "mismatch", f"loss is {'missing' if loss is None else 'there'}, the dense model's not"
    if loss is not None and not torch.allclose(loss.detach().to(ref_loss.dtype), ref_loss, **TOL):
        return "mismatch", f"loss {loss.item():.6g}, dense {ref_loss.item():.6g}"
    return _compare_grads(model, ref_grads)


def _compare_grads(model: torch.nn.Module, ref_grads: dict[str, torch.Tensor]) -> tuple[str, str]:
    """("match", "") when every parameter's gradient is this rank's slice of the dense gradient (by its
    tpext.sharding layout: a replicated parameter's is the whole), else ("mismatch", the first that is not)."""
    from tpext.sharding import layouts

    for e in layouts(model):
        if not isinstance(e.tensor, torch.nn.Parameter) or not e.tensor.requires_grad:
            continue
        grad, ref = e.tensor.grad, ref_grads.get(e.names[0])
        if ref is None:  # unused by the dense forward (an expert no token chose)
            if grad is not None and grad.any():
                return "mismatch", f"grad {e.names[0]}: nonzero, none in the dense model"
            continue
        if grad is None:
            return "mismatch", f"grad {e.names[0]}: none, the dense model has one"
        want = e.layout.local_from_dense(ref)
        if grad.shape != want.shape:
            return (
                "mismatch",
                f"grad {e.names[0]}: shape {tuple(grad.shape)}, dense slice {tuple(want.shape)}",
            )
        # relative to the gradient's own scale: a tensor's entries are sums over different token counts
        atol = TOL["atol"] * max(1.0, want.abs().max().item())
        if not torch.allclose(grad.to(want.dtype), want, rtol=TOL["rtol"], atol=atol):
            err = (grad.to(want.dtype) - want).abs().max().item()
            return "mismatch", f"grad {e.names[0]} differs by up to {err:.3g}"
    return "match", ""


def census_rank(names: list[str], with_sp: bool) -> dict[str, dict[str, Any]]:
    """On every rank of a world: each family's outcome at this tp size (and with sequence_parallel=True)."""
    import warnings

    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    world, rank = dist.get_world_size(), dist.get_rank()
    results: dict[str, dict[str, Any]] = {}
    for family in names:
        start = time.process_time()
        entry: dict[str, Any] = {}
        try:
            dense, ref_logits, ref_loss, ref_grads = _build_and_run(family)
        except Exception as exc:  # noqa: BLE001 - transformers' side: reported as not buildable
            results[family] = {"built": False, "reason": _first_line(exc)}
            continue
        entry["built"] = True
        entry["tp_plan"] = has_tp_plan(dense)
        dtype = ref_logits.dtype
        entry["dtype"] = str(dtype).replace("torch.", "")
        state = _state(dense)
        del dense
        try:
            entry[f"tp{world}"] = _check(family, dtype, state, ref_logits, ref_loss, ref_grads, False)
            if with_sp and entry[f"tp{world}"][0] == "match":  # SP where the family runs at all
                entry["sp"] = _check(family, dtype, state, ref_logits, ref_loss, ref_grads, True)
        except Exception as exc:  # noqa: BLE001 - the census itself must go on
            entry[f"tp{world}"] = ("crash", "in the census: " + _first_line(exc))
        entry["cpu_seconds"] = round(time.process_time() - start, 2)
        results[family] = entry
        if rank == 0 and os.environ.get("TPEXT_CENSUS_PROGRESS"):
            print(
                f"census tp={world}: {family} {entry[f'tp{world}'][0]} ({entry['cpu_seconds']} s CPU)",
                file=sys.stderr,
                flush=True,
            )
    return results


def _merge(per_rank: list[dict]) -> dict:
    """One result per family: the worst outcome any rank saw (ranks agree unless something is wrong)."""
    merged = copy.deepcopy(per_rank[0])
    for other in per_rank[1:]:
        for family, entry in other.items():
            for key, value in entry.items():
                if isinstance(value, (tuple, list)) and len(value) == 2:
                    mine = merged[family][key]
                    if _SEVERITY.index(value[0]) > _SEVERITY.index(mine[0]):
                        merged[family][key] = value
    return merged


def run_census(names: list[str] | None = None, timeout_s: float = 900.0) -> dict[str, dict]:
    """The census over `names` (default: every family): one world of SP_WORLD ranks and one per other world
    size, every family run in each (no process per family). Returns {family: entry}."""
    from dist import run_ranks

    names = families() if names is None else names
    results: dict[str, dict] = {}
    for world in WORLDS:
        part = _merge(
            run_ranks(census_rank, world, names, world == SP_WORLD, timeout_s=timeout_s, group_timeout_s=60.0)
        )
        for family, entry in part.items():
            merged = results.setdefault(family, {})
            seconds = merged.get("cpu_seconds", 0.0) + entry.pop("cpu_seconds", 0.0)
            merged.update(entry)
            if merged.get("built"):
                merged["cpu_seconds"] = round(seconds, 2)
    return results


def statuses(results: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{family: {setting: outcome}}: what tests/model_census_expected.json records."""
    out = {}
    for family, entry in sorted(results.items()):
        if not entry.get("built"):
            out[family] = {"build": "not buildable"}
        else:
            out[family] = {key: entry[key][0] for key in _settings() if key in entry}
    return out


def _settings() -> list[str]:
    return [f"tp{w}" for w in WORLDS] + ["sp"]


def summary(results: dict[str, dict]) -> dict[str, Any]:
    """Counts: buildable families, and per setting how many match / are refused / mismatch / crash, over all
    buildable families and over those that ship a TP plan."""
    built = {f: e for f, e in results.items() if e.get("built")}
    out: dict[str, Any] = {
        "families": len(results),
        "buildable": len(built),
        "with_tp_plan": sum(bool(e.get("tp_plan")) for e in built.values()),
    }
    for key in _settings():
        counts = {s: 0 for s in _SEVERITY if s != "not buildable"}
        plan_match = 0
        for entry in built.values():
            if key in entry:
                counts[entry[key][0]] += 1
                plan_match += entry[key][0] == "match" and bool(entry.get("tp_plan"))
        out[key] = {**counts, "match_with_tp_plan": plan_match}
    return out


#: Coverage plan="auto" must reach at every tp size (not under SP): the share of buildable families that
#: match, and of those that ship a TP plan.
TARGETS = {"all": 0.80, "with_tp_plan": 0.95}


def below_targets(results: dict[str, dict]) -> list[str]:
    """The tp sizes whose coverage misses TARGETS, each as a line saying by how much ([] when none)."""
    s = summary(results)
    misses = []
    for world in WORLDS:
        counts = s[f"tp{world}"]
        for what, total, matched in (
            ("all", s["buildable"], counts["match"]),
            ("with_tp_plan", s["with_tp_plan"], counts["match_with_tp_plan"]),
        ):
            if total and matched < TARGETS[what] * total:
                misses.append(
                    f"tp {world}: {matched} of {total} families ({what}) match, "
                    f"under the target {TARGETS[what]:.0%}"
                )
    return misses


def _cell(entry: dict, key: str) -> str:
    return entry[key][0] if key in entry else "-"


def markdown(results: dict[str, dict]) -> str:
    """docs/model-support.md: one row per family."""
    import transformers

    s = summary(results)
    sp_label = f"SP (tp {SP_WORLD})"
    lines = [
        '# Model support: `tpext.parallelize(model, plan="auto")` across transformers\' causal-LM families',
        "",
        f"Generated by `{WRITE_COMMAND}` (transformers {transformers.__version__}, torch {torch.__version__});",
        "do not edit by hand. `tests/test_model_census.py` runs the same census in the suite and fails on any",
        "mismatch or crash, and on any family whose outcome drops below the one recorded here.",
        "",
        "Each family registered in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from a tiny random config (hidden",
        f"size 64, 2 layers, 8 query and 2 kv heads, vocabulary {VOCAB}; per-family settings in `OVERRIDES` of",
        "`tests/model_census.py`), in fp64 where it runs in fp64, with every weight moved off its initial value.",
        'It is parallelized with `plan="auto"`; its logits, labels loss and every parameter\'s gradient (each',
        "rank's slice of the dense gradient) are compared with the dense model's (rtol "
        f"{TOL['rtol']}, atol {TOL['atol']},",
        "for gradients scaled by the gradient's largest entry where that is above 1). Outcomes:",
        "",
        "- **match**: logits, loss and every gradient as the dense model's;",
        "- **refused**: tpext raised an error naming the module and the cause (the reason column: its first line);",
        "- **mismatch**: silently different numbers (never accepted);",
        "- **crash**: any other exception (never accepted);",
        "- **not buildable**: the tiny dense model does not build or run on CPU (transformers' side).",
        "",
        "`tp_plan`: whether the family's config ships Hugging Face's own `base_model_tp_plan`. The reason shown is",
        "the first setting's that is not a match.",
        "",
        "## Summary",
        "",
        f"{s['families']} families registered, {s['buildable']} buildable, {s['with_tp_plan']} of them with a TP plan.",
        "",
        "| setting | match | refused | mismatch | crash | match, with a TP plan |",
        "|---|---|---|---|---|---|",
    ]
    for key in _settings():
        c = s[key]
        label = sp_label if key == "sp" else key.replace("tp", "tp ")
        lines.append(
            f"| {label} | {c['match']} | {c['refused']} | {c['mismatch']} | {c['crash']} | "
            f"{c['match_with_tp_plan']} of {s['with_tp_plan']} |"
        )
    lines += [
        "",
        "## Families",
        "",
        f"| family | tp_plan | tp 2 | tp 4 | {sp_label} | reason |",
        "|---|---|---|---|---|---|",
    ]
    for family, entry in sorted(results.items()):
        if not entry.get("built"):
            lines.append(f"| {family} | | not buildable | | | {_escape(entry['reason'])} |")
            continue
        reason = next((entry[k][1] for k in _settings() if k in entry and entry[k][0] != "match"), "")
        cells = " | ".join(_cell(entry, k) for k in _settings())
        lines.append(
            f"| {family} | {'yes' if entry.get('tp_plan') else 'no'} | {cells} | {_escape(reason)} |"
        )
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    names = [a for a in argv if not a.startswith("--")] or None
    os.environ.setdefault("TPEXT_CENSUS_PROGRESS", "1")
    start = time.perf_counter()
    results = run_census(names)
    elapsed = time.perf_counter() - start
    print(json.dumps(summary(results), indent=1))
    print(f"census: {len(results)} families in {elapsed:.0f}s")
    if "--write" in argv:
        if names is not None:
            print("--write needs the whole census (no family names)", file=sys.stderr)
            return 2
        record = {VERSIONS_KEY: versions(), **statuses(results)}
        EXPECTED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        DOC.write_text(markdown(results))
        print(f"wrote {EXPECTED.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")
    else:
        for family, entry in sorted(results.items()):
            print(family, {k: v for k, v in entry.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
