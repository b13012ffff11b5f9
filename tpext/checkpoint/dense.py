"""Dense safetensors checkpoints for tensor-parallel models: shard on read, gather on save.

The checkpoint format is the dense model's, as Hugging Face writes it: one ``*.safetensors`` file or a
directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards. A checkpoint saved at
one tensor-parallel size loads at any other, because nothing in it depends on the sharding.

* `load_checkpoint(model, path)`: every rank reads only its own slices of each tensor (safetensors
  ``get_slice``; the layouts come from tpext.sharding), straight into the local parameters. A model built
  on the meta device is materialised first, so the dense weights never exist in memory.
* `gather_state_dict(model)` (from tpext.sharding): the dense state dict with the dense names, on every rank.
* `save_checkpoint(model, path)`: gather, then rank 0 writes (sharded files + index above
  `max_shard_bytes`). The gather holds the dense model on every rank: fine for the models one node
  trains; beyond that save per-rank shards with torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tpext.sharding import Entry, ShardLayout, gather_state_dict, layouts

__all__ = ["checkpoint_files", "gather_state_dict", "load_checkpoint", "save_checkpoint"]

PathLike = str | os.PathLike
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the key and the way out.

    A ValueError, raised by `load_checkpoint` (and `tpext.from_pretrained`, which loads through it) and
    `checkpoint_files`: a missing file or index, a missing or unexpected key, a shape that is not the dense
    one, a tensor left on the meta device.

    Example:
        >>> try:
        ...     tpext.load_checkpoint(model, "ckpt/")
        ... except tpext.checkpoint.CheckpointError as err:
        ...     print(err)  # names the key
    """


def checkpoint_files(path: PathLike) -> dict[str, Path]:
    """Where each tensor of a dense safetensors checkpoint is stored.

    Args:
        path: a .safetensors file, a ``model.safetensors.index.json``, or a directory holding either.

    Returns:
        {tensor name: path of the file holding it}.

    Raises:
        CheckpointError: the path does not exist, a directory holds neither file, or a .json has no
            ``weight_map``.

    Example:
        >>> files = tpext.checkpoint.checkpoint_files("llama-3-8b/")
    """
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            path = path / INDEX_NAME
        elif (path / SINGLE_NAME).is_file():
            path = path / SINGLE_NAME
        else:
            raise CheckpointError(f"tpext: no {SINGLE_NAME} or {INDEX_NAME} in directory {path}")
    if not path.is_file():
        raise CheckpointError(f"tpext: checkpoint {path} does not exist")
    if path.suffix == ".json":
        with open(path) as f:
            index = json.load(f)
        if "weight_map" not in index:
            raise CheckpointError(f"tpext: {path} is not a safetensors index (no 'weight_map')")
        return {name: path.parent / file for name, file in index["weight_map"].items()}
    with safe_open(str(path), framework="pt") as f:
        return {name: path for name in f.keys()}


def _read_local(source, layout: ShardLayout, opener) -> Tensor:
    """This rank's part of a dense checkpoint tensor: only its slices are read from the files."""
    if tuple(source.shape) != layout.dense_shape:
        raise CheckpointError(
            f"tpext: checkpoint tensor {source.what} has shape {list(source.shape)}, the model "
            f"expects the dense shape {list(layout.dense_shape)} (in {source.where})"
        )
    if not layout.is_sharded:
        return source.read(tuple(slice(None) for _ in source.shape), opener)
    parts = [source.read(layout.index(start, length), opener) for start, length in layout.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, layout.dim)


def _sources(model: nn.Module, files: dict[str, Path], model_keys: set[str]):
    """{model key: Source}, the checkpoint keys no model key takes, and {model key: why it is unreadable}.
    A Hugging Face model's keys go through transformers' own renaming (prefixes, renamed and fused keys)."""
    from tpext.checkpoint.pretrained import FileTensor, hf_sources, is_hf_model

    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                if files.get(key) == file:
                    shapes[key] = (file, tuple(f.get_slice(key).get_shape()))
    if is_hf_model(model):
        return hf_sources(model, shapes, model_keys)
    sources = {k: FileTensor(file, k, shape) for k, (file, shape) in shapes.items() if k in model_keys}
    return sources, [k for k in shapes if k not in model_keys], {}


