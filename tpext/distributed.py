"""Process-group handling shared by every tpext entry point.

A `group` argument is a ``torch.distributed.ProcessGroup``, a 1-D ``DeviceMesh``, or None for the
default (world) group. Groups cross into C++ by their registered name, never as pointers.
"""

from __future__ import annotations

import copy
from typing import Union

import torch.distributed as dist

try:
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - DeviceMesh ships with every torch this package supports
    DeviceMesh = None  # type: ignore[assignment,misc]

GroupLike = Union[dist.ProcessGroup, "DeviceMesh", None]


def resolve_group(group: GroupLike = None) -> dist.ProcessGroup:
    """The ProcessGroup that `group` denotes.

    Args:
        group: a ProcessGroup, a 1-D DeviceMesh (its group), or None (the default group).

    Returns:
        The torch.distributed.ProcessGroup.

    Raises:
        RuntimeError: None while torch.distributed is not initialized.
        ValueError: a DeviceMesh of more than one dim (pass its tensor-parallel sub-mesh, mesh["tp"]).
        TypeError: anything else.

    Example:
        >>> tp = tpext.resolve_group(mesh["tp"])
        >>> tp.size()
        2
    """
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "tpext: torch.distributed is not initialized; call torch.distributed.init_process_group() "
                "(torchrun sets up the environment) or pass an explicit group"
            )
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    if DeviceMesh is not None and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"tpext: a DeviceMesh group must be 1-D, got a {group.ndim}-D mesh with dims "
                f"{group.mesh_dim_names}; pass the sub-mesh for tensor parallelism, e.g. mesh['tp']"
            )
        return group.get_group()
    raise TypeError(
        f"tpext: group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or None, "
        f"got {type(group).__name__}"
    )


class SharesGroupOnCopy:
    """Mixin of the objects that hold a process group (modules, hooks): copy.deepcopy shares the group
    instead of copying it (a ProcessGroup cannot be copied, and a copy of a tensor-parallel module runs
    on the same ranks); everything else is copied as deepcopy would. Pickling (torch.save(model)) is
    refused with the ways to save that work: a process group means nothing in another process."""

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"tpext: a {type(self).__name__} holds a process group and cannot be pickled (torch.save of "
            "a tensor-parallel model); save its weights with tpext.save_checkpoint(model, path) (the "
            "dense safetensors), model.save_pretrained(dir) (Hugging Face models) or "
            "torch.distributed.checkpoint on model.state_dict(), and parallelize again on load"
        )

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict):
        for value in self.__dict__.values():
            if isinstance(value, dist.ProcessGroup):
                memo.setdefault(id(value), value)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = copy.deepcopy(self.__dict__, memo)
        if hasattr(new, "__setstate__"):  # nn.Module restores its defaults there
            new.__setstate__(state)
        else:
            new.__dict__.update(state)
        return new


def group_name(group: GroupLike = None) -> str:
    """The name under which `group` is registered with c10d: what the C++ ops take as `group_name`.

    Args:
        group: as for `resolve_group`.

    Returns:
        The group's c10d name.

    Raises:
        As `resolve_group`.

    Example:
        >>> torch.ops.tpext.all_gather_gemm(x_shard, w, None, tpext.group_name(), 1)  # the raw op
    """
    return resolve_group(group).group_name


def group_size(name: str) -> int:
    """Size of the group registered as `name`, with the same error as the C++ ops for unknown names."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name).size()
    except Exception as exc:  # c10d raises a bare RuntimeError for unknown names
        raise RuntimeError(
            f"tpext: group_name '{name}' does not name a registered process group; pass "
            "ProcessGroup.group_name of a group made by torch.distributed"
        ) from exc


# --------------------------------------------------------------------------------------------------
# Shard sizes. One rule everywhere: n items over R ranks, the first n % R ranks get one more.


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Near-even split of n over world_size ranks: ceil(n/R) for the first n % R ranks, floor after."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_range(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, size) of `rank`'s shard under shard_sizes."""
    sizes = shard_sizes(n, world_size)
    return sum(sizes[:rank]), sizes[rank]
