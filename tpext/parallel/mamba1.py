"""Mamba-1 mixers (Mamba's, Falcon-Mamba's, Jamba's), read and parallelized by channels.

in_proj packs [x | z], each of `intermediate` channels; the depthwise conv1d, A_log [channels, state] and D
are per channel; x_proj reads every channel and returns [dt (dt_rank) | B | C (state each)], which every
channel reads; dt_proj projects dt back to the channels. Each rank keeps a slice of the channels: in_proj is
column-parallel, conv1d, A_log, D and dt_proj's rows (a plain layer, its weight also read directly by the
mixer's code) sliced; x_proj is row-parallel and its output whole (all-reduced, even under SP: the mixer runs
on the gathered sequence), and since each rank's channels read all of it, its gradient is summed over the
group (MambaXProj); the norms of dt, B and C (Jamba's, Falcon-Mamba's) act on that whole output, their
gradients partial (Replicate(sum_grads=True)); out_proj is row-parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from tpext import mappings, stats
from tpext.distributed import resolve_group
from tpext.nn import RowParallelLinear
from tpext.nn.class_swap import derived_class
from tpext.parallel import mixers
from tpext.parallel import structure as st
from tpext.parallel.styles import Colwise, Replicate, Rowwise, Site, Style
from tpext.sharding import Piece, piece_segments

__all__ = [
    "Mamba1Dims",
    "Mamba1Mixer",
    "MambaXProj",
    "SlicedRows",
    "is_mamba1",
    "mamba1_dims",
    "plan_entries",
    "set_local_sizes",
]


_MAMBA1_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def is_mamba1(module: nn.Module) -> bool:
    """Whether `module` is a Mamba-1 mixer.

    Args:
        module: any module.

    Returns:
        True when it holds in_proj, x_proj, dt_proj and out_proj (linear layers or their tensor-parallel
        replacements), a depthwise nn.Conv1d conv1d, and parameters A_log (2-D) and D of its own.

    Example:
        >>> mamba1.is_mamba1(model.backbone.layers[0].mixer)  # a MambaMixer
        True
    """
    params = dict(module.named_parameters(recurse=False))
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in _MAMBA1_LINEARS)
        and isinstance(getattr(module, "conv1d", None), nn.Conv1d)
        and set(params) == {"A_log", "D"}
        and params["A_log"].dim() == 2
    )


class Mamba1Dims(NamedTuple):
    """A Mamba-1 mixer's sizes: its intermediate channels and its state."""

    channels: int
    state: int


def mamba1_dims(mixer: nn.Module) -> Mamba1Dims:
    """(channels, state) of a Mamba-1 mixer, checked against its layers' shapes.

    Args:
        mixer: a Mamba-1 mixer (`is_mamba1`).

    Returns:
        Mamba1Dims(intermediate channels, state size).

    Raises:
        ValueError: the layers' shapes disagree.

    Example:
        >>> mamba1.mamba1_dims(model.backbone.layers[0].mixer)
        Mamba1Dims(channels=128, state=8)
    """
    channels, state = mixer.A_log.shape
    expected = {
        ("in_proj", "out_features"): 2 * channels,
        ("x_proj", "in_features"): channels,
        ("dt_proj", "out_features"): channels,
        ("out_proj", "in_features"): channels,
        ("conv1d", "in_channels"): channels,
        ("conv1d", "groups"): channels,
    }
    mixers.check_sizes(mixer, "Mamba-1", expected, f"{channels} channels")
    if tuple(mixer.D.shape) != (channels,):
        raise ValueError(
            f"tpext.parallelize: Mamba-1 mixer {type(mixer).__name__}.D has shape {tuple(mixer.D.shape)}, "
            f"expected ({channels},); give its block 'replicate'"
        )
    return Mamba1Dims(channels, state)


def plan_entries(name: str, mixer: nn.Module, world: int | None) -> dict[str, Style | str]:
    """The plan entries of the Mamba-1 mixer `name` and its layers, or {name: why it cannot be sharded}
    (tpext.parallel.mamba.plan_entries reads every mixer of a model through it).

    Example:
        >>> mamba1.plan_entries("backbone.layers.0.mixer", mixer, 2)["backbone.layers.0.mixer.x_proj"]
        MambaXProj(channels=128)
    """
    cls = type(mixer).__name__
    try:
        channels, state = mamba1_dims(mixer)
    except ValueError as exc:
        return {name: f"{cls}: {str(exc).removeprefix('tpext.parallelize: ')}"}
    prefix = f"{name}." if name else ""
    known = {"conv1d", *_MAMBA1_LINEARS}
    norms, others = [], []
    for leaf, child in mixer.named_children():
        if leaf in known or not any(True for _ in child.parameters()):
            continue
        (norms if leaf.endswith("layernorm") and not any(True for _ in child.children()) else others).append(
            leaf
        )
    if others:
        return {name: f"{cls}, a Mamba-1 mixer with layers tpext does not slice ({', '.join(others)})"}
    if world is not None and world > 1 and channels % world:
        return {
            name: f"{cls}, a Mamba-1 mixer of {channels} channels, not divisible by the tensor-parallel size "
            f"{world}"
        }
    plan: dict[str, Style | str] = {
        name: Mamba1Mixer(channels, state),
        prefix + "in_proj": Colwise((Piece(channels), Piece(channels))),
        prefix + "conv1d": mixers.MambaConv((Piece(channels),)),
        prefix + "x_proj": MambaXProj(channels),
        prefix + "dt_proj": SlicedRows((Piece(channels),)),
        prefix + "out_proj": Rowwise((Piece(channels),)),
    }
    plan.update({prefix + leaf: Replicate(sum_grads=True) for leaf in norms})
    return plan


