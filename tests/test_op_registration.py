"""Every tpext op has the kernels it should, per dispatch key, in the build under test, and no test-only
op is in the public tpext namespace.

Every build serves CPU, CUDA, Meta (the fake kernels of tpext/ops/), and the GEMM ops also autograd and
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
P2P_OPS = (
    "p2p_all_reduce",
    "p2p_reduce_scatter",
    "p2p_all_gather",
    "p2p_all_reduce_residual_rmsnorm",
    "p2p_rmsnorm_backward",
)
# torch.ops.tpext_testing.* (csrc/testing_bindings.cpp): the virtual-rank ops of the tests.
TESTING_OPS = (
    "p2p_virtual_all_reduce",
    "p2p_virtual_reduce_scatter",
    "p2p_virtual_all_gather",
    "p2p_virtual_all_reduce_residual_rmsnorm",
    "run_on_virtual_ranks",
)


def _expected_keys(op: str) -> set[str]:
    keys = {"CPU", "CUDA", "Meta"}
    if op in GEMM_OPS:  # the GEMM ops run in the autocast dtype; the P2P ops take what they are given
        keys |= {"AutocastCPU", "AutocastCUDA", "Autograd"}
    return keys


def _registered(namespace: str) -> set[str]:
    names = torch._C._dispatch_get_all_op_names()
    return {n.split("::", 1)[1] for n in names if n.startswith(f"{namespace}::")}


@pytest.mark.parametrize("namespace, table", [("tpext", GEMM_OPS + P2P_OPS), ("tpext_testing", TESTING_OPS)])
def test_the_op_table_lists_every_registered_op(namespace, table):
    registered = _registered(namespace)
    assert registered == set(table), (
        f"{namespace} ops registered but not in this table: {sorted(registered - set(table))}; "
        f"in the table but not registered: {sorted(set(table) - registered)}"
    )


def test_no_test_only_op_in_the_public_namespace():
    public = _registered("tpext")
    assert not {n for n in public if "virtual" in n or n.startswith("_")}, sorted(public)


@pytest.mark.parametrize("op", GEMM_OPS + P2P_OPS)
def test_op_has_its_kernels(op):
    missing = sorted(
        k for k in _expected_keys(op) if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tpext::{op}", k)
    )
    assert not missing, f"tpext::{op} has no kernel for {missing} (cuda_compiled={tpext.cuda_compiled})"


@pytest.mark.parametrize("op", TESTING_OPS)
def test_testing_op_has_its_kernels(op):
    # run_on_virtual_ranks has no fake kernel: it is a test driver, never traced.
    keys = {"CPU", "CUDA"} | (set() if op == "run_on_virtual_ranks" else {"Meta"})
    name = f"tpext_testing::{op}"
    missing = sorted(k for k in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(name, k))
    assert not missing, f"{name} has no kernel for {missing} (cuda_compiled={tpext.cuda_compiled})"
