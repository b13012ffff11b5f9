"""Mamba-2 mixers (Mamba2's, and the hybrids' copies: Bamba, Nemotron-H, GraniteMoeHybrid, Falcon-H1,
Zamba2), read and parallelized by heads; and the entry points for both kinds of mixer (`plan_entries`,
`check_converted`, `set_local_sizes`), Mamba-1 mixers (Mamba's, Falcon-Mamba's, Jamba's) being sharded by
channels in tpext.parallel.mamba1, with what both share in tpext.parallel.mixers.

A Mamba-2 mixer projects the hidden states once, packed, convolves part of it along the sequence, runs the
selective scan per head, normalises per group and projects back:

    x -> in_proj -> [z (heads x head_dim) | x (heads x head_dim) | B (groups x state) | C (groups x state)
                     | dt (heads)]
    [x | B | C] -> conv1d (depthwise: one filter a channel) -> scan per head, with dt_bias, A_log, D (one
                   value a head); a head reads the B and C of its group (heads / groups heads a group)
    scan output, gated by z -> norm (an RMSNorm per group of intermediate / groups features) -> out_proj

Tensor-parallel, by heads (as Megatron-LM shards its Mamba layers): each rank keeps heads / R heads and the
groups / R groups they read (both must divide by R, so a head stays with its group). in_proj is column-
parallel, its five pieces each cut by heads or groups; conv1d's channels, dt_bias, A_log, D and the norm's
weight are sliced the same way; out_proj is row-parallel over the heads' features. The mixer computes with
its local sizes (num_heads, intermediate_size, n_groups, conv_dim), which `set_local_sizes` gives it after
the conversion, and always on its unfused path: a fused kernel that applies out_proj's weight itself would
skip the row layer's reduction.

Under sequence parallelism the mixer reads the gathered sequence (it mixes tokens along it, and takes the
sequence length from its input), gathered once for in_proj (tpext.parallel.sequence); out_proj
reduce-scatters its output back to this rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from tpext.nn.class_swap import derived_class
from tpext.parallel import mamba1
from tpext.parallel.mamba1 import Mamba1Dims, Mamba1Mixer, MambaXProj, SlicedRows, is_mamba1, mamba1_dims
from tpext.parallel.mixers import (
    MambaConv,
    MixerKind,
    MixerStyle,
    Unfused,
    check_sizes,
    segments_here,
    slice_params,
)
from tpext.parallel.styles import Colwise, Rowwise, Site, Style
from tpext.sharding import Piece, piece_segments

__all__ = [
    "Mamba2Dims",
    "MambaMixer",
    "MambaConv",
    "GroupedNorm",
    "Mamba1Mixer",
    "MambaXProj",
    "SlicedRows",
    "is_mamba2",
    "is_mamba1",
    "mamba1_dims",
    "Mamba1Dims",
    "dims",
    "plan_entries",
    "check_converted",
    "set_local_sizes",
    "scales_input",
    "COLUMN",
]

#: The mixer's column-parallel layer, which reads its input (under SP, the gathered sequence).
COLUMN = "in_proj"
# The mixer's own parameters with one value per head.
_PER_HEAD = ("dt_bias", "A_log", "D")


class Mamba2Dims(NamedTuple):
    """A Mamba-2 mixer's head structure."""

    heads: int
    head_dim: int
    groups: int
    state: int

    @property
    def intermediate(self) -> int:
        return self.heads * self.head_dim

    def in_proj_pieces(self) -> tuple[Piece, ...]:
        """in_proj's output features: z, x, B, C, dt."""
        return (
            Piece(self.heads, self.head_dim),
            Piece(self.heads, self.head_dim),
            Piece(self.groups, self.state),
            Piece(self.groups, self.state),
            Piece(self.heads, 1),
        )

    def conv_pieces(self) -> tuple[Piece, ...]:
        """conv1d's channels: x, B, C."""
        return self.in_proj_pieces()[1:4]

    def norm_pieces(self) -> tuple[Piece, ...]:
        """The gated norm's features: one unit a group."""
        return (Piece(self.groups, self.intermediate // self.groups),)


def is_mamba2(module: nn.Module) -> bool:
    """Whether `module` is a Mamba-2 mixer.

    Args:
        module: any module.

    Returns:
        True when it holds in_proj and out_proj (linear layers or their tensor-parallel replacements), a
        depthwise nn.Conv1d conv1d, and parameters dt_bias, A_log and D of its own, and no x_proj (a Mamba-1
        mixer's).

    Example:
        >>> mamba.is_mamba2(model.backbone.layers[0].mixer)  # a Mamba2Mixer
        True
    """
    params = dict(module.named_parameters(recurse=False))
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("in_proj", "out_proj"))
        and isinstance(getattr(module, "conv1d", None), nn.Conv1d)
        and all(n in params for n in _PER_HEAD)
        and not hasattr(module, "x_proj")
    )


