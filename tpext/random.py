"""Model-parallel RNG: dropout inside tensor-parallel regions differs per rank, elsewhere it is identical.

    tpext.random.model_parallel_seed(1234)            # once, after init_process_group
    x = dropout(x)                                     # replicated region: same mask on every rank
    with tpext.random.get_rng_tracker().fork():
        h = dropout(h)                                 # TP region (sharded activations): per-rank masks

The default generators (CPU and the current CUDA device) get `seed` on every rank; the tracker's
"tensor-parallel" state gets seed + 2718 + tp_rank. fork() swaps it in and restores the default state
afterwards, keeping the advanced TP state for the next fork.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tpext.distributed import GroupLike, resolve_group

__all__ = ["RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "TP_RNG"]

TP_RNG = "tensor-parallel"
_TP_SEED_OFFSET = 2718  # keeps the TP stream apart from the default stream seeded with the same seed


def _get_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


def _set_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class RNGStatesTracker:
    """Named RNG states (CPU + current CUDA device) that can be swapped in with fork(name)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset(self) -> None:
        self._states.clear()

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"tpext: RNG state {name!r} already exists")
        saved = _get_state()
        torch.manual_seed(seed)  # seeds CPU and every CUDA device
        self._states[name] = _get_state()
        _set_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        if name not in self._states:
            raise RuntimeError(
                f"tpext: RNG state {name!r} is not set; call tpext.random.model_parallel_seed(seed)"
            )
        saved = _get_state()
        _set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state()
            _set_state(saved)


_tracker = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _tracker


def model_parallel_seed(seed: int, group: GroupLike = None) -> None:
    """Seed the default RNG identically on all ranks and the TP RNG differently per rank of `group`."""
    rank = resolve_group(group).rank()
    torch.manual_seed(seed)
    _tracker.reset()
    _tracker.add(TP_RNG, seed + _TP_SEED_OFFSET + rank)
