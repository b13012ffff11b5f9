"""Giving an existing module tpext behaviour without replacing its code: a copy of the module whose class
is derived from its own class and a tpext mixin, so its forward, names, buffers and `isinstance` stay."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

_DERIVED: dict[tuple[type, type, bool], type] = {}


def derived_class(cls: type, mixin: type, *, wraps: bool) -> type:
    """A class derived from `cls` and `mixin`, named as cls. wraps=True puts the mixin first in the MRO (its
    forward wraps cls's, reached by super()); False puts it after cls (cls's super().forward reaches the
    mixin's, which stands in for cls's base class's)."""
    key = (cls, mixin, wraps)
    if key not in _DERIVED:
        bases = (mixin, cls) if wraps else (cls, mixin)
        _DERIVED[key] = type(
            cls.__name__, bases, {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        )
    return _DERIVED[key]


def shell_copy(module: nn.Module) -> nn.Module:
    """A new module object with module's attributes, the same parameters, buffers and children, and dicts
    of its own for them, so changing the copy leaves the original as it was."""
    new = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        new.__dict__[attr] = dict(module.__dict__[attr])
    return new


def probe_copy(module: nn.Module) -> nn.Module:
    """A CPU fp32 copy of `module` to check what its forward computes before tpext relies on it: random
    parameters in [0.5, 1.5) (the model's may be on meta, or all ones), the module's own buffers (random
    too where they are on meta). The same on every rank; the global RNG is left alone."""
    probe = copy.deepcopy(module).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        own = dict(module.named_buffers())
        for name, b in probe.named_buffers():
            if own[name].is_meta:
                b.copy_(
                    torch.rand(b.shape, generator=gen) + 0.5
                    if b.is_floating_point()
                    else torch.zeros(b.shape)
                )
            else:
                b.copy_(own[name])
    return probe.float()


def probe_disagrees(
    run: Callable[[], tuple[Tensor, Tensor]], *, rtol: float, atol: float, differs: str
) -> str:
    """Why a probe's (got, want), computed by `run` without autograd, disagree: "" when they are close,
    `differs` when they are not, or the exception `run` raised (the module cannot run that way)."""
    try:
        with torch.no_grad():
            got, want = run()
        return "" if torch.allclose(got, want, rtol=rtol, atol=atol) else differs
    except Exception as exc:  # e.g. a shape check against the dense sizes
        return f"{type(exc).__name__}: {exc}"
