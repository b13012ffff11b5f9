"""Every tpext op has the kernels it should, per dispatch key, in the build under test.

Every build serves CPU, CUDA, Meta (the fake kernels of tpext/ops.py), and the GEMM ops also autograd and
autocast on both devices. A CPU build registers the same host code for CUDA tensors too, which then run
through the group's c10d backend; a CUDA build (`tpext.cuda_compiled`) runs them on its own NCCL
communicator and kernels. Checked on the dispatcher itself, so a kernel left out of a registration list
fails here, in CI, on a machine without a GPU (tools/cuda_build_check.sh runs this suite against the CUDA
build).
"""

from __future__ import annotations

import pytest
import torch

import tpext

GEMM_OPS = ("gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm")
P2P_OPS = ("p2p_all_reduce", "p2p_reduce_scatter", "p2p_all_gather", "p2p_all_reduce_residual_rmsnorm",
           "p2p_rmsnorm_backward", "p2p_virtual_all_reduce", "p2p_virtual_reduce_scatter",
           "p2p_virtual_all_gather", "p2p_virtual_all_reduce_residual_rmsnorm")


def _expected_keys(op: str) -> set[str]:
    keys = {"CPU", "CUDA", "Meta"}
    if op in GEMM_OPS:  # the GEMM ops run in the autocast dtype; the P2P ops take what they are given
        keys |= {"AutocastCPU", "AutocastCUDA", "Autograd"}
    return keys


def test_the_op_table_lists_every_registered_op():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tpext::")}
    assert registered == set(GEMM_OPS + P2P_OPS), (
        f"ops registered but not in this table: {sorted(registered - set(GEMM_OPS + P2P_OPS))}; "
        f"in the table but not registered: {sorted(set(GEMM_OPS + P2P_OPS) - registered)}")


@pytest.mark.parametrize("op", GEMM_OPS + P2P_OPS)
def test_op_has_its_kernels(op):
    missing = sorted(k for k in _expected_keys(op)
                     if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tpext::{op}", k))
    assert not missing, f"tpext::{op} has no kernel for {missing} (cuda_compiled={tpext.cuda_compiled})"

