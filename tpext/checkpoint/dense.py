"""Dense safetensors checkpoints for tensor-parallel models: shard on read, gather on save.

The checkpoint format is the dense model's, as Hugging Face writes it: one ``*.safetensors`` file or a
directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards. A checkpoint saved at
one tensor-parallel size loads at any other, because nothing in it depends on the sharding.

* `load_checkpoint(model, path)`: every rank reads only its own slices of each tensor (safetensors
  ``get_slice``; the layouts come from tpext.sharding), straight into the local parameters. A model built
  on the meta device is materialised first, so the dense weights never exist in memory.
* `gather_state_dict(model)`: the dense state dict with the dense names, on every rank.
* `save_checkpoint(model, path)`: gather, then rank 0 writes (sharded files + index above
  `max_shard_bytes`). The gather holds the dense model on every rank: fine for the models one node
  trains; beyond that save per-rank shards with torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tpext.sharding import Entry, ShardLayout, layouts

__all__ = ["load_checkpoint", "gather_state_dict", "save_checkpoint", "checkpoint_files"]

PathLike = Union[str, os.PathLike]
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the key."""


def checkpoint_files(path: PathLike) -> dict[str, Path]:
    """{tensor name: file holding it} for a .safetensors file, an index .json, or a directory with either."""
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


def _read_local(f, name: str, layout: ShardLayout) -> Tensor:
    """This rank's part of tensor `name`: only its slices are read from the file."""
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != layout.dense_shape:
        raise CheckpointError(f"tpext: checkpoint tensor '{name}' has shape {list(shape)}, the model expects the "
                              f"dense shape {list(layout.dense_shape)}")
    if not layout.is_sharded:
        return sl[tuple(slice(None) for _ in shape)]
    parts = [sl[layout.index(start, length)] for start, length in layout.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, layout.dim)


@torch.no_grad()
def load_checkpoint(model: nn.Module, path: PathLike, *, strict: bool = True,
                    device: Optional[Union[str, torch.device]] = None) -> None:
    """Fill `model` (dense or parallelized, possibly on the meta device) from a dense checkpoint.

    strict: every checkpoint tensor must belong to the model. A model tensor missing from the checkpoint,
    or of another dense shape, is always an error naming it. device: where a meta-device model is
    materialised (default: CPU). Under FSDP2 each rank keeps its data-parallel shard of what it reads.
    """
    files = checkpoint_files(path)
    entries = layouts(model)
    if any(e.tensor.is_meta for e in entries):
        _materialize(model, entries, device)
        entries = layouts(model)
    missing = [e.names for e in entries if not any(n in files for n in e.names)]
    if missing:
        shown = ", ".join(" / ".join(names) for names in missing[:8])
        raise CheckpointError(f"tpext: checkpoint {path} is missing {len(missing)} tensor(s) of the model: {shown}"
                              + (" ..." if len(missing) > 8 else ""))
    if strict:
        known = {n for e in entries for n in e.names}
        unexpected = sorted(set(files) - known)
        if unexpected:
            raise CheckpointError(f"tpext: checkpoint {path} has tensor(s) the model does not: "
                                  f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
                                  "(pass strict=False to ignore them)")
    with ExitStack() as stack:
        handles = {}
        for e in entries:
            name = next(n for n in e.names if n in files)
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            local = _read_local(handles[file], name, e.layout)
            if tuple(local.shape) != tuple(e.tensor.shape):
                raise CheckpointError(f"tpext: checkpoint tensor '{name}' gives this rank a {list(local.shape)} "
                                      f"slice, the model's local tensor is {list(e.tensor.shape)}")
            if hasattr(e.tensor, "device_mesh"):  # a DTensor (FSDP2): keep this rank's data-parallel shard
                from torch.distributed.tensor import distribute_tensor

                local = distribute_tensor(local.to(e.tensor.device), e.tensor.device_mesh, e.tensor.placements,
                                          src_data_rank=None)  # every rank holds it already: no scatter
            e.tensor.copy_(local)


