"""Communication accounting: every collective tpext issues, by kind, bytes, phase and module.

    with tpext.comm_stats() as s:
        loss = model(x).sum()
        loss.backward()
    s.count("all_reduce", phase="forward")      # -> 1 for a Column->Row MLP without SP
    print(s.table())

Bytes are those of the full (unsharded) tensor the collective produces or consumes: an all-reduce of
[s, h] and the all-gather + reduce-scatter pair that replaces it under sequence parallelism both count
s*h elements, so the two layouts compare directly. Collectives of groups of size 1 are not issued and
not counted. Recording is a Python-level side effect and is skipped while torch.compile traces.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["CommRecord", "CommStats", "comm_stats", "record", "module_scope", "scope_for"]

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class CommRecord:
    kind: str  # one of KINDS
    phase: str  # "forward" or "backward"
    nbytes: int  # bytes of the full (unsharded) tensor
    module: str  # the tpext module that issued it ("" outside any)
    world_size: int


class CommStats:
    """The records of one `comm_stats()` block, with a few ways to slice them."""

    def __init__(self) -> None:
        self.records: list[CommRecord] = []

    def _select(self, kind: str | None, phase: str | None, module: str | None) -> list[CommRecord]:
        return [
            r
            for r in self.records
            if (kind is None or r.kind == kind)
            and (phase is None or r.phase == phase)
            and (module is None or r.module == module)
        ]

    def count(self, kind: str | None = None, *, phase: str | None = None, module: str | None = None) -> int:
        return len(self._select(kind, phase, module))

    def bytes(self, kind: str | None = None, *, phase: str | None = None, module: str | None = None) -> int:
        return sum(r.nbytes for r in self._select(kind, phase, module))

    def by_kind(self, phase: str | None = None) -> dict[str, int]:
        """{kind: count} for one phase (or both)."""
        return dict(Counter(r.kind for r in self._select(None, phase, None)))

    def table(self) -> str:
        """One line per (module, phase, kind): calls and bytes."""
        rows: dict[tuple[str, str, str], list[int]] = {}
        for r in self.records:
            agg = rows.setdefault((r.module or "-", r.phase, r.kind), [0, 0])
            agg[0] += 1
            agg[1] += r.nbytes
        width = max([len("module")] + [len(k[0]) for k in rows])
        lines = [f"{'module':<{width}}  {'phase':<8}  {'collective':<14}  {'calls':>5}  {'bytes':>12}"]
        lines += [f"{m:<{width}}  {p:<8}  {k:<14}  {c:>5}  {b:>12,}" for (m, p, k), (c, b) in rows.items()]
        return "\n".join(lines)


# A plain global, not a context variable: backward runs on autograd engine threads (one per CUDA device),
# which must see the same active blocks as the thread that opened them.
_active: list[CommStats] = []
_module: contextvars.ContextVar[str] = contextvars.ContextVar("tpext_comm_module", default="")


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count the collectives tpext issues inside the block, forward and backward; nesting allowed.

    Records nothing under torch.compile (compiled graphs run without the Python accounting).

    Returns:
        A context manager yielding a CommStats: ``count(kind, phase=, module=)``, ``bytes(...)``,
        ``by_kind(phase)`` and ``table()``.

    Example:
        >>> with tpext.comm_stats() as stats:
        ...     layer(x).sum().backward()
        >>> stats.count("all_reduce", phase="backward")
        1
    """
    stats = CommStats()
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)


def module_scope(name: str) -> contextlib.AbstractContextManager:
    """Attribute the collectives issued inside the block to module `name` (nothing under torch.compile,
    which records nothing)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _set_module(name)


@contextlib.contextmanager
def _set_module(name: str) -> Iterator[None]:
    token = _module.set(name)
    try:
        yield
    finally:
        _module.reset(token)


def current_module() -> str:
    return "" if torch.compiler.is_compiling() else _module.get()


def scope_for(module) -> contextlib.AbstractContextManager:
    """The scope a tpext module runs its forward in: an enclosing scope if any, else its name in the model
    (set by tpext.parallelize, e.g. "model.layers.3.mlp.down_proj"), else its class name."""
    return module_scope(current_module() or getattr(module, "_tpext_stats_name", type(module).__name__))


def record(
    kind: str,
    numel: int,
    dtype: torch.dtype,
    world_size: int,
    *,
    backward: bool = False,
    module: str | None = None,
) -> None:
    """Account one collective. Called by tpext's own communication paths, never by users."""
    if kind not in KINDS:
        raise ValueError(f"tpext: unknown collective kind {kind!r}; expected one of {KINDS}")
    if not _active or torch.compiler.is_compiling():
        return
    rec = CommRecord(
        kind,
        "backward" if backward else "forward",
        numel * dtype.itemsize,
        current_module() if module is None else module,
        world_size,
    )
    for stats in _active:
        stats.records.append(rec)
