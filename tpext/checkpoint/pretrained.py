"""Loading pretrained models sharded: build on the meta device, parallelize, read only this rank's slices.

`from_pretrained(cls, path)` is the one call. The dense model never exists: it is built on the meta
device, `tpext.parallelize` shards its (still empty) layers, and `tpext.load_checkpoint` allocates the
local tensors and fills each from its slices of the safetensors files, one tensor at a time.

What a Hugging Face checkpoint does not hold is initialised by the model's own code, as Hugging Face's
own `from_pretrained` does it: every loaded tensor is marked ``_is_hf_initialized`` and the model's
``_init_weights`` runs on the modules that own non-persistent buffers (rotary ``inv_freq``, Gemma's
``embed_scale``, sinusoidal position tables); the ``transformers.initialization`` functions it calls
skip the marked tensors. Tied weights stay tied through parallelize and loading (one tensor, all names).

Checkpoint keys are mapped to model keys by transformers' own renaming (``rename_source_key`` with the
model's conversion mapping): base-model prefixes added or stripped, renamed keys (GPT-NeoX's
``embed_out``), and per-expert weights of mixture-of-experts checkpoints stacked and concatenated into
the fused 3-D expert tensors, slice by slice. A conversion other than stacking and concatenation is
refused, naming the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "Concatenated",
    "FileTensor",
    "Source",
    "Stacked",
    "from_pretrained",
    "hf_sources",
    "init_hf_buffers",
    "is_hf_model",
]

PathLike = str | os.PathLike
Opener = Callable[[Path], object]  # file -> an open safetensors handle (opened once per model tensor)


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, step = index.indices(size)
    if step != 1:
        raise ValueError(f"tpext: only unit-step slices are read, got {index}")
    return start, max(start, stop)


class Source:
    """A dense checkpoint tensor as the model sees it, read by slices: `read(index)` returns
    dense[index] for an index of unit-step slices, reading only that part from the files."""

    shape: tuple[int, ...]
    what: str  # the checkpoint key(s), for error messages
    where: str  # the file(s) holding them

    def read(self, index: tuple[slice, ...], opener: Opener) -> Tensor:
        raise NotImplementedError


class FileTensor(Source):
    """One tensor of one safetensors file."""

    def __init__(self, file: Path, key: str, shape: tuple[int, ...]):
        self.file, self.key, self.shape = file, key, tuple(shape)
        self.what, self.where = f"'{key}'", str(file)

    def read(self, index, opener):
        return opener(self.file).get_slice(self.key)[tuple(index)]


class Stacked(Source):
    """torch.stack(parts, dim): per-expert tensors stacked into one (transformers' MergeModulelist)."""

    def __init__(self, parts: list[Source], dim: int):
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                f"tpext: cannot stack {parts[0].what} ... ({len(parts)} tensors): their shapes differ "
                f"({sorted(shapes)})"
            )
        shape = list(parts[0].shape)
        shape.insert(dim, len(parts))
        self.parts, self.dim, self.shape = parts, dim, tuple(shape)
        self.what = f"{parts[0].what} and {len(parts) - 1} more, stacked"
        self.where = ", ".join(dict.fromkeys(p.where for p in parts))

    def read(self, index, opener):
        start, stop = _bounds(index[self.dim], self.shape[self.dim])
        rest = tuple(index[: self.dim]) + tuple(index[self.dim + 1 :])
        return torch.stack([p.read(rest, opener) for p in self.parts[start:stop]], self.dim)


