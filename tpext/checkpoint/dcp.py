"""PyTorch Distributed Checkpoint (DCP) for tensor-parallel models and their optimizers.

The standard flow works unchanged on a parallelized model::

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    ...
    dcp.load(state, checkpoint_id=path)          # at any tp size, or no_dist=True into a dense model
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

How: the modules keep plain local tensors. Where `tpext.sharding.set_layout` records a layout it also
installs two state-dict hooks on the module: ``state_dict()`` hands out each sharded tensor as a
`ShardedState`, a tensor of the *dense* shape that holds only this rank's slices and tells DCP where they
sit (DCP's ``__create_write_items__`` / ``__create_chunk_list__`` / ``__get_tensor_shard__`` protocol, one
chunk per segment, so packed QKV / gate_up pieces and uneven splits are exact); ``load_state_dict()`` turns
it back into the local tensor after checking it is this rank's slice. Optimizers get the same pair of
hooks (installed on their first step), so AdamW's exp_avg / exp_avg_sq and SGD's momentum travel with
their parameter's layout. DCP dedupes write items by (key, offset): data-parallel replicas, and GQA kv
heads that several tp ranks hold, are written once. Nothing is gathered.

Under FSDP2 (``fully_shard`` on the data-parallel dim) a parameter is a DTensor over dp whose global
tensor is the tp-local one; its ``Shard(0)`` rows are intersected with the segments.

docs/checkpoints.md tells why this design and not DTensor, and what is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from tpext.checkpoint import dcp_guards
from tpext.sharding import ShardLayout, on_set_layout

__all__ = ["ShardedState", "install_optimizer_hooks", "install_state_dict_hooks", "local_state"]

Window = tuple[int, int] | None  # (first row, rows) of the tp-local tensor this rank holds (FSDP2), None: all
Chunk = tuple[
    tuple[int, ...], tuple[int, ...], int, int, int
]  # dense offsets, sizes, local dim, start, length


def _chunks(layout: ShardLayout, window: Window) -> tuple[Chunk, ...]:
    """The dense boxes this rank holds, each with where it sits in the local tensor (a narrow of one dim)."""
    shape, dim = layout.dense_shape, layout.dim
    r0, rows = window if window is not None else (0, layout.local_shape[0])
    out, local_offset = [], 0
    for start, length in layout.segments:
        offsets, sizes = [0] * len(shape), list(shape)
        if dim == 0:  # the window and the segments cut the same dim: keep their intersection
            a, b = max(local_offset, r0), min(local_offset + length, r0 + rows)
            if b > a:
                offsets[0], sizes[0] = start + a - local_offset, b - a
                out.append((tuple(offsets), tuple(sizes), 0, a - r0, b - a))
        elif rows > 0 and length > 0:
            offsets[0], sizes[0] = r0, rows
            offsets[dim], sizes[dim] = start, length
            out.append((tuple(offsets), tuple(sizes), dim, local_offset, length))
        local_offset += length
    return tuple(out)


class ShardedState(Tensor):
    """A state-dict entry of a sharded tensor: the dense shape, this rank's data, and where it sits.

    Not a tensor to compute with: it only moves (detach, clone, .to(), copy_ from another ShardedState of
    the same slices or from the dense tensor) and answers DCP's chunk protocol. ``.local`` is this rank's
    tensor; ``.shard_layout`` its `ShardLayout`; ``.window`` the rows of it this rank holds under FSDP2.
    Made by the state-dict hooks of a parallelized model, not by users.

    Args:
        local: this rank's tensor.
        layout: where it sits in the dense tensor (its segments along one dim).
        window: under FSDP2, the (start, length) rows of `local` this rank holds; None for all of them.

    Example:
        >>> entry = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
        >>> entry.shape, entry.local.shape   # dense, and this rank's rows
        (torch.Size([1024, 256]), torch.Size([512, 256]))
    """

    local: Tensor
    shard_layout: ShardLayout
    window: Window

    @staticmethod
    def __new__(cls, local: Tensor, layout: ShardLayout, window: Window = None) -> ShardedState:
        t = Tensor._make_wrapper_subclass(
            cls, layout.dense_shape, dtype=local.dtype, device=local.device, requires_grad=False
        )
        t.local, t.shard_layout, t.window = local, layout, window
        return t

    def __repr__(self) -> str:
        lay = self.shard_layout
        return (
            f"ShardedState(dense={list(lay.dense_shape)}, dim={lay.dim}, segments={list(lay.segments)}, "
            f"window={self.window}, local={list(self.local.shape)})"
        )

    # ----- DCP's protocol for tensors that know their chunks (the one DTensor implements)
    def _views(self):
        for offsets, sizes, dim, start, length in _chunks(self.shard_layout, self.window):
            yield offsets, sizes, self.local.narrow(dim, start, length)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(self.local)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=props,
                    size=self.size(),
                ),
            )
            for offsets, sizes, _ in self._views()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [
            ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            for offsets, sizes, _ in self._views()
        ]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        for offsets, _, view in self._views():
            if torch.Size(offsets) == index.offset:
                return view  # a view of the local tensor: DCP's load copies straight into it
        raise ValueError(
            f"tpext: no chunk of '{index.fqn}' at offset {list(index.offset or [])} on this rank "
            f"(it holds {[list(o) for o, _, _ in self._views()]})"
        )

    # ----- pickling (per-rank torch.save): the slices travel with their layout, so a load at another tp fails
    def __reduce_ex__(self, protocol):
        lay = self.shard_layout
        return (
            _rebuild,
            (
                self.local,
                lay.dense_shape,
                lay.dim,
                lay.segments,
                lay.replicas,
                lay.reduce_ranges,
                self.window,
            ),
        )

    # ----- the few operations a state dict goes through
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        me = args[0]
        if not isinstance(
            me, ShardedState
        ):  # e.g. dense.copy_(sharded): the dense tensor is not on this rank
            other = next(a for a in args if isinstance(a, ShardedState))
            raise NotImplementedError(
                f"tpext: {func} with a ShardedState argument (this rank's slices of a tensor-parallel tensor, "
                f"dense shape {list(other.shape)}) into a plain tensor: the dense tensor is not on this rank. Use "
                "tpext.gather_state_dict(model) for dense tensors, or torch.distributed.checkpoint to load"
            )
        if func in (aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default):
            return ShardedState(func(me.local, *args[1:], **kwargs), me.shard_layout, me.window)
        if func is aten.new_empty.default:  # async_save's staging: new_empty, then sets .local itself
            return ShardedState(me.local.new_empty(me.local.shape, **kwargs), me.shard_layout, me.window)
        if func is aten.copy_.default:
            src = args[1]
            if isinstance(src, ShardedState):
                if (src.shard_layout, src.window) != (me.shard_layout, me.window):
                    raise ValueError(
                        f"tpext: cannot copy_ a ShardedState of other slices ({src!r}) into {me!r}"
                    )
                me.local.copy_(src.local)
            else:  # the dense tensor: take this rank's slices of it
                for offsets, sizes, view in me._views():
                    view.copy_(src[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])
            return me
        if func is aten.is_pinned.default:
            return func(me.local, *args[1:], **kwargs)
        if func is aten.is_same_size.default:
            return tuple(args[0].shape) == tuple(args[1].shape)
        raise NotImplementedError(
            f"tpext: {func} on a ShardedState (a state-dict entry of a tensor-parallel tensor, dense shape "
            f"{list(me.shard_layout.dense_shape)}, holding only this rank's slices). Use .local for this rank's "
            "tensor, tpext.gather_state_dict(model) for the dense one, or torch.distributed.checkpoint to save or "
            "load it"
        )


def _rebuild(local, dense_shape, dim, segments, replicas, reduce_ranges, window) -> ShardedState:
    return ShardedState(
        local,
        ShardLayout(
            tuple(dense_shape), dim, tuple(map(tuple, segments)), replicas, tuple(map(tuple, reduce_ranges))
        ),
        None if window is None else tuple(window),
    )


torch.serialization.add_safe_globals([_rebuild, ShardedState])


# ----- from a module's tensor to a state-dict entry, and back


def _needs_wrapping(layout: ShardLayout) -> bool:
    """A sharded layout that is not the whole dense tensor (tp=1 keeps plain tensors)."""
    return layout.is_sharded and layout.local_shape != layout.dense_shape


def _window(tensor: Tensor, layout: ShardLayout, key: str) -> Window:
    """The rows of the tp-local tensor held here when `tensor` is FSDP2's DTensor over data parallel."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return None
    if tuple(tensor.shape) != layout.local_shape:
        raise ValueError(
            f"tpext: '{key}' is a DTensor of global shape {list(tensor.shape)}, its tensor-parallel "
            f"layout says {list(layout.local_shape)}: the DTensor must span data parallel only"
        )
    if all(isinstance(p, Replicate) for p in tensor.placements):
        return None
    if [p for p in tensor.placements if not isinstance(p, Replicate)] != [Shard(0)]:
        raise ValueError(
            f"tpext: '{key}' is a DTensor with placements {tensor.placements}; checkpoints of "
            "tensor-parallel tensors support data-parallel Shard(0) (FSDP2) or Replicate only"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return (offset[0], shape[0])


def to_state(value: Tensor, layout: ShardLayout, key: str, like: Tensor | None = None) -> Tensor:
    """A module's (or optimizer's) tensor as its state-dict entry: a ShardedState when sharded."""
    if not _needs_wrapping(layout) or isinstance(value, ShardedState):
        return value
    like = value if like is None else like
    window = _window(like, layout, key)
    local = value.to_local() if hasattr(value, "to_local") else value
    if window is None and tuple(local.shape) != layout.local_shape:
        return value  # not the parameter's shape (a scalar optimizer state): as it is
    return ShardedState(local, layout, window)


def from_state(value: Any, layout: ShardLayout, key: str, current: Tensor) -> Any:
    """A state-dict entry ready for `current`'s own load: its local tensor (as a DTensor under FSDP2)."""
    if not _needs_wrapping(layout):
        if isinstance(value, ShardedState):
            raise ValueError(
                f"tpext: '{key}' in the state dict is the tensor-parallel slice {value!r}, but this "
                f"model holds the whole tensor {list(layout.dense_shape)}: a per-rank save cannot "
                "be loaded at another tensor-parallel size; save with torch.distributed.checkpoint "
                "(dcp.save), which reshards on load"
            )
        return value
    window = _window(current, layout, key)
    if isinstance(value, ShardedState):
        if (value.shard_layout, value.window) != (layout, window):
            saved = value.shard_layout
            raise ValueError(
                f"tpext: '{key}' in the state dict holds the slices {list(saved.segments)} (dim {saved.dim}, rows "
                f"{value.window}) of the dense {list(saved.dense_shape)}, this rank "
                f"holds {list(layout.segments)} (dim {layout.dim}, rows {window}) of {list(layout.dense_shape)}: "
                "a per-rank save (torch.save(model.state_dict())) loads only at the same tensor-parallel size and "
                "rank; save with torch.distributed.checkpoint (dcp.save), which reshards on load"
            )
        local = value.local
    elif (
        isinstance(value, Tensor)
        and tuple(value.shape) == layout.dense_shape
        and tuple(current.shape) != layout.dense_shape
    ):
        local = layout.local_from_dense(value)  # a dense state dict: take this rank's slices
        if window is not None:
            local = local.narrow(0, window[0], window[1])
    else:
        return value  # this rank's plain local tensor: the module checks its shape
    if hasattr(current, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local.to(current.device),
            current.device_mesh,
            current.placements,
            shape=current.shape,
            stride=current.stride(),
            run_check=False,
        )
    return local


# ----- module hooks (installed by tpext.sharding.set_layout)

_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    _MODULES.add(module)  # a copy.deepcopy of a module carries its hooks, not its place in _MODULES
    for name, layout in getattr(module, "_tpext_layouts", {}).items():
        key = prefix + name
        if key in state_dict:
            state_dict[key] = to_state(state_dict[key], layout, key)


def _load_pre_hook(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    for name, layout in getattr(module, "_tpext_layouts", {}).items():
        key = prefix + name
        current = module._parameters.get(name, module._buffers.get(name))
        if key in state_dict and current is not None:
            state_dict[key] = from_state(state_dict[key], layout, key, current)


def install_state_dict_hooks(module: nn.Module) -> None:
    """Make `module.state_dict()` hand out its sharded tensors as ShardedState and `load_state_dict` take
    them back (also a dense tensor, sliced). Idempotent; called by tpext.sharding.set_layout (observed)."""
    _MODULES.add(module)
    _install_optimizer_step_hook()
    dcp_guards.guard_safetensors_writers()
    dcp_guards.guard_full_state_dict(ShardedState)
    dcp_guards.register_modules_of_state_dict_calls(_MODULES)
    if getattr(module, "_tpext_state_hooks", False):
        return
    module.register_state_dict_post_hook(_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_load_pre_hook)
    module._tpext_state_hooks = True


on_set_layout(install_state_dict_hooks)  # every module that gets a layout from now on


# ----- optimizer hooks: the state of a sharded parameter travels with the parameter's layout


def _param_layouts() -> dict[int, tuple[ShardLayout, Tensor]]:
    out = {}
    for module in list(_MODULES):
        for name, layout in getattr(module, "_tpext_layouts", {}).items():
            p = module._parameters.get(name)
            if p is not None and _needs_wrapping(layout):
                out[id(p)] = (layout, p)
    return out


def _optim_state_dict_post_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    known = _param_layouts()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for pid, state in state_dict["state"].items():
        found = known.get(id(params[pid]))
        if found is not None:  # new dicts: the packed state's dicts are the optimizer's own
            layout, p = found
            state = {
                k: to_state(v, layout, f"optimizer state '{k}' of parameter {pid}", like=p)
                if isinstance(v, Tensor) and v.dim() > 0
                else v
                for k, v in state.items()
            }
        out[pid] = state
    return {**state_dict, "state": out}


def _optim_load_pre_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    known = _param_layouts()
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip(saved_ids, params))
    state = {}
    for pid, entry in state_dict["state"].items():
        p = by_id.get(pid)
        found = known.get(id(p)) if p is not None else None
        state[pid] = entry = dict(entry)
        for k, v in entry.items():
            what = f"optimizer state '{k}' of parameter {pid}"
            if found is not None and isinstance(v, Tensor) and v.dim() > 0:
                entry[k] = from_state(v, found[0], what, found[1])
            elif isinstance(v, ShardedState):
                raise ValueError(
                    f"tpext: {what} is the tensor-parallel slice {v!r}, but that parameter is not "
                    "sharded here: a per-rank optimizer save loads only at the same tp size and rank"
                )
    return {**state_dict, "state": state}


def install_optimizer_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer.state_dict()` hand out the state of sharded parameters as ShardedState, and
    `load_state_dict` take them back. Idempotent; done for every optimizer at its first step."""
    if getattr(optimizer, "_tpext_state_hooks", False):
        return
    optimizer.register_state_dict_post_hook(_optim_state_dict_post_hook)
    optimizer.register_load_state_dict_pre_hook(_optim_load_pre_hook)
    optimizer._tpext_state_hooks = True


_STEP_HOOK = None


def _localize_loaded_state(optimizer: torch.optim.Optimizer) -> None:
    """State loaded before the hooks were installed (``load_state_dict`` into an optimizer that never
    stepped) may hold ShardedStates (a per-rank save) or dense tensors (a dense run's optimizer): take each
    back as its parameter's local tensor, checking the slices, as the load pre hook would have."""
    known = None
    for p, state in optimizer.state.items():
        for k, v in list(state.items()):
            if (
                not isinstance(v, Tensor)
                or v.dim() == 0
                or (tuple(v.shape) == tuple(p.shape) and not isinstance(v, ShardedState))
            ):
                continue
            known = _param_layouts() if known is None else known
            found = known.get(id(p))
            what = f"optimizer state '{k}' of a parameter of shape {list(p.shape)}"
            if found is None:
                if not isinstance(v, ShardedState):
                    continue  # not a tensor-parallel parameter: torch's own checks apply
                raise ValueError(
                    f"tpext: {what} is the tensor-parallel slice {v!r}, but that parameter is not "
                    "sharded here: a per-rank optimizer save loads only at the same tp size and rank"
                )
            state[k] = from_state(v, found[0], what, found[1])


def _on_step(optimizer, args, kwargs) -> None:
    if not getattr(optimizer, "_tpext_state_hooks", False):
        install_optimizer_hooks(optimizer)
        _localize_loaded_state(optimizer)


def _install_optimizer_step_hook() -> None:
    # The optimizer is created after the model and nothing of tpext sees it; its first step (also
    # get_optimizer_state_dict's initialising step) installs the hooks. A global step pre-hook costs one
    # attribute lookup per step.
    global _STEP_HOOK
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _STEP_HOOK = register_optimizer_step_pre_hook(_on_step)


def local_state(state_dict: dict) -> dict:
    """This rank's view of a state dict: every ShardedState replaced by its local tensor.

    Args:
        state_dict: a (possibly nested) state dict, as ``model.state_dict()`` or ``get_state_dict`` return.

    Returns:
        A new dict (lists and dicts rebuilt, tensors shared) with plain tensors only.

    Example:
        >>> local = tpext.checkpoint.local_state(model.state_dict())  # what this rank holds, local shapes
    """
    if isinstance(state_dict, dict):
        return {k: local_state(v) for k, v in state_dict.items()}
    if isinstance(state_dict, list):
        return [local_state(v) for v in state_dict]
    return state_dict.local if isinstance(state_dict, ShardedState) else state_dict
