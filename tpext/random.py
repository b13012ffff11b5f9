"""Model-parallel RNG: dropout inside tensor-parallel regions differs per rank, elsewhere it is identical.

    tpext.random.model_parallel_seed(1234)            # once, after init_process_group
    x = dropout(x)                                     # replicated region: same mask on every rank
    with tpext.random.get_rng_tracker().fork():
        h = dropout(h)                                 # TP region (sharded activations): per-rank masks

The default generators (CPU and the current CUDA device) get `seed` on every rank; the tracker's
"tensor-parallel" state gets seed + 2718 + tp_rank. fork() swaps it in and restores the default state
afterwards, keeping the advanced TP state for the next fork.

A model made tensor-parallel by tpext.parallelize draws its dropout masks from the default generators, so
every rank of a tensor-parallel group must hold the same default RNG state: replicated activations would
otherwise get a different mask on each rank, and the ranks would compute no one model. `check_rng_in_step`
(attached by parallelize) checks it at the first training forward that draws random numbers.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group

__all__ = ["RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "TP_RNG", "check_rng_in_step"]

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


def _default_states() -> dict[str, torch.Tensor]:
    """The default generators' states: the CPU's and, once CUDA is initialized, the current device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


class _RngInStep(SharesGroupOnCopy):
    """Forward pre-hook and hook of a parallelized model, until its first training forward that draws random
    numbers (dropout): the default generators it drew from must have been in the same state on every rank
    of the group, checked with one all-reduce. Forwards that draw nothing (eval mode, no dropout) only
    compare the local states; after the check the hooks do nothing."""

    def __init__(self, group, name: str):
        self.group, self.name = group, name
        self.checked = False
        self._before: dict[str, torch.Tensor] | None = None

    def before(self, module: nn.Module, args: tuple) -> None:
        if self.checked or not module.training or torch.compiler.is_compiling():
            return
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph being captured: no state reads (the eager forwards before it are checked)
        self._before = _default_states()

    def after(self, module: nn.Module, args: tuple, output) -> None:
        before, self._before = self._before, None
        if before is None or self.checked:
            return
        now = _default_states()
        drawn = [k for k in before if not torch.equal(before[k], now[k])]
        if not drawn:
            return
        self.checked = True
        digests = [zlib.crc32(before[k].numpy().tobytes()) if k in drawn else 0 for k in ("cpu", "cuda")]
        device = (
            "cpu"
            if "gloo" in str(dist.get_backend(self.group))
            else torch.device("cuda", torch.cuda.current_device())
        )
        both = torch.tensor([*digests, *(-d for d in digests)], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both[:2].tolist(), (-both[2:]).tolist()
        differ = [k for k, hi, lo in zip(("cpu", "cuda"), high, low) if hi != lo]
        if differ:
            raise ValueError(
                f"tpext.parallelize: {self.name} drew random numbers (dropout) in training from default "
                f"{' and '.join(g.upper() for g in differ)} generators whose states differ across the ranks of "
                "its tensor-parallel group, so replicated activations got a different mask on each rank and "
                "the ranks compute no one model; seed them alike on every rank of the group "
                "(tpext.random.model_parallel_seed(seed), or torch.manual_seed(seed) with the same seed) "
                "before training, and keep rank-dependent draws (data shuffling) off the default generators"
            )


def check_rng_in_step(model: nn.Module, group: GroupLike = None, name: str = "the model") -> None:
    """Check that the ranks of `group` draw `model`'s random numbers alike: at its first training forward
    that draws any (dropout), the default generators' states it started from must be equal on every rank.

    tpext.parallelize attaches it to the model it converts. It costs a copy of the generators' states per
    training forward until then, one all-reduce of four integers then, and nothing after.

    Args:
        model: the parallelized model.
        group: its tensor-parallel group (None: the default group).
        name: what the error calls the model.

    Raises:
        ValueError: at that forward, when the states differ across the ranks (a seed that depends on the
            rank, or rank-dependent draws from the default generators before it).

    Example:
        >>> tpext.random.model_parallel_seed(1234)   # or torch.manual_seed(1234) on every rank
        >>> tpext.parallelize(model)                 # attaches the check
    """
    pg = resolve_group(group)
    if pg.size() == 1:
        return
    hook = _RngInStep(pg, name)
    model.register_forward_pre_hook(hook.before)
    model.register_forward_hook(hook.after)