def dims(mixer: nn.Module) -> Mamba2Dims:
    """The heads and groups of a Mamba-2 mixer, from its attributes, checked against its layers' shapes.

    Args:
        mixer: a Mamba-2 mixer (`is_mamba2`).

    Returns:
        Mamba2Dims(heads, head_dim, groups, state).

    Raises:
        ValueError: an attribute is missing, or the layers' shapes disagree with the sizes.

    Example:
        >>> mamba.dims(model.backbone.layers[0].mixer)
        Mamba2Dims(heads=8, head_dim=16, groups=4, state=8)
    """
    cls = type(mixer).__name__
    names = ("num_heads", "head_dim", "n_groups", "ssm_state_size")
    values = [getattr(mixer, n, None) for n in names]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        missing = [n for n, v in zip(names, values) if not isinstance(v, int)]
        raise ValueError(
            f"tpext.parallelize: Mamba-2 mixer {cls}: cannot read {', '.join(missing) or 'its sizes'} from "
            "the module; give its block 'replicate'"
        )
    d = Mamba2Dims(*values)
    expected = {
        ("in_proj", "out_features"): sum(p.size for p in d.in_proj_pieces()),
        ("out_proj", "in_features"): d.intermediate,
        ("conv1d", "in_channels"): sum(p.size for p in d.conv_pieces()),
        ("conv1d", "groups"): sum(p.size for p in d.conv_pieces()),
    }
    check_sizes(mixer, "Mamba-2", expected, str(d))
    for name in _PER_HEAD:
        p = getattr(mixer, name)
        if tuple(p.shape) != (d.heads,):
            raise ValueError(
                f"tpext.parallelize: Mamba-2 mixer {cls}.{name} has shape {tuple(p.shape)}, expected one value "
                f"a head ({d.heads},); give its block 'replicate'"
            )
    if d.heads % d.groups or getattr(mixer, "intermediate_size", d.intermediate) != d.intermediate:
        raise ValueError(
            f"tpext.parallelize: Mamba-2 mixer {cls}: {d.heads} heads of {d.head_dim} in {d.groups} groups "
            f"and intermediate_size {getattr(mixer, 'intermediate_size', None)} do not fit together; give its "
            "block 'replicate'"
        )
    norm = getattr(mixer, "norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        size = getattr(norm, "group_size", None)
        groups = getattr(norm, "n_groups", None)
        if not (isinstance(weight, torch.Tensor) and tuple(weight.shape) == (d.intermediate,)) or not (
            size == d.intermediate // d.groups or groups == d.groups
        ):
            raise ValueError(
                f"tpext.parallelize: Mamba-2 mixer {cls}.norm ({type(norm).__name__}) is not a norm per group of "
                f"{d.intermediate // d.groups} features with a weight of {d.intermediate} (group_size or "
                "n_groups): tpext cannot tell which features each rank's groups hold; give its block 'replicate'"
            )
        other = [n for n, _ in norm.named_parameters() if n != "weight"]
        if other:
            raise ValueError(
                f"tpext.parallelize: Mamba-2 mixer {cls}.norm ({type(norm).__name__}) has parameters besides its "
                f"weight ({other}), which tpext does not slice; give its block 'replicate'"
            )
    return d


def _split_reason(d: Mamba2Dims, world: int | None) -> str:
    """Why a mixer of `d` cannot be sharded over `world` ranks by heads, or "" when it can (world None: over
    some size above 1, so it needs more than one group)."""
    if world is None and d.groups == 1:
        return (
            "its heads in one group, which every head reads: it cannot be split by groups over any "
            "tensor-parallel size"
        )
    if world is not None and world > 1 and (d.heads % world or d.groups % world):
        return (
            f"{d.heads} heads in {d.groups} groups, not both divisible by the tensor-parallel size {world}: "
            "each rank must hold whole groups with their heads"
        )
    return ""


def plan_entries(modules: dict[str, nn.Module], world: int | None = None) -> dict[str, Style | str]:
    """The plan entries of every Mamba-2 mixer among `modules` and what it holds (see the module's
    docstring). A mixer whose heads and groups do not split over `world` ranks, or whose layout tpext cannot
    read, gets the reason (a str) instead: auto_plan then replicates its block, saying why.

    Args:
        modules: {name: module} of a model (dict(model.named_modules())).
        world: the tensor-parallel size (None: not known yet; a mixer of more than one group is planned
            sharded, and the size checked when it is converted).

    Returns:
        {module name: style, or why it cannot be sharded}.

    Example:
        >>> mamba.plan_entries(dict(model.named_modules()), 2)["backbone.layers.0.mixer.out_proj"]
        Rowwise(pieces=(Piece(units=8, unit_size=16),))
    """
    plan: dict[str, Style | str] = {}
    for name, mixer in modules.items():
        if is_mamba1(mixer):
            plan.update(mamba1.plan_entries(name, mixer, world))
        if not is_mamba2(mixer):
            continue
        try:
            d = dims(mixer)
        except ValueError as exc:
            plan[name] = f"{type(mixer).__name__}: {str(exc).removeprefix('tpext.parallelize: ')}"
            continue
        if why := _split_reason(d, world):
            plan[name] = f"{type(mixer).__name__}, a Mamba-2 mixer with {why}"
            continue
        prefix = f"{name}." if name else ""
        plan[name] = MambaMixer(d.heads, d.head_dim, d.groups, d.state)
        plan[prefix + "in_proj"] = Colwise(d.in_proj_pieces())
        plan[prefix + "conv1d"] = MambaConv(d.conv_pieces())
        plan[prefix + "out_proj"] = Rowwise((Piece(d.heads, d.head_dim),))
        norm = getattr(mixer, "norm", None)
        if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()):
            plan[prefix + "norm"] = GroupedNorm(d.norm_pieces())
    return plan


