"""Styles: objects that convert one module of a dense model to its tensor-parallel form.

Every style owns what it checks and how it converts (`Style.convert`); `tpext.parallelize` finds the style of
each module from the plan and calls it, so a new layer type gets a new style class, never another branch.
The built-in ones, with their string shorthands (a plan may use either):

    Colwise()           "colwise"            nn.Linear / Conv1D -> output features sharded; a norm of a colwise
                                             layer's heads -> this rank's heads of its weight
    Rowwise()           "rowwise"            nn.Linear / Conv1D -> input features sharded, output reduced
    Vocab()             "vocab"              nn.Embedding -> vocabulary-sharded lookup; an nn.Linear head ->
                                             vocabulary-sharded logits (gather_output=True: full logits)
    SequenceParallel()  "sequence_parallel"  a norm whose weight gradients are summed over the group under SP
    Replicate()         "replicate"          left as it is (sum_grads=True: its gradients summed over the group)
    Experts()           "experts"            a mixture-of-experts module with 3-D weights: every expert's
                                             intermediate features sharded, its output all-reduced

`pieces` (Colwise, Rowwise) name the parts of a packed or head-structured dim (tpext.Piece); left None on an
attention projection they are read from its head counts, so a head is never cut.
"""

from __future__ import annotations

from abc import ABCMeta
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from tpext.distributed import GroupLike
from tpext.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_norm_features,
    sum_param_grads,
)
from tpext.nn.class_swap import shell_copy
from tpext.nn.conv1d import ColumnParallelConv1D, RowParallelConv1D
from tpext.nn.embedding import vocab_parallel_subclass
from tpext.nn.experts import is_experts, shard_experts
from tpext.parallel import structure
from tpext.sharding import Piece

__all__ = [
    "Site",
    "Style",
    "Colwise",
    "Rowwise",
    "Vocab",
    "SequenceParallel",
    "Replicate",
    "Experts",
    "STYLES",
    "as_style",
]


@dataclass(frozen=True)
class Site:
    """Where a style converts a module: its dense name, its parent, and what parallelize was asked for.

    Attributes:
        name: the module's dense name ("model.layers.0.mlp.up_proj").
        parent: the module that holds it (attention modules tell the head structure of their projections).
        group: the tensor-parallel process group.
        sequence_parallel: whether this module sees sequence shards (False outside the decoder stack, and in
            a block that runs on the full sequence).
        sequence_dim: the sequence dim of the activations under SP.
        chunks: the chunk count of the overlapped ops ("auto": the planner's).
        config: the model's config, or None.
    """

    name: str
    parent: nn.Module
    group: GroupLike
    sequence_parallel: bool = False
    sequence_dim: int = 1
    chunks: int | str = "auto"
    config: Any = None

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    def refuse(self, style: Style, module: nn.Module, why: str) -> ValueError:
        """The error for a style that cannot convert `module` here: names the module, its class, the style,
        and why (say what the style needs and the way out)."""
        return ValueError(
            f"tpext.parallelize: style {style.kind!r} does not apply to {self.name} "
            f"({type(module).__name__}): {why}"
        )


