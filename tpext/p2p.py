"""P2P collectives for small messages: the size policy, and the symmetric buffers of a group.

NCCL is the right engine for large messages; for the all-reduce of a decode step (KBs to a few hundred
KB per layer) its fixed cost dominates, and a kernel that reads every peer's buffer directly wins. The
published anchors on 8xH100: a custom all-reduce at 5.9 us for 512 B and 7.8 us for 32 KB, against
20-40 us for NCCL; all-reduce + residual + RMSNorm fused at 8.7 us against 13.5 us unfused.

    tpext.p2p.enable(group)          # collective, once per group: buffers + IPC handle exchange
    y = layer(x)                     # RowParallelLinear / all_reduce_residual_rmsnorm pick P2P or NCCL

`enable` is collective and all ranks agree on its outcome: either every rank of the group has mapped
every peer's buffer, or none uses P2P and all fall back to the group's collective (NCCL, or gloo on CPU)
with the reason logged once. Several nodes, no peer access, no CUDA or a CPU-only build are such reasons.

The kernels' waits for peers are bounded (`timeout_s` of `enable`): a rank that never arrives (it failed,
refused the call, or runs other work) makes its peers' kernels give up instead of hanging the GPUs, and
the next P2P op on the group, or `check`, raises naming the op, the group and the ranks.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from tpext import _C
from tpext.distributed import GroupLike, resolve_group

__all__ = [
    "P2PAlgorithm",
    "ALGO_C10D",
    "ALGO_ONE_SHOT",
    "ALGO_TWO_SHOT",
    "ONE_SHOT_MAX_BYTES",
    "P2P_MAX_BYTES",
    "MAX_RANKS",
    "DEFAULT_TIMEOUT_S",
    "choose_algorithm",
    "algorithm_for",
    "enable",
    "release",
    "status",
    "check",
    "set_mode",
    "mode",
]

log = logging.getLogger("tpext.p2p")


class P2PAlgorithm(enum.IntEnum):
    """The `algorithm` argument of the p2p ops; mirrors ``tpext::ops::P2PAlgorithm`` (csrc/ops/p2p.h)."""

    COLLECTIVE = 0  # the group's own collective (NCCL, or gloo on CPU)
    ONE_SHOT = 1  # every rank reads every peer's whole buffer: one round, for latency-bound sizes
    TWO_SHOT = 2  # reduce-scatter then all-gather over the buffers: two rounds, 1/R of the reads each


# The names the layers and tests used before the enum (the same values).
ALGO_C10D, ALGO_ONE_SHOT, ALGO_TWO_SHOT = (
    P2PAlgorithm.COLLECTIVE,
    P2PAlgorithm.ONE_SHOT,
    P2PAlgorithm.TWO_SHOT,
)
MAX_RANKS = 8

# Message-size thresholds, in bytes of one rank's input. PROVISIONAL: not yet measured on a GPU. They
# are placed from the anchors above (P2P beats NCCL by 3-5x at 512 B - 32 KB on 8xH100) and from the
# traffic of the two algorithms: one-shot reads R x the message per rank in one barrier round, two-shot
# reads 2 x in two rounds, so one-shot wins while latency dominates and two-shot once bandwidth does;
# above about 1 MB NCCL's pipelined ring/NVLS is expected to win. To be replaced by the crossovers of
# the benchmark owed in docs/p2p.md (bench/results/<device>/).
ONE_SHOT_MAX_BYTES = 64 * 1024
P2P_MAX_BYTES = 1024 * 1024

# The longest a P2P kernel's block waits for one peer before it gives up (and the group becomes
# unusable until enabled again). The kernels themselves take microseconds, so a wait this long means a
# peer is not running the same op. It must still outlast legitimate skew between ranks, because a
# rank's kernel starts waiting as soon as its stream reaches it: one rank compiling (torch.compile) or
# autotuning its first step, lazy initialisation, a GC pause or rank-local logging can hold a peer back
# for seconds to tens of seconds. 60 s covers those and still fails ten times sooner than torch's NCCL
# watchdog (600 s by default), so the P2P error, which names the op and ranks, comes first.
DEFAULT_TIMEOUT_S = 60.0

_MODES = ("auto", "always", "never")
_mode = "auto"
_logged: set[tuple[str, str]] = set()


def set_mode(new_mode: str) -> str:
    """Process-wide P2P policy; returns the previous one. "auto": P2P for CUDA messages up to
    P2P_MAX_BYTES on groups where `enable` succeeded, NCCL otherwise. "always": the layers always call
    the P2P ops (CPU tensors run their host reference; CUDA falls back inside the op, saying why).
    "never": the layers never do. Every rank must use the same mode."""
    global _mode
    if new_mode not in _MODES:
        raise ValueError(f"tpext.p2p.set_mode: mode must be one of {_MODES}, got {new_mode!r}")
    previous, _mode = _mode, new_mode
    return previous


@contextlib.contextmanager
def mode(new_mode: str) -> Iterator[None]:
    """`set_mode` for the duration of a with-block."""
    previous = set_mode(new_mode)
    try:
        yield
    finally:
        set_mode(previous)


def choose_algorithm(nbytes: int, *, world_size: int, p2p_ready: bool) -> P2PAlgorithm:
    """The policy as a pure function of what every rank knows alike: COLLECTIVE (NCCL/gloo), ONE_SHOT or
    TWO_SHOT for a message of `nbytes` bytes per rank."""
    if world_size <= 1 or not p2p_ready or nbytes > P2P_MAX_BYTES:
        return ALGO_C10D
    return ALGO_ONE_SHOT if nbytes <= ONE_SHOT_MAX_BYTES else ALGO_TWO_SHOT


def status(group: GroupLike = None) -> str:
    """'' when the group's symmetric buffers are ready, else the reason they are not."""
    return _C.p2p_status(resolve_group(group).group_name)


