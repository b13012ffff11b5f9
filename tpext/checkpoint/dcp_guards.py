"""Guards around torch.distributed.checkpoint's own functions, for state dicts that hold ShardedState.

Each wraps one torch function in place, once (idempotent). Two refuse what would otherwise lose or mislabel
tensor-parallel slices without an error (a safetensors writer given several chunks of one key, a
``full_state_dict=True`` gather of slices it cannot gather); one registers the tensor-parallel modules of the
models passed to torch's state_dict API. tpext.checkpoint.dcp installs them with its state-dict hooks.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch.distributed.checkpoint.planner import WriteItemType

__all__ = [
    "check_one_chunk_per_key",
    "guard_full_state_dict",
    "guard_safetensors_writers",
    "register_modules_of_state_dict_calls",
]


# ----- safetensors writers keep one tensor per key and rank: refuse a plan that would lose chunks


def check_one_chunk_per_key(plans: list, writer: Any) -> None:
    """Raise when a rank's final save plan holds several chunks of one key for a safetensors writer.

    torch's safetensors writers (``HuggingFaceStorageWriter``, ``FileSystemWriter(serialization_format=
    SAFETENSORS)``) put each rank's tensors into one dict keyed by name, so a second chunk of the same key
    (a packed qkv / gate_up piece, FSDP2 rows across pieces) would silently replace the first. The plans
    checked are the deduped global ones, before anything is written.
    """
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    if getattr(writer, "serialization_format", None) != SerializationFormat.SAFETENSORS:
        return
    if not getattr(writer, "single_file_per_rank", True):
        return  # one file per write item: nothing is overwritten
    writing = [
        rank for rank, plan in enumerate(plans) if any(i.type != WriteItemType.BYTE_IO for i in plan.items)
    ]
    if getattr(writer, "save_distributed", True) is False and len(writing) > 1:
        raise ValueError(
            f"tpext: {type(writer).__name__}(save_distributed=False) gives every rank the same file names, but "
            f"ranks {writing} all hold tensors to write (tensor-parallel slices, or replicas DCP spread over "
            "ranks): they would overwrite each other. Pass save_distributed=True (with enable_consolidation=True "
            "for dense files), save with DCP's default writer (dcp.save(state, checkpoint_id=dir)), or write "
            "dense Hugging Face safetensors with tpext.save_checkpoint(model, dir)"
        )
    for rank, plan in enumerate(plans):
        offsets: dict[str, list] = {}
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                offsets.setdefault(item.index.fqn, []).append(list(item.index.offset or []))
        for fqn, where in offsets.items():
            if len(where) > 1:
                raise ValueError(
                    f"tpext: {type(writer).__name__} keeps one tensor per key and rank, but rank {rank} holds "
                    f"{len(where)} chunks of '{fqn}' (dense offsets {where}; a packed or FSDP2-split tensor-"
                    "parallel tensor): all but one would be lost. Save with DCP's default writer "
                    "(dcp.save(state, checkpoint_id=dir)), which keeps every chunk and reshards on load, or "
                    "write dense Hugging Face safetensors with tpext.save_checkpoint(model, dir) or the "
                    "parallelized model's save_pretrained(dir)"
                )


def guard_safetensors_writers() -> None:
    """Wrap the global-plan step of torch's safetensors-capable writers with check_one_chunk_per_key.

    The global plan is the one place that sees both the storage writer and every rank's final write items;
    a raise there reaches every rank as DCP's CheckpointException before any file is written. Idempotent.
    """
    from torch.distributed.checkpoint import filesystem, hf_storage

    for cls in (filesystem._FileSystemWriter, hf_storage.HuggingFaceStorageWriter):
        original = cls.__dict__["prepare_global_plan"]
        if getattr(original, "_tpext_checked", False):
            continue

        def prepare_global_plan(self, plans, _original=original):
            check_one_chunk_per_key(plans, self)
            return _original(self, plans)

        prepare_global_plan._tpext_checked = True
        cls.prepare_global_plan = prepare_global_plan


# ----- get_*_state_dict(full_state_dict=True) gathers DTensors and ShardedTensors only: refuse ShardedState


def _first_sharded(state: Any, sharded: type, prefix: str = "") -> str | None:
    """The key of the first `sharded` tensor in a (nested) state dict, or None."""
    if isinstance(state, sharded):
        return prefix or "<the state dict>"
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    for k, v in items:
        found = _first_sharded(v, sharded, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return None


def guard_full_state_dict(sharded: type) -> None:
    """Wrap the gather of torch's get_model_state_dict / get_optimizer_state_dict(full_state_dict=True) to
    refuse a state dict holding a `sharded` tensor (tpext's ShardedState).

    torch gathers DTensors and ShardedTensors there and passes other tensors through, so a ShardedState would
    come back as this rank's slices under a "full" state dict (and, with cpu_offload, rank 0's slices only).
    ``_gather_state_dict`` is looked up in torch's state_dict module at call time and is called only on the
    full_state_dict path. Idempotent.
    """
    from torch.distributed.checkpoint import state_dict as torch_state_dict

    original = torch_state_dict._gather_state_dict
    if getattr(original, "_tpext_checked", False):
        return

    def _gather_state_dict(state_dict, *args, **kwargs):
        key = _first_sharded(state_dict, sharded)
        if key is not None:
            raise ValueError(
                f"tpext: full_state_dict=True cannot gather '{key}', a tensor-parallel tensor of which this rank "
                "holds only its slices (torch gathers DTensors and ShardedTensors only). Use "
                "tpext.gather_state_dict(model) for the dense model state dict, or full_state_dict=False with "
                "torch.distributed.checkpoint (dcp.save), which writes each rank's slices and reshards on load"
            )
        return original(state_dict, *args, **kwargs)

    _gather_state_dict._tpext_checked = True
    torch_state_dict._gather_state_dict = _gather_state_dict


def register_modules_of_state_dict_calls(modules: weakref.WeakSet) -> None:
    """Wrap torch's state_dict API's option check, which every get_/set_*_state_dict call makes with the model,
    to add the model's tensor-parallel modules to `modules` (copy.deepcopy makes modules that set_layout
    never saw).

    Without it, get_optimizer_state_dict(copy, optimizer) on a deep copy whose state_dict() was never called
    would hand out the optimizer state of sharded parameters as plain local tensors under the dense names,
    which DCP takes for replicas. Idempotent.
    """
    from torch.distributed.checkpoint import state_dict as torch_state_dict

    original = torch_state_dict._verify_options
    if getattr(original, "_tpext_checked", False):
        return

    def _verify_options(model, *args, **kwargs):
        for module in model.modules():
            if getattr(module, "_tpext_layouts", None):
                modules.add(module)
        return original(model, *args, **kwargs)

    _verify_options._tpext_checked = True
    torch_state_dict._verify_options = _verify_options