class _StyleMeta(ABCMeta):
    """`Style("colwise", pieces)`: the old spelling of a plan entry builds the style class of that name."""

    def __call__(cls, *args, **kwargs):
        if cls is Style:
            return _style_named(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Style(metaclass=_StyleMeta):
    """The base class of tpext's parallel styles: a style converts one module of the dense model.

    Subclass it for a layer of your own: set `kind` (the name in messages) and implement `convert`, which
    checks the module first and raises `site.refuse(self, module, why)` when it cannot convert it (nothing
    is replaced until every module of the plan converted). It returns the module to put in the model (the
    same object to leave it as it is). Keep the module's parameter names and give each sharded parameter
    its tpext.sharding layout (`set_layout`), so checkpoints and `gather_state_dict` see the dense model.
    Styles are frozen dataclasses in tpext: plans hold them as plain, comparable, printable data.

    `Style("colwise", pieces, gather_output=..., sum_grads=...)` still builds the style of that name.

    Example:
        >>> plan = {"*.up_proj": tpext.parallel.Colwise(), "*.down_proj": "rowwise"}
    """

    kind: ClassVar[str] = "style"

    def __repr__(self) -> str:
        """The class and the fields that differ from their defaults: Colwise(pieces=(Piece(8, 128),))."""
        fields = getattr(self, "__dataclass_fields__", {})
        shown = [
            f"{k}={getattr(self, k)!r}" for k, f in fields.items() if f.repr and getattr(self, k) != f.default
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        """The tensor-parallel replacement of `module` at `site` (or `module` itself).

        Raises:
            ValueError: the style does not apply to this module (`site.refuse`).
        """
        raise NotImplementedError(f"{type(self).__name__}.convert")


def _checked(site: Site, fn, *args, **kwargs) -> nn.Module:
    """Calls a tpext.nn converter, naming the module in its error."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(
            f"tpext.parallelize: {site.name}: {str(exc).removeprefix('tpext.parallelize: ')}"
        ) from exc


def _refuse_linear_subclass(style: Style, module: nn.Module, site: Site) -> None:
    if isinstance(module, nn.Linear) and not structure.plain_linear(module):
        raise ValueError(
            f"tpext.parallelize: {site.name} is a {type(module).__name__}, an nn.Linear subclass with "
            "a forward of its own (a quantized or adapter layer?); tpext shards plain nn.Linear layers, "
            "whose forward is x @ W.T + b. Give it the style 'replicate', or parallelize the plain model"
        )


def _linear_kwargs(site: Site) -> dict[str, Any]:
    """The keyword arguments a parallel linear or Conv1D takes from its site (SP, sequence dim, chunks)."""
    return dict(sequence_parallel=site.sequence_parallel, sequence_dim=site.sequence_dim, chunks=site.chunks)


def _head_pieces(module: nn.Module, site: Site, pieces):
    """pieces, or on an attention projection the heads its attention module has: never cut a head."""
    if (
        pieces is None
        and site.leaf in structure.ATTENTION_PROJECTIONS
        and structure.is_attention(site.parent)
    ):
        return _checked(site, structure.attention_pieces, site.leaf, site.parent, site.config)
    return pieces


@dataclass(frozen=True, repr=False)
class Colwise(Style):
    """Output features sharded: an nn.Linear (ColumnParallelLinear), a Conv1D (ColumnParallelConv1D), or a
    norm of a colwise layer's heads (its weight covers all query or kv heads, or has one row per head:
    this rank's heads, tpext.nn.shard_norm_features). gather_output: every rank gets the full output."""

    kind: ClassVar[str] = "colwise"
    pieces: tuple[Piece, ...] | None = None
    gather_output: bool = False

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        _refuse_linear_subclass(self, module, site)
        common = dict(_linear_kwargs(site), gather_output=self.gather_output)
        if isinstance(module, nn.Linear):
            return ColumnParallelLinear.from_dense(
                module, site.group, pieces=_head_pieces(module, site, self.pieces), **common
            )
        if structure.is_conv1d(module):
            return ColumnParallelConv1D.from_dense(
                module, site.group, pieces=_head_pieces(module, site, self.pieces), **common
            )
        if isinstance(module, nn.Embedding):
            raise site.refuse(
                self,
                module,
                "an embedding's weight is [vocab, hidden]; shard its vocabulary with "
                "'vocab', or give it 'replicate'",
            )
        if structure.is_norm(site.leaf, module) and getattr(module, "weight", None) is not None:
            pieces = self.pieces
            if pieces is None and structure.is_attention(site.parent):
                pieces = structure.norm_pieces(module, site.parent, site.config)
            if pieces is None:
                raise site.refuse(
                    self,
                    module,
                    "a norm is colwise only after a colwise layer whose heads it "
                    "normalises, and this one's weight covers neither all query nor "
                    "all kv heads of an attention module it sits in; give it "
                    "Colwise(pieces=(Piece(heads, head_dim),)), 'replicate' or "
                    "'sequence_parallel'",
                )
            return _checked(site, shard_norm_features, module, site.group, pieces)
        raise site.refuse(
            self,
            module,
            "colwise takes an nn.Linear, a Conv1D, or a norm of a colwise layer's "
            "heads; write a Style for this layer type (docs/parallelize.md)",
        )


@dataclass(frozen=True, repr=False)
class Rowwise(Style):
    """Input features sharded, the output reduced: an nn.Linear (RowParallelLinear) or a Conv1D
    (RowParallelConv1D). Under SP the output is reduce-scattered to this rank's sequence shard."""

    kind: ClassVar[str] = "rowwise"
    pieces: tuple[Piece, ...] | None = None

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        _refuse_linear_subclass(self, module, site)
        common = dict(_linear_kwargs(site), pieces=_head_pieces(module, site, self.pieces))
        if isinstance(module, nn.Linear):
            return RowParallelLinear.from_dense(module, site.group, **common)
        if structure.is_conv1d(module):
            return RowParallelConv1D.from_dense(module, site.group, **common)
        if isinstance(module, nn.Embedding):
            raise site.refuse(
                self,
                module,
                "an embedding's weight is [vocab, hidden] and its input is token ids, "
                "not features; shard its vocabulary with 'vocab', or give it "
                "'replicate'",
            )
        raise site.refuse(
            self,
            module,
            "rowwise takes an nn.Linear or a Conv1D whose input features a colwise "
            "layer before it shards; write a Style for this layer type "
            "(docs/parallelize.md)",
        )


@dataclass(frozen=True, repr=False)
class Vocab(Style):
    """The vocabulary sharded: an nn.Embedding (VocabParallelEmbedding; a subclass that adds to the lookup,
    Gemma's scaled one, keeps its code around tpext's lookup), or an nn.Linear output layer (vocabulary-
    sharded logits for vocab_parallel_cross_entropy; gather_output=True gathers full logits)."""

    kind: ClassVar[str] = "vocab"
    gather_output: bool = False

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        common = dict(sequence_parallel=site.sequence_parallel, sequence_dim=site.sequence_dim)
        if isinstance(module, nn.Embedding):
            if type(module).forward is nn.Embedding.forward:
                return VocabParallelEmbedding.from_dense(module, site.group, **common)
            return _checked(site, vocab_parallel_subclass, module, site.group, **common)
        if isinstance(module, nn.Linear):
            _refuse_linear_subclass(self, module, site)
            return ColumnParallelLinear.from_dense(
                module, site.group, chunks=site.chunks, gather_output=self.gather_output, **common
            )
        raise site.refuse(self, module, "vocab takes an nn.Embedding or an nn.Linear output layer (lm_head)")


@dataclass(frozen=True, repr=False)
class SequenceParallel(Style):
    """A norm kept as it is; under sequence parallelism each rank normalises its own tokens, so its weight
    gradients are summed over the group (tpext.nn.sum_param_grads). Without SP it is replicated."""

    kind: ClassVar[str] = "sequence_parallel"

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        if not any(True for _ in module.parameters(recurse=False)):
            raise site.refuse(
                self,
                module,
                "sequence_parallel takes a module with parameters of its own (a norm "
                "with a weight); one without needs no plan entry",
            )
        if isinstance(module, (nn.Linear, nn.Embedding)) or structure.is_conv1d(module):
            raise site.refuse(
                self,
                module,
                "its weight would be replicated and applied to sequence shards, which "
                "is right only for modules acting on each token's features alone "
                "(norms); shard it with 'colwise' / 'rowwise' / 'vocab', or give "
                "it 'replicate'",
            )
        return sum_param_grads(shell_copy(module), site.group) if site.sequence_parallel else module


@dataclass(frozen=True, repr=False)
class Replicate(Style):
    """Left as it is, its weights replicated on every rank. sum_grads=True: its replicated weights see only
    this rank's heads or features (a per-head q_norm / k_norm, a learned activation between an MLP's
    layers), so their gradients are summed over the group. (Under SP a module with weights that sees
    sequence shards must be SequenceParallel, or its gradients are partial.) full_sequence=True: a block
    that mixes the sequence (a state-space mixer), run under SP on the full sequence (its input gathered,
    its output split to this rank's shard); what it holds is converted without SP."""

    kind: ClassVar[str] = "replicate"
    sum_grads: bool = False
    full_sequence: bool = False

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        if self.sum_grads and any(True for _ in module.parameters(recurse=False)):
            return sum_param_grads(shell_copy(module), site.group)
        return module


@dataclass(frozen=True, repr=False)
class Experts(Style):
    """A mixture-of-experts module with 3-D expert weights (Hugging Face's gate_up_proj [E, 2I, H] /
    down_proj [E, H, I]): every expert's intermediate features sharded, its output all-reduced
    (tpext.nn.shard_experts); the router beside it is replicated. Under SP the block holding it runs on the
    full sequence, gathered at its input, and returns this rank's shard."""

    kind: ClassVar[str] = "experts"

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        if not is_experts(module):
            raise site.refuse(
                self,
                module,
                "experts takes a module with 3-D expert weights (gate_up_proj "
                "[E, 2I, H] and down_proj [E, H, I]); shard an MLP's nn.Linear "
                "layers with 'colwise' / 'rowwise'",
            )
        return _checked(site, shard_experts, module, site.group)


_BY_NAME = {cls.kind: cls for cls in (Colwise, Rowwise, Vocab, SequenceParallel, Replicate, Experts)}
#: The string shorthands a plan may use for the built-in styles.
STYLES = tuple(_BY_NAME)


def _style_named(
    kind: str, pieces: tuple[Piece, ...] | None = None, gather_output: bool = False, sum_grads: bool = False
) -> Style:
    if kind not in _BY_NAME:
        raise ValueError(
            f"tpext.parallelize: unknown style {kind!r}; styles are {', '.join(STYLES)}, or a "
            "tpext.Style object"
        )
    given = {"pieces": pieces, "gather_output": gather_output, "sum_grads": sum_grads}
    fields = _BY_NAME[kind].__dataclass_fields__
    extra = [k for k, v in given.items() if v not in (None, False) and k not in fields]
    if extra:
        raise ValueError(f"tpext.parallelize: style {kind!r} takes no {', '.join(extra)}")
    return _BY_NAME[kind](**{k: v for k, v in given.items() if k in fields})


def as_style(entry: str | Style) -> Style:
    """A plan entry as a Style: a shorthand name, or a Style object as it is.

    Raises:
        ValueError: an unknown name, or neither a name nor a Style.
    """
    if isinstance(entry, Style):
        return entry
    if isinstance(entry, str):
        return _style_named(entry)
    raise ValueError(
        f"tpext.parallelize: a plan entry must be a style name ({', '.join(STYLES)}) or a tpext.Style, "
        f"got {type(entry).__name__} {entry!r}"
    )