def _materialize(model: nn.Module, entries: list[Entry], device) -> None:
    """Allocate the meta tensors of a model (to_empty) and tie its tied tensors again. Non-persistent buffers
    on meta (e.g. a rotary inv_freq) are in no checkpoint and would be left as uninitialised memory: refused."""
    lost = [f"{mod}.{name}" if mod else name for mod, module in model.named_modules()
            for name, buf in module.named_buffers(recurse=False)
            if buf is not None and buf.is_meta and name in getattr(module, "_non_persistent_buffers_set", set())]
    if lost:
        raise CheckpointError(f"tpext: the model has non-persistent buffers on the meta device ({', '.join(lost[:4])}"
                              f"{' ...' if len(lost) > 4 else ''}); no checkpoint holds them, so loading cannot "
                              "initialise them: create those modules (or their buffers) on a real device")
    # to_empty replaces every tensor; the ones already on a real device (a rotary module created there, as
    # the error above asks) are put back as they were.
    real = [(tensors, name, t) for module in model.modules()
            for tensors in (module._parameters, module._buffers) for name, t in tensors.items()
            if t is not None and not t.is_meta]
    model.to_empty(device=device or "cpu")
    for tensors, name, t in real:
        tensors[name] = t
    for e in entries:  # to_empty gives each module its own new tensor: tie them again
        first_module, first_name = e.owners[0]
        for module, name in e.owners[1:]:
            setattr(module, name, getattr(first_module, first_name))


def _group_of(e: Entry):
    """The group a sharded tensor is split over: tpext's modules' `group`, or `_tpext_group` of a model's
    own module that tpext converted (a q/k norm holding this rank's heads)."""
    group = getattr(e.module, "_tpext_group", None)
    return group if group is not None else getattr(e.module, "group", None)


def _full_local(t: Tensor) -> Tensor:
    """The tensor-parallel local tensor, whole: a DTensor (FSDP2 sharding over data parallel) is gathered."""
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach()


@torch.no_grad()
def gather_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The dense state dict (dense names, every name of a tied tensor) on every rank.

    Collective: every rank of the model's groups must call it. Sharded tensors are all-gathered over
    their module's group, padded to the longest local size, and put back by each rank's layout.
    """
    entries = layouts(model)
    # Every rank's layouts, once per group (layouts differ per rank: uneven, packed, replicated).
    all_layouts: dict[int, list[list[ShardLayout]]] = {}
    for e in entries:
        pg = _group_of(e)
        if e.layout.is_sharded and id(pg) not in all_layouts:
            mine = [x.layout for x in entries if x.layout.is_sharded and _group_of(x) is pg]
            gathered: list = [None] * pg.size()
            dist.all_gather_object(gathered, mine, group=pg)
            all_layouts[id(pg)] = gathered
    cursor: dict[int, int] = {}
    out: dict[str, Tensor] = {}
    for e in entries:
        local = _full_local(e.tensor)
        if not e.layout.is_sharded or _group_of(e).size() == 1:
            dense = local.clone()
        else:
            pg = _group_of(e)
            i = cursor.get(id(pg), 0)
            cursor[id(pg)] = i + 1
            rank_layouts = [per_rank[i] for per_rank in all_layouts[id(pg)]]
            dim = e.layout.dim
            longest = max(lay.local_shape[dim] for lay in rank_layouts)
            pad = [0, 0] * (local.dim() - 1 - dim) + [0, longest - local.shape[dim]]
            padded = torch.nn.functional.pad(local, pad).contiguous()
            pieces = [torch.empty_like(padded) for _ in range(pg.size())]
            dist.all_gather(pieces, padded, group=pg)
            dense = local.new_empty(e.layout.dense_shape)
            for lay, piece in zip(rank_layouts, pieces):
                lay.scatter_into(dense, piece.narrow(dim, 0, lay.local_shape[dim]))
        for name in e.names:
            out[name] = dense
    return out


def save_checkpoint(model: nn.Module, path: PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    metadata: Optional[dict[str, str]] = None) -> None:
    """Write the dense checkpoint of `model` (Hugging Face layout) from global rank 0; collective over the
    world group (every rank calls it), and a write error on rank 0 is raised on every rank.

    path ending in .safetensors: one file. Otherwise a directory: model.safetensors, or, above
    max_shard_bytes, model-0000i-of-0000n.safetensors + model.safetensors.index.json.
    A tied tensor is written once, under its first name.
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
    dist.broadcast_object_list(status, src=0)  # every rank learns the outcome, so none waits for a writer that died
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
