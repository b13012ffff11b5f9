"""Mamba-2 mixers (Mamba2's, and the hybrids' copies: Bamba, Nemotron-H, GraniteMoeHybrid, Falcon-H1,
Zamba2), read and parallelized by heads; Mamba-1 mixers (Mamba's, Falcon-Mamba's, Jamba's) by channels
(below, before their styles).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from tpext import mappings, stats
from tpext.distributed import SharesGroupOnCopy, resolve_group
from tpext.nn import RowParallelLinear
from tpext.nn.class_swap import derived_class, shell_copy
from tpext.parallel import structure as st
from tpext.parallel.styles import Colwise, Replicate, Rowwise, Site, Style
from tpext.sharding import Piece, ShardLayout, piece_segments, set_layout

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
    "reads_gathered_sequence",
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
    for (leaf, attr), want in expected.items():
        got = getattr(getattr(mixer, leaf), attr)
        if got != want:
            raise ValueError(
                f"tpext.parallelize: Mamba-2 mixer {cls}.{leaf} has {attr}={got}, expected {want} for {d}: a "
                "layout tpext cannot tell; give its block 'replicate'"
            )
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
            plan.update(_mamba1_entries(name, mixer, world))
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


def reads_gathered_sequence(x: torch.Tensor) -> bool:
    """Whether a sharded mixer's in_proj, under SP, reads the full sequence its mixer's hook gathered: always.
    The mixer computes in_proj's input from the gathered sequence token by token (Falcon-H1 scales it by
    ssm_in_multiplier; padding masks zero tokens), so in_proj's partial input gradient reaches the gathered
    sequence, whose backward sums it over the group, and must not be reduced by in_proj itself.

    Args:
        x: in_proj's input.

    Returns:
        True.

    Example:
        >>> mixer.in_proj._is_gathered_input = mamba.reads_gathered_sequence
    """
    return True


class _HoldsGroup(SharesGroupOnCopy):
    """Wraps the class of a module whose parameters tpext sliced (MambaConv, GroupedNorm, SlicedRows): it
    holds its group (`_tpext_group`, which gather_state_dict reads) and shares it on copy."""

    _tpext_group: torch.distributed.ProcessGroup


class _Unfused(_HoldsGroup):
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


def set_local_sizes(model: nn.Module, mixers: list[str], group: torch.distributed.ProcessGroup) -> None:
    """Gives every sharded Mamba-2 mixer its local sizes, after its layers were replaced: num_heads,
    intermediate_size, n_groups, conv_dim (and a Falcon-H1 norm's n_groups) for this rank's heads; this rank's
    values of dt_bias, A_log and D (their layouts recorded) and of its in_proj-sized buffers (Falcon-H1's
    mup_vector); its forward on the unfused path (`_Unfused`).

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
            _mamba1_local(mixer, world, rank)
            mixer._tpext_group = group
            continue
        d = Mamba2Dims(mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size)
        heads, groups = d.heads // world, d.groups // world
        for pname in _PER_HEAD:
            dense = getattr(mixer, pname)
            local = nn.Parameter(
                dense.detach().narrow(0, rank * heads, heads).clone(), requires_grad=dense.requires_grad
            )
            setattr(mixer, pname, local)
            set_layout(mixer, pname, ShardLayout((d.heads,), 0, ((rank * heads, heads),)))
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
        mixer.__class__ = derived_class(type(mixer), _Unfused, wraps=True)
        mixer._tpext_group = group


def _group_copy(module: nn.Module, group) -> nn.Module:
    """A shell copy of `module` (its class wrapped by _HoldsGroup) holding `group`, for its slices."""
    new = shell_copy(module)
    new.__class__ = derived_class(type(module), _HoldsGroup, wraps=True)
    new._tpext_group = group
    return new


def _sliced(dense: torch.Tensor, segments, dim: int = 0) -> nn.Parameter:
    parts = [dense.detach().narrow(dim, s, n) for s, n in segments]
    return nn.Parameter(torch.cat(parts, dim).clone(), requires_grad=dense.requires_grad)


class _Mixer(NamedTuple):
    """A kind of mixer a mixer style takes: what it is called, how to tell one, how to read its sizes."""

    takes: str
    is_mixer: Callable[[nn.Module], bool]
    read: Callable[[nn.Module], tuple]


class _MixerStyle(Style):
    """What both mixer styles check before they keep the module as it is (its layers are planned beside it):
    that it is the style's `mixer`, of the sizes the style's fields say (named as the fields of the tuple
    `mixer.read` returns), and that the group's size splits them (`_split_reason`, "" where it does)."""

    mixer: ClassVar[_Mixer]

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


@dataclass(frozen=True, repr=False)
class MambaMixer(_MixerStyle):
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

    mixer: ClassVar = _Mixer(
        "a Mamba-2 mixer (in_proj, conv1d, out_proj, dt_bias, A_log, D)", is_mamba2, dims
    )

    def _split_reason(self, read: Mamba2Dims, world: int) -> str:
        why = _split_reason(read, world)
        return f"{why}; give its block 'replicate'" if why else ""


def _segments_here(style: Style, module: nn.Module, site: Site, what: str) -> tuple[nn.Module, list] | None:
    """A copy of `module` holding the site's group, and this rank's segments of `style.pieces` (its `what`),
    which must not be replicated over the group; None for a group of one (nothing to shard)."""
    pg = resolve_group(site.group)
    if pg.size() == 1:
        return None
    segments, replicas, _ = piece_segments(style.pieces, pg.size(), pg.rank(), site.name)
    if replicas > 1:
        raise site.refuse(style, module, f"its {what} {style.pieces} do not split over {pg.size()} ranks")
    return _group_copy(module, pg), segments


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
        if (here := _segments_here(self, module, site, "pieces")) is None:
            return module
        new, segments = here
        local = sum(n for _, n in segments)
        new.weight = _sliced(module.weight, segments)
        set_layout(new, "weight", ShardLayout(tuple(module.weight.shape), 0, segments))
        if module.bias is not None:
            new.bias = _sliced(module.bias, segments)
            set_layout(new, "bias", ShardLayout(tuple(module.bias.shape), 0, segments))
        new.in_channels = new.out_channels = new.groups = local
        return new


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
        if (here := _segments_here(self, module, site, "groups")) is None:
            return module
        new, segments = here
        new.weight = _sliced(weight, segments)
        set_layout(new, "weight", ShardLayout(tuple(weight.shape), 0, segments))
        return new


# ---- Mamba-1 mixers (Mamba's, Falcon-Mamba's, Jamba's): sharded by channels.
# in_proj packs [x | z], each of `intermediate` channels; the depthwise conv1d, A_log [channels, state] and D
# are per channel; x_proj reads every channel and returns [dt (dt_rank) | B | C (state each)], which every
# channel reads; dt_proj projects dt back to the channels. Each rank keeps a slice of the channels: in_proj is
# column-parallel, conv1d, A_log, D and dt_proj's rows (a plain layer, its weight also read directly by the
# mixer's code) sliced; x_proj is row-parallel and its output whole (all-reduced, even under SP: the mixer runs
# on the gathered sequence), and since each rank's channels read all of it, its gradient is summed over the
# group (MambaXProj); the norms of dt, B and C (Jamba's, Falcon-Mamba's) act on that whole output, their
# gradients partial (Replicate(sum_grads=True)); out_proj is row-parallel.

_MAMBA1_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def is_mamba1(module: nn.Module) -> bool:
    """Whether `module` is a Mamba-1 mixer.

    Args:
        module: any module.

    Returns:
        True when it holds in_proj, x_proj, dt_proj and out_proj (linear layers or their tensor-parallel
        replacements), a depthwise nn.Conv1d conv1d, and parameters A_log (2-D) and D of its own.

    Example:
        >>> mamba.is_mamba1(model.backbone.layers[0].mixer)  # a MambaMixer
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
        >>> mamba.mamba1_dims(model.backbone.layers[0].mixer)
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
    for (leaf, attr), want in expected.items():
        got = getattr(getattr(mixer, leaf), attr)
        if got != want:
            raise ValueError(
                f"tpext.parallelize: Mamba-1 mixer {type(mixer).__name__}.{leaf} has {attr}={got}, expected "
                f"{want} for {channels} channels: a layout tpext cannot tell; give its block 'replicate'"
            )
    if tuple(mixer.D.shape) != (channels,):
        raise ValueError(
            f"tpext.parallelize: Mamba-1 mixer {type(mixer).__name__}.D has shape {tuple(mixer.D.shape)}, "
            f"expected ({channels},); give its block 'replicate'"
        )
    return Mamba1Dims(channels, state)


def _mamba1_entries(name: str, mixer: nn.Module, world: int | None) -> dict[str, Style | str]:
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
        prefix + "conv1d": MambaConv((Piece(channels),)),
        prefix + "x_proj": MambaXProj(channels),
        prefix + "dt_proj": SlicedRows((Piece(channels),)),
        prefix + "out_proj": Rowwise((Piece(channels),)),
    }
    plan.update({prefix + leaf: Replicate(sum_grads=True) for leaf in norms})
    return plan


def _mamba1_local(mixer: nn.Module, world: int, rank: int) -> None:
    channels, state = mixer.A_log.shape
    segments = piece_segments((Piece(channels),), world, rank, "A_log")[0]
    for pname in ("A_log", "D"):
        dense = getattr(mixer, pname)
        setattr(mixer, pname, _sliced(dense, segments))
        set_layout(mixer, pname, ShardLayout(tuple(dense.shape), 0, segments))
    if isinstance(getattr(mixer, "intermediate_size", None), int):
        mixer.intermediate_size = sum(n for _, n in segments)
    mixer.__class__ = derived_class(type(mixer), _Unfused, wraps=True)


@dataclass(frozen=True, repr=False)
class Mamba1Mixer(_MixerStyle):
    """A Mamba-1 mixer sharded by its `channels` (state `state`): its layers are planned beside it (in_proj
    Colwise, conv1d MambaConv, x_proj MambaXProj, dt_proj SlicedRows, out_proj Rowwise, by `plan_entries`);
    the mixer itself is checked here, and its A_log and D sliced once its layers are converted
    (`set_local_sizes`).

    Example:
        >>> plan = {"backbone.layers.0.mixer": tpext.parallel.mamba.Mamba1Mixer(128, 8), ...}
    """

    kind: ClassVar[str] = "mamba1_mixer"
    channels: int = 0
    state: int = 0

    mixer: ClassVar = _Mixer(
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
        >>> plan = {"*.mixer.x_proj": tpext.parallel.mamba.MambaXProj(128)}
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
        >>> plan = {"*.mixer.dt_proj": tpext.parallel.mamba.SlicedRows((Piece(128),))}
    """

    kind: ClassVar[str] = "sliced_rows"
    pieces: tuple[Piece, ...] = ()

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        rows = sum(p.size for p in self.pieces)
        params = dict(module.named_parameters(recurse=False))
        if not isinstance(module, nn.Linear) or any(p.shape[0] != rows for p in params.values()):
            raise site.refuse(self, module, f"it takes an nn.Linear of {rows} output features")
        if (here := _segments_here(self, module, site, "rows")) is None:
            return module
        new, segments = here
        for pname, dense in params.items():
            setattr(new, pname, _sliced(dense, segments))
            set_layout(new, pname, ShardLayout(tuple(dense.shape), 0, segments))
        new.out_features = sum(n for _, n in segments)
        return new