def _mixers(modules: dict[str, nn.Module], styles: dict[str, Style | None]) -> list[str]:
    return [
        n
        for n, m in modules.items()
        if (isinstance(styles.get(n), MambaMixer) and is_mamba2(m))
        or (isinstance(styles.get(n), Mamba1Mixer) and is_mamba1(m))
    ]


def check_converted(modules: dict[str, nn.Module], styles: dict[str, Style | None], world: int) -> list[str]:
    """Checks that every Mamba mixer whose layers a plan shards is planned as a whole: MambaMixer (Mamba1Mixer)
    on the mixer, which gives it its local sizes, and each of its layers exactly the style `plan_entries`
    gives it (the same pieces, the same summed gradients). Called by parallelize before any module is
    replaced.

    Args:
        modules: {name: module} of the dense model.
        styles: {module name: its style in the plan, or None}.
        world: the tensor-parallel size.

    Returns:
        The names of the mixers sharded by heads (MambaMixer in the plan), in module order.

    Raises:
        ValueError: a mixer's layer is sharded without MambaMixer (Mamba1Mixer) on the mixer, or one of its
            layers is planned otherwise than sharding the mixer needs.

    Example:
        >>> mamba.check_converted(modules, {n: style_for(n, plan) for n in modules}, 2)
        ['backbone.layers.0.mixer', 'backbone.layers.1.mixer']
    """
    mixers = _mixers(modules, styles)
    for name, mixer in modules.items():
        first = is_mamba1(mixer)
        if not (first or is_mamba2(mixer)) or world == 1:
            continue
        prefix = f"{name}." if name else ""
        kind = "Mamba1Mixer" if first else "MambaMixer"
        if name in mixers:  # every layer of it planned exactly as sharding the mixer needs
            needed = plan_entries(
                {n: m for n, m in modules.items() if n == name or n.startswith(prefix)}, world
            )
            wrong = next(
                (n for n, s in needed.items() if not isinstance(s, str) and styles.get(n) != s), None
            )
            if wrong is not None:
                raise ValueError(
                    f"tpext.parallelize: {name or 'the model'} ({type(mixer).__name__}) is planned {kind}, but "
                    f"{wrong} is planned {styles.get(wrong)!r} where sharding the mixer needs {needed[wrong]!r}; "
                    "plan its layers as tpext.parallel.mamba.plan_entries does (plan='auto' does)"
                )
            continue
        sharded = [
            n
            for n, style in styles.items()
            if n.startswith(prefix)
            and n.count(".") == prefix.count(".")
            and isinstance(style, (Colwise, Rowwise, MambaConv, GroupedNorm, MambaXProj, SlicedRows))
        ]
        if sharded:
            raise ValueError(
                f"tpext.parallelize: {sharded[0]} of Mamba mixer {name or 'the model'} "
                f"({type(mixer).__name__}) is sharded, but the mixer itself is not planned "
                f"tpext.parallel.mamba.{kind}, which gives it its local sizes; without it the mixer would read "
                "its dense sizes. Plan the whole mixer (plan='auto' does), or give its block 'replicate'"
            )
    return mixers


