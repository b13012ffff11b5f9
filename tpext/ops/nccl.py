"""tpext's own NCCL communicators (CUDA builds): per-group options, introspection and teardown."""

from __future__ import annotations

import atexit

from tpext import _C
from tpext.distributed import GroupLike, group_name

__all__ = [
    "set_nccl_options",
    "nccl_options",
    "nccl_comm_info",
    "destroy_nccl_communicators",
    "abort_nccl_communicators",
]


def _require_cuda_build(what: str) -> None:
    if not _C.cuda_compiled:
        raise RuntimeError(
            f"tpext.ops.{what}: this tpext build has no CUDA support (built against a CPU "
            "torch or with TPEXT_FORCE_CPU=1); the NCCL communicator exists only in CUDA builds"
        )


def set_nccl_options(
    group: GroupLike = None, *, max_ctas: int = 0, cga_cluster_size: int = 0, local_fast_path: bool = True
) -> None:
    """Options of tpext's NCCL communicator for `group` (CUDA tensors). Call on every rank with the same
    values, before the ops; a changed setting drops the cached communicator and the next op re-creates it.

    Args:
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        max_ctas: most CTAs (NCCL channels, hence SMs) one NCCL kernel of this group launches, so the
            overlapped GEMM keeps the rest (ncclConfig_t.maxCTAs; 0 = NCCL's default).
        cga_cluster_size: ncclConfig_t.cgaClusterSize (0 = NCCL's default).
        local_fast_path: False sends a group of one through the real NCCL path (tests).

    Raises:
        RuntimeError: a CPU build, or a value out of range.

    Example:
        >>> tpext.ops.set_nccl_options(tp_group, max_ctas=8)
    """
    _require_cuda_build("set_nccl_options")
    _C._set_nccl_options(group_name(group), int(max_ctas), int(cga_cluster_size), bool(local_fast_path))


def nccl_options(group: GroupLike = None) -> dict:
    """The options set for `group` (the defaults if none were).

    Args:
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).

    Returns:
        {"max_ctas": int, "cga_cluster_size": int, "local_fast_path": bool}.

    Raises:
        RuntimeError: a CPU build.

    Example:
        >>> tpext.ops.nccl_options(tp_group)["max_ctas"]
    """
    _require_cuda_build("nccl_options")
    return _C._nccl_options(group_name(group))


def nccl_comm_info(group: GroupLike = None) -> dict:
    """Whether `group`'s NCCL communicator exists, and its rank, size, device and creation options.

    Args:
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).

    Returns:
        {"created": bool, "rank": int, "size": int, "device": int, "options": dict as `nccl_options`}.

    Raises:
        RuntimeError: a CPU build.

    Example:
        >>> tpext.ops.nccl_comm_info(tp_group)["created"]   # False until the first op on the group
    """
    _require_cuda_build("nccl_comm_info")
    return _C._nccl_comm_info(group_name(group))


def destroy_nccl_communicators() -> None:
    """Finalize and destroy every NCCL communicator tpext made (all groups). Finalize waits for the peers
    to finalize too; a communicator with an asynchronous NCCL error is aborted instead. Runs at exit; the
    next op on a group creates a new communicator (collectively). A no-op in a CPU build.

    Example:
        >>> tpext.ops.destroy_nccl_communicators()  # on every rank, before destroy_process_group()
    """
    if _C.cuda_compiled:
        _C._destroy_nccl_communicators()


def abort_nccl_communicators() -> None:
    """Abort every NCCL communicator tpext made (ncclCommAbort): never waits for peers and drops the
    collectives still queued. Call it when a peer failed or the group is given up (e.g. in an exception
    handler before exiting), where `destroy_nccl_communicators` would wait for the gone peer. The next op
    on a group creates a new communicator (collectively). A no-op in a CPU build.

    Example:
        >>> try:
        ...     train_step()
        ... except Exception:
        ...     tpext.ops.abort_nccl_communicators()
        ...     raise
    """
    if _C.cuda_compiled:
        _C._abort_nccl_communicators()


if _C.cuda_compiled:
    # NCCL communicators are finalized while the CUDA runtime is still alive (not at static destruction).
    atexit.register(_C._destroy_nccl_communicators)