def algorithm_for(x: Tensor, group: dist.ProcessGroup, nbytes: int | None = None) -> P2PAlgorithm | None:
    """What a layer should do with a message shaped like `x` (or of `nbytes`): None = its own
    collective path; otherwise the `algorithm` to pass to a p2p op."""
    if _mode == "never" or group.size() == 1:
        return None
    nbytes = x.numel() * x.element_size() if nbytes is None else nbytes
    if _mode == "always":
        algo = choose_algorithm(min(nbytes, P2P_MAX_BYTES), world_size=group.size(), p2p_ready=True)
        return algo
    if not x.is_cuda or nbytes > P2P_MAX_BYTES:
        return None
    reason = status(group)
    if reason:
        _log_once(group.group_name, reason)
        return None
    return choose_algorithm(nbytes, world_size=group.size(), p2p_ready=True)


def _agreed_launch(infos: list) -> tuple[int, int]:
    """(grid cap, wait budget in ns) every rank uses, from the ranks' (..., max_blocks, timeout_s): the
    fewest blocks any rank's GPU holds at once (so the blocks of a launch are co-resident on every GPU:
    the grid must be the same on all ranks, and a block waits only on blocks of its own index), and the
    longest budget any rank asked for."""
    max_blocks = min(int(info[5]) for info in infos)
    timeout_ns = max(int(round(float(info[6]) * 1e9)) for info in infos)
    return max_blocks, timeout_ns


def _group_obstacle(infos: list) -> str:
    """Why the ranks (hostname, reason, handle, capacity, GPU uuid, max_blocks, timeout_s) cannot share
    P2P buffers, or ''.
    The checks of hosts, capacities and GPUs agree on every rank (same gathered list); peer visibility
    and access are this process's view, which `enable` shares before deciding."""
    hosts = sorted({info[0] for info in infos})
    if len(hosts) > 1:
        return f"the group spans {len(hosts)} hosts; P2P needs all ranks on one node"
    capacities = sorted({info[3] for info in infos})
    if len(capacities) > 1:  # each rank finds a peer's signal flags after the data, by its own capacity
        return f"ranks asked for different buffer capacities {capacities}; pass the same capacity_bytes everywhere"
    if min(int(info[5]) for info in infos) < 1:
        return "a rank's GPU cannot hold one block of the P2P kernels at once (occupancy 0)"
    uuids = [info[4] for info in infos]
    if len(set(uuids)) < len(uuids):  # two ranks spinning on one GPU would wait on each other forever
        return "several ranks share one GPU; P2P needs one GPU per rank"
    visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    me = torch.cuda.current_device()
    for uuid in uuids:
        peer = visible.get(uuid)
        if peer is None:
            return "a peer's GPU is not visible to this process, so peer access cannot be checked"
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return f"GPU {me} cannot access GPU {peer} directly (no P2P between them)"
    return ""