@torch.no_grad()
def load_checkpoint(
    model: nn.Module, path: PathLike, *, strict: bool = True, device: str | torch.device | None = None
) -> None:
    """Fill `model` (dense or parallelized, possibly on the meta device) from a dense checkpoint.

    Every rank reads only its own slices, one model tensor at a time (each file is opened for that
    tensor and closed after it, so the pages of its memory map never add up to more than one tensor),
    and each slice is converted to the model tensor's dtype and device as it is copied in.

    A meta-device model is materialised on `device` (default: CPU). Non-persistent buffers (no
    checkpoint holds them) are initialised by a Hugging Face model's own ``_init_weights``, as
    transformers' from_pretrained does; for other models they must not be on the meta device.
    Hugging Face checkpoint keys are mapped as transformers maps them (base-model prefix added or
    stripped, renamed keys, per-expert weights fused). Under FSDP2 each rank keeps its data-parallel
    shard of what it reads.

    Args:
        model: a dense or parallelized model, possibly on the meta device; filled in place.
        path: a .safetensors file, an index .json, or a directory holding either (`checkpoint_files`).
        strict: every checkpoint tensor must belong to the model (False: extra tensors are ignored).
        device: where a meta-device model is materialised (default: CPU).

    Raises:
        CheckpointError: a model tensor missing from the checkpoint, of another dense shape, or (strict)
            a checkpoint tensor the model does not have, naming the key (and the file).

    Example:
        >>> with torch.device("meta"):
        ...     model = AutoModelForCausalLM.from_config(config)
        >>> tpext.parallelize(model)
        >>> tpext.checkpoint.load_checkpoint(model, "llama-3-8b/", device="cuda")
    """
    from tpext.checkpoint.pretrained import init_hf_buffers, is_hf_model

    files = checkpoint_files(path)
    entries = layouts(model)
    lost = []
    if any(e.tensor.is_meta for e in entries) or _meta_buffers(model):
        lost = _materialize(model, entries, device, allow_lost=is_hf_model(model))
        entries = layouts(model)
    model_keys = {n for e in entries for n in e.names}
    sources, unexpected, refused = _sources(model, files, model_keys)
    bad = [f"{n}: {refused[n]}" for e in entries for n in e.names if n in refused]
    if bad:
        raise CheckpointError(
            f"tpext: checkpoint {path}: cannot read {'; '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}; load the dense model with its own "
            "from_pretrained, then tpext.parallelize it"
        )
    missing = [e.names for e in entries if not any(n in sources for n in e.names)]
    if missing:
        shown = ", ".join(" / ".join(names) for names in missing[:8])
        raise CheckpointError(
            f"tpext: checkpoint {path} is missing {len(missing)} tensor(s) of the model: {shown}"
            + (" ..." if len(missing) > 8 else "")
        )
    if strict and unexpected:
        raise CheckpointError(
            f"tpext: checkpoint {path} has tensor(s) the model does not: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
            "(pass strict=False to ignore them)"
        )
    for e in entries:
        source = sources[next(n for n in e.names if n in sources)]
        with _Opener() as opener:  # the files of this tensor only: closed (unmapped) before the next one
            local = _read_local(source, e.layout, opener)
        if tuple(local.shape) != tuple(e.tensor.shape):
            raise CheckpointError(
                f"tpext: checkpoint tensor {source.what} ({source.where}) gives this rank a "
                f"{list(local.shape)} slice, the model's local tensor is {list(e.tensor.shape)}"
            )
        if hasattr(e.tensor, "device_mesh"):  # a DTensor (FSDP2): keep this rank's data-parallel shard
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(
                local.to(e.tensor.device), e.tensor.device_mesh, e.tensor.placements, src_data_rank=None
            )  # every rank holds it already: no scatter
        e.tensor.copy_(local)  # converts dtype and device, one slice at a time
        del local
    if lost:
        init_hf_buffers(model, [e.tensor for e in entries], lost)


