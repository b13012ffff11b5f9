"""Checks the model tests share: a parallelized model's gradients against the dense model's."""

from __future__ import annotations

import torch

from tpext.sharding import layouts


def assert_grads_match(model: torch.nn.Module, dense: torch.nn.Module, what: str, **tol) -> int:
    """Every parameter gradient of the parallelized `model` is this rank's slice (by its tpext.sharding
    layout) of the dense model's gradient; one the dense model has none of (an expert no token chose) must
    be none or zero. Returns how many gradients were compared.

    Args:
        model: the parallelized model, after backward.
        dense: the dense model it was parallelized from, after the same backward.
        what: the case, for the messages.
        **tol: rtol / atol of torch.testing.assert_close.

    Example:
        >>> assert_grads_match(model, dense, "llama tp=2", rtol=1e-5, atol=1e-6)
    """
    compared = 0
    for e in (e for e in layouts(model) if isinstance(e.tensor, torch.nn.Parameter)):
        dense_grad = dense.get_parameter(e.names[0]).grad
        if dense_grad is None:
            assert e.tensor.grad is None or not e.tensor.grad.any(), (
                f"{what}: grad {e.names}: none in the dense model"
            )
            continue
        assert e.tensor.grad is not None, f"{what}: grad {e.names}: none, the dense model has one"
        torch.testing.assert_close(
            e.tensor.grad,
            e.layout.local_from_dense(dense_grad),
            **tol,
            msg=lambda m: f"{what}: grad {e.names}: {m}",
        )
        compared += 1
    return compared