def set_local_sizes(mixer: nn.Module, world: int, rank: int) -> None:
    """This rank's channels of a Mamba-1 mixer whose layers were converted: its A_log and D sliced (layouts
    recorded), its intermediate_size, and its forward on the unfused path.

    Example:
        >>> mamba1.set_local_sizes(model.backbone.layers[0].mixer, 2, rank)
    """
    channels, state = mixer.A_log.shape
    segments = piece_segments((Piece(channels),), world, rank, "A_log")[0]
    mixers.slice_params(mixer, ("A_log", "D"), segments)
    if isinstance(getattr(mixer, "intermediate_size", None), int):
        mixer.intermediate_size = sum(n for _, n in segments)
    mixer.__class__ = derived_class(type(mixer), mixers.Unfused, wraps=True)


@dataclass(frozen=True, repr=False)
class Mamba1Mixer(mixers.MixerStyle):
    """A Mamba-1 mixer sharded by its `channels` (state `state`): its layers are planned beside it (in_proj
    Colwise, conv1d MambaConv, x_proj MambaXProj, dt_proj SlicedRows, out_proj Rowwise, by `plan_entries`);
    the mixer itself is checked here, and its A_log and D sliced once its layers are converted
    (`set_local_sizes`).

    Example:
        >>> plan = {"backbone.layers.0.mixer": tpext.parallel.mamba1.Mamba1Mixer(128, 8), ...}
    """

    kind: ClassVar[str] = "mamba1_mixer"
    channels: int = 0
    state: int = 0

    mixer: ClassVar = mixers.MixerKind(
        "a Mamba-1 mixer (in_proj, conv1d, x_proj, dt_proj, out_proj)", is_mamba1, mamba1_dims
    )

    def _split_reason(self, read: Mamba1Dims, world: int) -> str:
        return f"{read.channels} channels do not divide by {world}" if read.channels % world else ""


class _WholeOutputGrads:
    """Wraps a row-parallel x_proj (MambaXProj): its all-reduced output is read by every rank's channels,
    so backward its gradient is summed over the group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        with stats.scope_for(self):
            return mappings.copy_to_tp(y, self.group)


@dataclass(frozen=True, repr=False)
class MambaXProj(Style):
    """A Mamba-1 mixer's x_proj: row-parallel over the mixer's `channels` (its output, dt, B and C, whole on
    every rank, even under SP, where the mixer runs on the gathered sequence), its output gradient summed
    over the group since every rank's channels read all of it.

    Example:
        >>> plan = {"*.mixer.x_proj": tpext.parallel.mamba1.MambaXProj(128)}
    """

    kind: ClassVar[str] = "mamba_x_proj"
    channels: int = 0

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        if not (isinstance(module, nn.Linear) and st.plain_linear(module)):
            raise site.refuse(self, module, "it takes a plain nn.Linear (x @ W.T + b)")
        if module.in_features != self.channels:
            raise site.refuse(
                self, module, f"its {module.in_features} input features are not {self.channels}"
            )
        pg = resolve_group(site.group)
        if pg.size() == 1:
            return module
        new = RowParallelLinear.from_dense(
            module,
            pg,
            sequence_parallel=False,
            sequence_dim=site.sequence_dim,
            chunks=site.chunks,
            pieces=(Piece(self.channels),),
        )
        new.__class__ = derived_class(type(new), _WholeOutputGrads, wraps=True)
        return new


@dataclass(frozen=True, repr=False)
class SlicedRows(Style):
    """A module kept as it is (its class and forward), its weight's and bias's rows (dim 0) sliced as
    `pieces`: a layer whose output features this rank's channels read and whose input is whole (a Mamba-1
    mixer's dt_proj; the sum of its input's gradient over the group is the layer before's, MambaXProj).

    Example:
        >>> plan = {"*.mixer.dt_proj": tpext.parallel.mamba1.SlicedRows((Piece(128),))}
    """

    kind: ClassVar[str] = "sliced_rows"
    pieces: tuple[Piece, ...] = ()

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        rows = sum(p.size for p in self.pieces)
        params = dict(module.named_parameters(recurse=False))
        if not isinstance(module, nn.Linear) or any(p.shape[0] != rows for p in params.values()):
            raise site.refuse(self, module, f"it takes an nn.Linear of {rows} output features")
        if (here := mixers.segments_here(self, module, site, "rows")) is None:
            return module
        new, segments = here
        mixers.slice_params(new, params, segments)
        new.out_features = sum(n for _, n in segments)
        return new