class Concatenated(Source):
    """torch.cat(parts, dim): e.g. gate and up projections fused into gate_up (transformers' Concatenate)."""

    def __init__(self, parts: list[Source], dim: int):
        others = {p.shape[:dim] + p.shape[dim + 1 :] for p in parts}
        if len(others) != 1:
            raise ValueError(
                f"tpext: cannot concatenate {', '.join(p.what for p in parts)} along dim {dim}: "
                "their other dims differ"
            )
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.parts, self.dim, self.shape = parts, dim, tuple(shape)
        self.what = " + ".join(p.what for p in parts)
        self.where = ", ".join(dict.fromkeys(p.where for p in parts))

    def read(self, index, opener):
        start, stop = _bounds(index[self.dim], self.shape[self.dim])
        pieces, offset = [], 0
        for p in self.parts:
            lo, hi = max(start, offset), min(stop, offset + p.shape[self.dim])
            if lo < hi:
                sub = list(index)
                sub[self.dim] = slice(lo - offset, hi - offset)
                pieces.append(p.read(tuple(sub), opener))
            offset += p.shape[self.dim]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _natural_key(key: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def hf_sources(
    model: nn.Module, shapes: dict[str, tuple[Path, tuple[int, ...]]], model_keys: set[str]
) -> tuple[dict[str, Source], list[str], dict[str, str]]:
    """Map checkpoint tensors to the model's keys the way transformers does when it loads `model`.

    shapes: {checkpoint key: (file, shape)}. Returns ({model key: Source}, checkpoint keys that map to no
    model key, {model key: why it cannot be read}).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    present = dict.fromkeys(model_keys, True)
    sources: dict[str, Source] = {}
    unexpected: list[str] = []
    collected: dict[str, dict[str, list[str]]] = {}  # model key -> source pattern -> checkpoint keys
    for key in sorted(shapes, key=_natural_key):  # experts in index order, as transformers stacks them
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, present)
        if pattern is not None:
            collected.setdefault(target, {}).setdefault(pattern, []).append(key)
        elif target in model_keys:
            sources[target] = FileTensor(shapes[key][0], key, shapes[key][1])
        else:
            unexpected.append(key)
    refused: dict[str, str] = {}
    for target, per_pattern in collected.items():
        converter = by_pattern[next(iter(per_pattern))]
        if target not in model_keys:
            unexpected.extend(k for keys in per_pattern.values() for k in keys)
            continue
        parts = {
            p: [FileTensor(shapes[k][0], k, shapes[k][1]) for k in keys] for p, keys in per_pattern.items()
        }
        merged: list[Source] | None = None
        try:
            for op in converter.operations:
                if isinstance(op, MergeModulelist) and merged is None:
                    merged = [Stacked(parts[p], op.dim) for p in converter.source_patterns if p in parts]
                elif isinstance(op, Concatenate) and merged is not None:
                    merged = [Concatenated(merged, op.dim)]
                else:
                    raise ValueError(
                        f"transformers converts it with {type(op).__name__}, which tpext cannot read "
                        "by slices (it reads stacked and concatenated tensors)"
                    )
            if merged is None or len(merged) != 1:
                raise ValueError(
                    f"its conversion {[type(op).__name__ for op in converter.operations]} does not "
                    "give one tensor"
                )
            sources[target] = merged[0]
        except ValueError as exc:
            refused[target] = f"{exc}"
    return sources, unexpected, refused


@torch.no_grad()
def init_hf_buffers(
    model: nn.Module, loaded: list[Tensor], buffers: list[tuple[str, nn.Module, str]]
) -> None:
    """Initialise non-persistent buffers (no checkpoint holds them) with the model's own `_init_weights`,
    as transformers' from_pretrained does after loading: loaded tensors are marked ``_is_hf_initialized``
    so the init functions leave them alone. A buffer the model's init does not write (it was filled with
    NaN beforehand) is an error naming it."""
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    for t in loaded:
        t._is_hf_initialized = True
    owners: dict[str, nn.Module] = {}
    modules = dict(model.named_modules())
    for mod_name, _, _ in buffers:
        owner = model  # the nearest PreTrainedModel above the module dispatches its init (composite models)
        parts = mod_name.split(".") if mod_name else []
        for i in range(len(parts), -1, -1):
            candidate = modules.get(".".join(parts[:i]))
            if isinstance(candidate, PreTrainedModel):
                owner = candidate
                break
        owners[mod_name] = owner
    with hf_init.guard_torch_init_functions():
        for mod_name in dict.fromkeys(m for m, _, _ in buffers):
            owners[mod_name]._init_weights(modules[mod_name])
    left = [
        f"{m}.{b}" if m else b
        for m, module, b in buffers
        if getattr(module, b).is_floating_point() and torch.isnan(getattr(module, b)).any()
    ]
    if left:
        raise ValueError(
            f"tpext: the non-persistent buffer(s) {', '.join(left)} are in no checkpoint and "
            f"{type(model).__name__}._init_weights does not initialise them; build the model on a "
            "real device (then tpext.parallelize and tpext.load_checkpoint), or initialise those "
            "buffers yourself"
        )


def _hf_build(model_class, path: Path, dtype, config):
    from transformers import AutoConfig, PreTrainedModel
    from transformers import initialization as hf_init

    if config is None:
        config = AutoConfig.from_pretrained(path)
    safe_ops = getattr(hf_init, "meta_device_safe_creation_ops", nullcontext)
    with torch.device("meta"), hf_init.no_init_weights(), safe_ops():
        if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
            model = model_class._from_config(config, dtype=dtype)
        else:
            model = model_class.from_config(config, dtype=dtype)  # an Auto class
    # no_init_weights skips init_weights, and with it the ties: tie as transformers does after loading,
    # before parallelize, which keeps tied tensors tied
    model.tie_weights()
    return model


def _tpext_llama_config(path: Path):
    """tpext.models.LlamaConfig from a config.json (tpext's own, or a Hugging Face Llama one); what tpext's
    Llama cannot compute (rope scaling, another activation) is refused rather than dropped."""
    from tpext.models import LlamaConfig

    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"tpext.from_pretrained: {file} does not exist; tpext.models.LlamaForCausalLM "
            "reads its LlamaConfig from config.json (json.dump(config.to_dict(), f))"
        )
    d = json.loads(file.read_text())
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"tpext.from_pretrained: {file} asks for rope_type {rope.get('rope_type', rope.get('type'))!r}"
            "; tpext.models.LlamaForCausalLM computes the default RoPE only: load it with its "
            "Hugging Face class instead"
        )
    if "rope_theta" in rope and "rope_theta" not in d:
        d["rope_theta"] = rope["rope_theta"]
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"tpext.from_pretrained: {file} has hidden_act {d['hidden_act']!r}; tpext.models."
            "LlamaForCausalLM uses silu: load it with its Hugging Face class instead"
        )
    return LlamaConfig.from_dict(d)


def _resolve_dtype(dtype, config_dtype) -> torch.dtype:
    if dtype == "auto":
        dtype = config_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if dtype is not None else torch.get_default_dtype()


def from_pretrained(
    model_class,
    path: PathLike,
    *,
    group=None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    sequence_parallel: bool = False,
    plan="auto",
    strict: bool = True,
    config=None,
    **parallelize_kwargs,
) -> nn.Module:
    """Load a pretrained model tensor-parallel, each rank reading only its slices of the checkpoint.

    Builds the model on the meta device, `tpext.parallelize`s it, then `tpext.load_checkpoint`s the
    directory into it: no rank ever holds the dense model (peak memory: its share plus one tensor).

    Args:
        model_class: a Hugging Face model class (``LlamaForCausalLM``) or Auto class
            (``AutoModelForCausalLM``), or ``tpext.models.LlamaForCausalLM``.
        path: a local directory with ``config.json`` and ``model.safetensors`` or
            ``model.safetensors.index.json`` + shards (what ``save_pretrained`` writes).
        group: the tensor-parallel group (ProcessGroup, 1-D DeviceMesh, or None for the world).
        dtype: torch.float32 / bfloat16 / float16 (each slice is converted as it is read), "auto" for the
            config's dtype, None for torch's default dtype. Non-persistent buffers keep the dtype the
            model's own code gives them (a rotary ``inv_freq`` stays fp32).
        device: where the local tensors live (default CPU); on CUDA pass this rank's GPU, e.g.
            ``f"cuda:{local_rank}"``: each slice is read into host memory and copied to that GPU.
        sequence_parallel, plan, **parallelize_kwargs: as `tpext.parallelize`.
        strict: a checkpoint tensor the model does not have is an error (False: ignored).
        config: a config object to build from instead of ``path/config.json`` (e.g. to pick the
            attention implementation of a Hugging Face model).

    Returns:
        The parallelized model, in eval mode for a Hugging Face model (as transformers returns it).

    Raises:
        CheckpointError: a missing, misshapen or (strict) unexpected tensor, naming the key and file.
        ValueError: what tpext cannot shard or initialise, naming the module or buffer.

    Example::

        model = tpext.from_pretrained(AutoModelForCausalLM, "/ckpt/llama-3-8b", dtype=torch.bfloat16,
                                      device=f"cuda:{local_rank}", sequence_parallel=True)
    """
    import tpext
    from tpext.checkpoint.dense import load_checkpoint
    from tpext.models import LlamaForCausalLM as TpextLlama

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tpext.from_pretrained: {path} is not a directory (config.json + safetensors, "
            "as save_pretrained writes; download a hub model first, e.g. with "
            "huggingface_hub.snapshot_download)"
        )
    if isinstance(model_class, type) and issubclass(model_class, TpextLlama):
        config = config or _tpext_llama_config(path)
        model = model_class(config, device="meta", dtype=_resolve_dtype(dtype, None))
    elif hasattr(model_class, "from_config") or hasattr(model_class, "_from_config"):
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
        model = _hf_build(model_class, path, _resolve_dtype(dtype, getattr(config, "dtype", None)), config)
    else:
        raise TypeError(
            f"tpext.from_pretrained: {model_class!r} is neither a Hugging Face model class nor "
            "tpext.models.LlamaForCausalLM; for another model build it under torch.device('meta'), "
            "then tpext.parallelize(model) and tpext.load_checkpoint(model, path)"
        )
    tpext.parallelize(model, group, plan, sequence_parallel=sequence_parallel, **parallelize_kwargs)
    load_checkpoint(model, path, strict=strict, device=device)
    if is_hf_model(model):
        model.eval()
    return model
