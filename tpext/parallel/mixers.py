"""What sharding a Mamba mixer takes, Mamba-2's (tpext.parallel.mamba) and Mamba-1's (tpext.parallel.mamba1):
the class wrappers of a sharded mixer and of its sliced layers, the slicing of their parameters, the check
both mixer styles run, and the style of their depthwise conv1d.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from tpext.distributed import SharesGroupOnCopy, resolve_group
from tpext.nn.class_swap import derived_class, shell_copy
from tpext.parallel.styles import Site, Style
from tpext.sharding import Piece, ShardLayout, piece_segments, set_layout

__all__ = [
    "HoldsGroup",
    "Unfused",
    "MixerKind",
    "MixerStyle",
    "MambaConv",
    "check_sizes",
    "group_copy",
    "slice_params",
    "segments_here",
]


def check_sizes(mixer: nn.Module, kind: str, expected: dict[tuple[str, str], int], sizes: str) -> None:
    """Raise a ValueError unless each layer's attribute of `expected` {(leaf, attr): value} has its value."""
    for (leaf, attr), want in expected.items():
        got = getattr(getattr(mixer, leaf), attr)
        if got != want:
            raise ValueError(
                f"tpext.parallelize: {kind} mixer {type(mixer).__name__}.{leaf} has {attr}={got}, expected "
                f"{want} for {sizes}: a layout tpext cannot tell; give its block 'replicate'"
            )


class HoldsGroup(SharesGroupOnCopy):
    """Wraps the class of a module whose parameters tpext sliced (MambaConv, GroupedNorm, SlicedRows): it
    holds its group (`_tpext_group`, which gather_state_dict reads) and shares it on copy."""

    _tpext_group: torch.distributed.ProcessGroup


class Unfused(HoldsGroup):
    """Wraps a sharded Mamba mixer's own class: forward runs with the mixer's `training` flag off, so its
    unfused path runs (Hugging Face's fused training kernel applies out_proj's weight itself, which would
    skip the row layer's reduction). The flag gates only that kernel in the mixer's own code; its children
    keep theirs."""

    def forward(self, *args, **kwargs):
        training = self.training
        self.training = False
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.training = training


def group_copy(module: nn.Module, group) -> nn.Module:
    """A shell copy of `module` (its class wrapped by HoldsGroup) holding `group`, for its slices."""
    new = shell_copy(module)
    new.__class__ = derived_class(type(module), HoldsGroup, wraps=True)
    new._tpext_group = group
    return new


def slice_params(module: nn.Module, names, segments) -> None:
    """Replace each parameter of `module` named in `names` by its rows (dim 0) in `segments`, with its layout."""
    for pname in names:
        dense = getattr(module, pname)
        if dense is None:
            continue
        parts = [dense.detach().narrow(0, s, n) for s, n in segments]
        setattr(module, pname, nn.Parameter(torch.cat(parts).clone(), requires_grad=dense.requires_grad))
        set_layout(module, pname, ShardLayout(tuple(dense.shape), 0, segments))


class MixerKind(NamedTuple):
    """A kind of mixer a mixer style takes: what it is called, how to tell one, how to read its sizes."""

    takes: str
    is_mixer: Callable[[nn.Module], bool]
    read: Callable[[nn.Module], tuple]


class MixerStyle(Style):
    """What both mixer styles check before they keep the module as it is (its layers are planned beside it):
    that it is the style's `mixer`, of the sizes the style's fields say (named as the fields of the tuple
    `mixer.read` returns), and that the group's size splits them (`_split_reason`, "" where it does)."""

    mixer: ClassVar[MixerKind]

    def _split_reason(self, read: tuple, world: int) -> str:
        raise NotImplementedError

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        if not self.mixer.is_mixer(module):
            raise site.refuse(self, module, f"it takes {self.mixer.takes}")
        try:
            read = self.mixer.read(module)
        except ValueError as exc:
            raise site.refuse(self, module, str(exc).removeprefix("tpext.parallelize: ")) from exc
        if read != type(read)(*(getattr(self, field) for field in read._fields)):
            raise site.refuse(self, module, f"the mixer has {read}, the plan says {self}")
        if why := self._split_reason(read, resolve_group(site.group).size()):
            raise site.refuse(self, module, why)
        return module


def segments_here(style: Style, module: nn.Module, site: Site, what: str) -> tuple[nn.Module, list] | None:
    """A copy of `module` holding the site's group, and this rank's segments of `style.pieces` (its `what`),
    which must not be replicated over the group; None for a group of one (nothing to shard)."""
    pg = resolve_group(site.group)
    if pg.size() == 1:
        return None
    segments, replicas, _ = piece_segments(style.pieces, pg.size(), pg.rank(), site.name)
    if replicas > 1:
        raise site.refuse(style, module, f"its {what} {style.pieces} do not split over {pg.size()} ranks")
    return group_copy(module, pg), segments


@dataclass(frozen=True, repr=False)
class MambaConv(Style):
    """A Mamba mixer's depthwise nn.Conv1d (one filter a channel), its channels sharded as the packed
    `pieces` of the column layer that feeds it: this rank's filters (and biases) only.

    Example:
        >>> plan = {"*.mixer.conv1d": tpext.parallel.mamba.MambaConv((Piece(8, 16), Piece(4, 8), Piece(4, 8)))}
    """

    kind: ClassVar[str] = "mamba_conv"
    pieces: tuple[Piece, ...] = ()

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        channels = sum(p.size for p in self.pieces)
        if not (
            isinstance(module, nn.Conv1d)
            and module.groups == module.in_channels == module.out_channels == channels
            and module.weight.shape[1] == 1
        ):
            raise site.refuse(self, module, f"it takes a depthwise nn.Conv1d of {channels} channels")
        if (here := segments_here(self, module, site, "pieces")) is None:
            return module
        new, segments = here
        local = sum(n for _, n in segments)
        slice_params(new, ("weight", "bias"), segments)
        new.in_channels = new.out_channels = new.groups = local
        return new