def scales_input(mixer: nn.Module) -> bool:
    """Whether the mixer scales its input before in_proj reads it (Falcon-H1's ssm_in_multiplier)."""
    return hasattr(mixer, "ssm_in_multiplier")


def set_local_sizes(model: nn.Module, mixers: list[str], group: torch.distributed.ProcessGroup) -> None:
    """Gives every sharded Mamba-2 mixer its local sizes, after its layers were replaced: num_heads,
    intermediate_size, n_groups, conv_dim (and a Falcon-H1 norm's n_groups) for this rank's heads; this rank's
    values of dt_bias, A_log and D (their layouts recorded) and of its in_proj-sized buffers (Falcon-H1's
    mup_vector); its forward on the unfused path (`Unfused`).

    Args:
        model: the model, its mixers' layers converted.
        mixers: the names of the mixers sharded by heads (`check_converted`).
        group: the tensor-parallel group.

    Example:
        >>> mamba.set_local_sizes(model, ["backbone.layers.0.mixer"], group)
    """
    world, rank = group.size(), group.rank()
    if world == 1:
        return
    for name in mixers:
        mixer = model.get_submodule(name)
        if mixer.A_log.dim() == 2:  # a Mamba-1 mixer (its layers converted: is_mamba1 reads the dense ones)
            mamba1.set_local_sizes(mixer, world, rank)
            mixer._tpext_group = group
            continue
        d = Mamba2Dims(mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size)
        heads, groups = d.heads // world, d.groups // world
        slice_params(mixer, _PER_HEAD, ((rank * heads, heads),))
        projection = sum(p.size for p in d.in_proj_pieces())
        segments = piece_segments(d.in_proj_pieces(), world, rank, f"{name}.in_proj")[0]
        for bname, buf in list(mixer.named_buffers(recurse=False)):
            if buf is not None and buf.dim() >= 1 and buf.shape[-1] == projection:
                mixer._buffers[bname] = torch.cat([buf.narrow(-1, s, n) for s, n in segments], -1)
        mixer.num_heads, mixer.n_groups = heads, groups
        mixer.intermediate_size = heads * d.head_dim
        mixer.conv_dim = mixer.intermediate_size + 2 * groups * d.state
        if hasattr(mixer, "groups_time_state_size"):
            mixer.groups_time_state_size = groups * d.state
        if isinstance(getattr(getattr(mixer, "norm", None), "n_groups", None), int):
            mixer.norm.n_groups = groups
        mixer.__class__ = derived_class(type(mixer), Unfused, wraps=True)
        mixer._tpext_group = group


@dataclass(frozen=True, repr=False)
class MambaMixer(MixerStyle):
    """A Mamba-2 mixer sharded by heads: `heads` of `head_dim` features in `groups` groups of `state` (each
    rank keeps heads / R heads and groups / R groups). Its layers are planned beside it (in_proj Colwise,
    conv1d MambaConv, norm GroupedNorm, out_proj Rowwise, by `plan_entries`); the mixer itself is checked
    here and given its local sizes once they are converted (`set_local_sizes`).

    Example:
        >>> plan = {"backbone.layers.0.mixer": tpext.parallel.mamba.MambaMixer(8, 16, 4, 8), ...}
    """

    kind: ClassVar[str] = "mamba_mixer"
    heads: int = 0
    head_dim: int = 0
    groups: int = 0
    state: int = 0

    mixer: ClassVar = MixerKind(
        "a Mamba-2 mixer (in_proj, conv1d, out_proj, dt_bias, A_log, D)", is_mamba2, dims
    )

    def _split_reason(self, read: Mamba2Dims, world: int) -> str:
        why = _split_reason(read, world)
        return f"{why}; give its block 'replicate'" if why else ""


@dataclass(frozen=True, repr=False)
class GroupedNorm(Style):
    """A norm computed per group of features (a Mamba-2 mixer's gated RMSNorm, its group size unchanged),
    its weight sharded as `pieces` (one unit a group): its statistics are each group's, so this rank's
    groups normalise alone, with their slice of the weight.

    Example:
        >>> plan = {"*.mixer.norm": tpext.parallel.mamba.GroupedNorm((Piece(4, 32),))}
    """

    kind: ClassVar[str] = "grouped_norm"
    pieces: tuple[Piece, ...] = ()

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        weight = getattr(module, "weight", None)
        features = sum(p.size for p in self.pieces)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (features,):
            raise site.refuse(self, module, f"it takes a norm with a weight of {features} features")
        if (here := segments_here(self, module, site, "groups")) is None:
            return module
        new, segments = here
        slice_params(new, ("weight",), segments)
        return new
