"""tpext's ops: one typed wrapper per torch.ops.tpext.* op (each with its fake kernel, so torch.compile
and FakeTensor trace them without running them), and the runtime schedule policy of the GEMM ops.

Each wrapper takes a group (ProcessGroup, 1-D DeviceMesh or None for the world group) and passes its
registered name to the op; the schemas live in csrc/torch_bindings.cpp.

The GEMM ops take a *schedule*: ``chunks`` (int or "auto") and ``algorithm`` (an `Algorithm`, its int,
or "auto"), both "auto" by default; `resolve_schedule` fills in the "auto" parts from the rows of the
GEMM output, the bytes per row its collective moves, the group size and the device (tpext/ops/schedule.py).

Modules: gemm_collectives (gemm_all_reduce, gemm_reduce_scatter, all_gather_gemm), p2p_collectives
(the p2p_* ops; policy in tpext.p2p), nccl (tpext's NCCL communicators), schedule (the policy),
testing (fake kernels of the test-only torch.ops.tpext_testing.* ops).
"""

from tpext import _C  # noqa: F401  (registers the op schemas before the fake kernels below)
from tpext.ops import schedule, testing  # noqa: F401  (testing: fake kernels of torch.ops.tpext_testing.*)
from tpext.ops.gemm_collectives import all_gather_gemm, gemm_all_reduce, gemm_reduce_scatter
from tpext.ops.nccl import (
    abort_nccl_communicators,
    destroy_nccl_communicators,
    nccl_comm_info,
    nccl_options,
    set_nccl_options,
)
from tpext.ops.p2p_collectives import (
    p2p_all_gather,
    p2p_all_reduce,
    p2p_all_reduce_residual_rmsnorm,
    p2p_reduce_scatter,
)
from tpext.ops.schedule import *  # noqa: F403  (the schedule policy's names, its __all__)

__all__ = [
    "gemm_all_reduce",
    "gemm_reduce_scatter",
    "all_gather_gemm",
    "p2p_all_reduce",
    "p2p_reduce_scatter",
    "p2p_all_gather",
    "p2p_all_reduce_residual_rmsnorm",
    "set_nccl_options",
    "nccl_options",
    "nccl_comm_info",
    "destroy_nccl_communicators",
    "abort_nccl_communicators",
    *schedule.__all__,
]