def enable(
    group: GroupLike = None, capacity_bytes: int = P2P_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S
) -> bool:
    """Collective over `group`: allocate this rank's symmetric buffer on the current CUDA device,
    exchange the CUDA IPC handles through the group, map every peer's buffer.

    Args:
        group: the process group (default: the world).
        capacity_bytes: bytes of one rank's buffer, the largest message P2P serves; the same on every rank.
        timeout_s: the longest a kernel's block waits for one peer (see DEFAULT_TIMEOUT_S); the ranks
            use the largest value any of them passed.

    Returns:
        True when every rank succeeded; otherwise False on every rank, the reason recorded (`status`)
        and logged once. Ranks must be on one node, one GPU each, with peer access between all GPUs.

    Raises:
        ValueError: timeout_s is not a positive number (on the rank that passed it, before any exchange).

    Also destroys the buffers of groups dropped earlier (a safe point: no op in flight on this thread).
    """
    if not timeout_s > 0:
        raise ValueError(f"tpext.p2p.enable: timeout_s must be > 0 seconds, got {timeout_s!r}")
    pg = resolve_group(group)
    name, world = pg.group_name, pg.size()
    _C.p2p_drain()
    if world == 1:
        return False  # nothing to exchange with; the ops never communicate for a group of one
    reason, handle, max_blocks, uuid = _local_obstacle(world), b"", 0, ""
    if not reason:
        try:
            device = torch.cuda.current_device()
            max_blocks = _C.p2p_max_blocks(device)
            handle = _C.p2p_create(name, pg.rank(), world, int(capacity_bytes), device)
            uuid = str(torch.cuda.get_device_properties(device).uuid)
        except RuntimeError as exc:
            reason = f"allocating the symmetric buffer failed: {exc}"
    infos: list = [None] * world
    mine = (socket.gethostname(), reason, handle, int(capacity_bytes), uuid, max_blocks, float(timeout_s))
    dist.all_gather_object(infos, mine, group=pg)
    reason = next((info[1] for info in infos if info[1]), "") or _group_obstacle(infos)
    error = ""
    if not reason:
        try:
            _C.p2p_open(name, [info[2] for info in infos], *_agreed_launch(infos))
        except RuntimeError as exc:
            error = str(exc)
    # Agree: one rank that could not map its peers, or that found an obstacle only it can see (peer
    # access, visibility), makes every rank fall back, or P2P kernels on the others would wait for it
    # forever.
    errors: list = [None] * world
    dist.all_gather_object(errors, reason or error, group=pg)
    reason = next((e for e in errors if e), "")
    if reason:
        _C.p2p_release(name)
        _C.p2p_mark_unavailable(name, reason)
        _log_once(name, reason)
        return False
    return True


def check(group: GroupLike = None) -> None:
    """Raises RuntimeError when the group's P2P kernels gave up waiting (a peer never arrived, or a rank
    refused a call its peers had launched): the message names the op, the group and the ranks. Reads
    one host word; no synchronisation, so it reports what the kernels finished so far (synchronise the
    stream first to include the launches in flight). The P2P ops make the same check on every call.

    Args:
        group: the process group (default: the world).

    Raises:
        RuntimeError: the group's kernels were aborted; release and enable it again on every rank.
    """
    _C.p2p_check(resolve_group(group).group_name)


def release(group: GroupLike = None) -> None:
    """Collective: free the group's symmetric buffers once no rank can still be using them (and the
    buffers of groups dropped earlier)."""
    pg = resolve_group(group)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if pg.size() > 1:
        dist.barrier(group=pg)
    _C.p2p_release(pg.group_name)


def _local_obstacle(world: int) -> str:
    if world > MAX_RANKS:
        return f"the group has {world} ranks; the P2P kernels support at most {MAX_RANKS}"
    if not _C.cuda_compiled:
        return "tpext was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return ""


def _log_once(group_name: str, reason: str) -> None:
    if (group_name, reason) in _logged:
        return
    _logged.add((group_name, reason))
    log.warning("tpext.p2p: group %r uses its own collective (NCCL/gloo), not P2P: %s", group_name, reason)


def _reset_log() -> None:
    """Forget which reasons were logged, here and in the C++ ops (tests)."""
    _logged.clear()
    _C.p2p_reset_warnings()
