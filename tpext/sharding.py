"""Where each local parameter lives in the dense one: the layout every tpext module declares.

A tensor-parallel parameter is a concatenation of slices of its dense parameter along one dim. Plain
column/row sharding is one slice; a packed weight (QKV, gate_up) is one slice per sub-matrix; a
grouped-query k/v head replicated over several ranks is the same slice on each of them. A
`ShardLayout` records exactly that, so checkpoint loading can read only those slices, `gather_state_dict`
can rebuild the dense tensor, and the replicated heads know their gradients must be summed.

Modules keep their layouts in ``module._tpext_layouts = {param_name: ShardLayout}`` (on the module, not
the Parameter, so they survive DDP, FSDP2 and ``module.to()``). A parameter without one is replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ShardLayout",
    "Piece",
    "Entry",
    "piece_segments",
    "layouts",
    "set_layout",
    "get_layout",
    "on_set_layout",
    "gather_state_dict",
]

Segment = tuple[int, int]  # (start in the dense tensor, length) along the layout's dim


@dataclass(frozen=True)
class ShardLayout:
    """Local tensor = cat([dense.narrow(dim, start, length) for start, length in segments], dim).

    dim None means replicated: the local tensor is the whole dense tensor. `replicas` > 1 means some
    segments are held by that many ranks of the group, each computing only part of their gradient (GQA
    kv heads when tp > kv heads): the gradients of the dense ranges `reduce_ranges` (along dim) must be
    summed over their holders.
    """

    dense_shape: tuple[int, ...]
    dim: int | None = None
    segments: tuple[Segment, ...] = ()
    replicas: int = 1
    reduce_ranges: tuple[Segment, ...] = ()

    @staticmethod
    def replicated(shape: Sequence[int]) -> ShardLayout:
        return ShardLayout(tuple(shape))

    @property
    def is_sharded(self) -> bool:
        return self.dim is not None

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.dense_shape
        shape = list(self.dense_shape)
        shape[self.dim] = sum(length for _, length in self.segments)
        return tuple(shape)

    def index(self, start: int, length: int) -> tuple[slice, ...]:
        """The dense-tensor index of one segment (for safetensors' get_slice, or plain tensors)."""
        idx = [slice(None)] * len(self.dense_shape)
        idx[self.dim] = slice(start, start + length)
        return tuple(idx)

    def local_from_dense(self, dense: Tensor) -> Tensor:
        """This rank's local tensor cut from the dense one (a copy when there are several segments)."""
        if tuple(dense.shape) != self.dense_shape:
            raise ValueError(f"tpext: dense tensor must be {list(self.dense_shape)}, got {list(dense.shape)}")
        if self.dim is None:
            return dense
        parts = [dense[self.index(s, n)] for s, n in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)

    def reduce_slots(self) -> list[tuple[int, int, int]]:
        """(offset in the local tensor, offset in the reduction buffer, length) of every local segment
        inside a reduce range; the buffer is the reduce ranges concatenated (see sum_replica_grads)."""
        slots, local_offset = [], 0
        for start, length in self.segments:
            buffer_offset = 0
            for r_start, r_length in self.reduce_ranges:
                if r_start <= start < r_start + r_length:
                    slots.append((local_offset, buffer_offset + start - r_start, length))
                buffer_offset += r_length
            local_offset += length
        return slots

    def scatter_into(self, dense: Tensor, local: Tensor) -> None:
        """Write `local` into its segments of `dense` (the inverse of local_from_dense)."""
        if self.dim is None:
            dense.copy_(local)
            return
        offset = 0
        for s, n in self.segments:
            dense[self.index(s, n)].copy_(local.narrow(self.dim, offset, n))
            offset += n


@dataclass(frozen=True)
class Piece:
    """One sub-matrix of a (possibly packed) dimension: `units` blocks of `unit_size` rows each.

    A plain layer is one piece of (features, 1). A packed QKV weight is three pieces: (Hq, d), (Hkv, d),
    (Hkv, d). Each piece is sharded over the group independently, in whole units.

    Args:
        units: how many blocks (heads, groups, experts' rows) the piece holds; each rank keeps whole ones.
        unit_size: the rows (features) of one block.

    Example:
        >>> qkv = (tpext.Piece(32, 128), tpext.Piece(8, 128), tpext.Piece(8, 128))  # Hq, Hkv, Hkv heads of 128
        >>> tpext.parallelize(model, plan={"*.qkv_proj": tpext.parallel.Colwise(qkv), "*.o_proj": "rowwise"})
    """

    units: int
    unit_size: int = 1

    @property
    def size(self) -> int:
        return self.units * self.unit_size


def piece_segments(
    pieces: Sequence[Piece], world: int, rank: int, what: str
) -> tuple[tuple[Segment, ...], int, tuple[Segment, ...]]:
    """Segments of `rank` for a dim made of `pieces`, how many ranks hold a replicated one (1: none),
    and the dense ranges of the replicated pieces (whose gradients are summed over their holders).

    Per piece: unit_size 1 splits near-evenly (shard_sizes); whole heads (unit_size > 1) need units % R
    == 0, or, when R > units and R % units == 0, each unit is replicated over R / units consecutive ranks
    (rank r holds unit r // (R / units)). Anything else cannot be split without cutting a head.
    """
    from tpext.distributed import shard_range

    segments, replicas, reduce_ranges, offset = [], 1, [], 0
    for p in pieces:
        if p.unit_size == 1 or p.units % world == 0:
            start, count = shard_range(p.units, world, rank)
            segments.append((offset + start * p.unit_size, count * p.unit_size))
        elif world % p.units == 0:
            per_unit = world // p.units
            segments.append((offset + (rank // per_unit) * p.unit_size, p.unit_size))
            replicas = max(replicas, per_unit)
            reduce_ranges.append((offset, p.size))
        else:
            raise ValueError(
                f"tpext: cannot shard {what} over {world} ranks: it has {p.units} heads of {p.unit_size}, and "
                f"{world} neither divides {p.units} (shard the heads) nor is a multiple of it (replicate each "
                f"head over {world}/{p.units} ranks); pick a tensor-parallel size that does"
            )
        offset += p.size
    return tuple(segments), replicas, tuple(reduce_ranges)


#: Called with each module that gets a layout (tpext.checkpoint.dcp registers its state-dict hooks here, so
#: this module, below the checkpoints, never imports them).
_LAYOUT_OBSERVERS: list[Callable[[nn.Module], None]] = []


def on_set_layout(observer: Callable[[nn.Module], None]) -> None:
    """Call `observer(module)` whenever `set_layout` records a layout on `module` (once per observer)."""
    if observer not in _LAYOUT_OBSERVERS:
        _LAYOUT_OBSERVERS.append(observer)


def set_layout(module: nn.Module, name: str, layout: ShardLayout) -> None:
    """Record that `module`'s tensor `name` is `layout` of its dense tensor, and tell the observers.

    tpext.checkpoint.dcp observes it: the module's ``state_dict()`` then hands a sharded tensor out as a
    ShardedState (dense shape, this rank's slices, for torch.distributed.checkpoint) and ``load_state_dict()``
    takes it back, so the modules keep plain local tensors and forward is untouched.
    """
    if not hasattr(module, "_tpext_layouts"):
        module._tpext_layouts = {}
    module._tpext_layouts[name] = layout
    for observer in _LAYOUT_OBSERVERS:
        observer(module)


def get_layout(module: nn.Module, name: str, tensor: Tensor) -> ShardLayout:
    layout = getattr(module, "_tpext_layouts", {}).get(name)
    return layout if layout is not None else ShardLayout.replicated(tensor.shape)


_WRAPPER_ATTRS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _strip_wrappers(fqn: str, wrapped_by_ddp: bool) -> str:
    """Names as the dense model has them: without DDP's leading 'module.' or the attributes through which
    torch.compile, FSDP1 and activation checkpointing wrap modules."""
    parts = fqn.split(".")
    if wrapped_by_ddp and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_ATTRS)


@dataclass
class Entry:
    """One tensor of a model's state dict: every name it has (tied weights have several), where it lives."""

    names: list[str]
    module: nn.Module
    local_name: str
    tensor: Tensor
    layout: ShardLayout
    owners: list[
        tuple[nn.Module, str]
    ]  # (module, attribute) of every name, the first being (module, local_name)


def layouts(model: nn.Module) -> list[Entry]:
    """Every parameter and persistent buffer of `model` with its dense names and layout, in
    state_dict order; a tied tensor is one entry holding all its names."""
    entries: dict[int, Entry] = {}
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        persistent = [
            (n, b)
            for n, b in module.named_buffers(recurse=False)
            if n not in getattr(module, "_non_persistent_buffers_set", set())
        ]
        for name, tensor in list(module.named_parameters(recurse=False)) + persistent:
            if tensor is None:
                continue
            fqn = _strip_wrappers(f"{mod_name}.{name}" if mod_name else name, ddp)
            entry = entries.get(id(tensor))
            if entry is None:
                entries[id(tensor)] = Entry(
                    [fqn], module, name, tensor, get_layout(module, name, tensor), [(module, name)]
                )
            elif fqn not in entry.names:
                entry.names.append(fqn)
                entry.owners.append((module, name))
    return list(entries.values())


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
    """The dense state dict of a (possibly parallelized) model, on every rank.

    Collective: every rank of the model's groups must call it. Sharded tensors are all-gathered over their
    module's group, padded to the longest local size, and put back by each rank's layout.

    Args:
        model: a dense or parallelized model.

    Returns:
        {dense name: dense tensor}, with every name of a tied tensor.

    Example:
        >>> dense = tpext.checkpoint.gather_state_dict(model)  # == the unsharded model's state_dict()
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