class _Opener(ExitStack):
    """Opens each safetensors file once, on first use; closes them all on exit."""

    def __init__(self):
        super().__init__()
        self.handles: dict[Path, object] = {}

    def __call__(self, file: Path):
        if file not in self.handles:
            self.handles[file] = self.enter_context(safe_open(str(file), framework="pt"))
        return self.handles[file]


def _meta_buffers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, buffer name) of every non-persistent buffer on the meta device."""
    return [
        (mod, module, name)
        for mod, module in model.named_modules()
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None and buf.is_meta and name in getattr(module, "_non_persistent_buffers_set", set())
    ]


def _materialize(model: nn.Module, entries: list[Entry], device, allow_lost: bool = False) -> list:
    """Allocate the meta tensors of a model (to_empty) and tie its tied tensors again. Non-persistent buffers
    on meta (e.g. a rotary inv_freq) are in no checkpoint: with allow_lost (a model whose own init code
    computes them) they are returned, floating ones filled with NaN so that a buffer its init misses is
    caught; otherwise they would be left as uninitialised memory, and are refused."""
    lost = _meta_buffers(model)
    if lost and not allow_lost:
        names = [f"{m}.{b}" if m else b for m, _, b in lost]
        raise CheckpointError(
            f"tpext: the model has non-persistent buffers on the meta device ({', '.join(names[:4])}"
            f"{' ...' if len(names) > 4 else ''}); no checkpoint holds them, so loading cannot "
            "initialise them: create those modules (or their buffers) on a real device"
        )
    # to_empty replaces every tensor; the ones already on a real device (a rotary module created there, as
    # the error above asks) are put back as they were.
    real = [
        (tensors, name, t)
        for module in model.modules()
        for tensors in (module._parameters, module._buffers)
        for name, t in tensors.items()
        if t is not None and not t.is_meta
    ]
    model.to_empty(device=device or "cpu")
    for tensors, name, t in real:
        tensors[name] = t
    for e in entries:  # to_empty gives each module its own new tensor: tie them again
        first_module, first_name = e.owners[0]
        for module, name in e.owners[1:]:
            setattr(module, name, getattr(first_module, first_name))
    for _, module, name in lost:
        buf = getattr(module, name)
        if buf.is_floating_point():
            buf.fill_(float("nan"))
    return lost


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the dense checkpoint of `model` (Hugging Face layout) from global rank 0.

    Collective over the world group (every rank calls it); a write error on rank 0 is raised on every rank.
    A tied tensor is written once, under its first name.

    Args:
        model: a dense or parallelized model.
        path: ending in .safetensors: one file. Otherwise a directory: model.safetensors, or, above
            `max_shard_bytes`, model-0000i-of-0000n.safetensors + model.safetensors.index.json.
        max_shard_bytes: the largest file of a sharded directory checkpoint.
        metadata: str -> str pairs stored in each file's header.

    Raises:
        CheckpointError: rank 0 could not write (raised on every rank, naming the path).

    Example:
        >>> tpext.checkpoint.save_checkpoint(model, "out/")  # load back with load_checkpoint at any tp size
    """
    state = gather_state_dict(model)
    if not dist.is_initialized():
        _write(state, Path(path), max_shard_bytes, {"format": "pt", **(metadata or {})})
        return
    error = None
    if dist.get_rank() == 0:
        try:
            _write(state, Path(path), max_shard_bytes, {"format": "pt", **(metadata or {})})
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(exc).__name__}: {exc}"
    status = [error]
    dist.broadcast_object_list(
        status, src=0
    )  # every rank learns the outcome, so none waits for a writer that died
    if status[0] is not None:
        raise RuntimeError(f"tpext.save_checkpoint: rank 0 could not write {path}: {status[0]}")


def _write(state: dict[str, Tensor], path: Path, max_shard_bytes: int, metadata: dict[str, str]) -> None:
    unique: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        if id(t) not in seen:
            seen.add(id(t))
            unique[name] = t.contiguous()
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(unique, str(path), metadata=metadata)
        return
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in unique.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(unique, str(path / SINGLE_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in unique.values())
    with open(path / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
