"""What the model tests share: tiny Hugging Face models built the same on every rank, and a parallelized
model's logits, loss and gradients checked against the dense model's."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch

import tpext
from tpext import mappings
from tpext.sharding import layouts

#: Special token ids inside the tiny vocabularies (the configs' defaults are beyond them).
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)


def perturb_(
    model: torch.nn.Module, scale: float = 0.05, pick: Callable[[str], bool] | None = None
) -> torch.nn.Module:
    """Moves parameters off their init (zero biases, norm scales of ones) by `scale` times normal noise
    seeded by each parameter's name, so the same on every rank and whatever the parameters' order.

    Args:
        model: the model, changed in place.
        scale: the noise's standard deviation.
        pick: which parameters, by name (None: all).

    Returns:
        `model`.

    Example:
        >>> perturb_(model, 0.1, pick=lambda name: "norm" in name)
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pick is None or pick(name):
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_hf_model(
    config_cls: type | str,
    model_cls: type | str,
    settings: dict[str, Any],
    dtype: torch.dtype = torch.float64,
    attn: str = "eager",
    **perturb: Any,
) -> torch.nn.Module:
    """A Hugging Face model from a tiny config, built from seed 0 and moved off its init by `perturb_`: the
    same on every rank. In fp64 experts run their eager loop.

    Args:
        config_cls, model_cls: the transformers classes, or their names.
        settings: the config's keyword arguments.
        dtype: the parameters' dtype.
        attn: the attention implementation.
        **perturb: scale / pick of `perturb_`.

    Returns:
        The model, in training mode.

    Example:
        >>> model = tiny_hf_model("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, vocab_size=128))
    """
    import transformers

    if isinstance(config_cls, str):
        config_cls = getattr(transformers, config_cls)
    if isinstance(model_cls, str):
        model_cls = getattr(transformers, model_cls)
    config = config_cls(**settings)
    config._attn_implementation = attn
    if dtype == torch.float64:
        config._experts_implementation = "eager"  # grouped_mm takes no fp64
    torch.manual_seed(0)
    return perturb_(model_cls(config).to(dtype), **perturb)


def lm_inputs(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in [2, vocab) (0 and 1 are the tiny configs' special tokens) and labels with about a fifth of
    them ignored (-100), from seed 1: the same on every rank.

    Returns:
        (ids, labels), both [batch, seq].

    Example:
        >>> ids, labels = lm_inputs(128, 2, 8)
    """
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (batch, seq), generator=gen)
    return ids, ids.masked_fill(torch.rand(ids.shape, generator=gen) < 0.2, -100)


def lm_step(model: torch.nn.Module, **inputs: Any) -> Any:
    """One forward with labels and the backward of its loss, after `torch.manual_seed(5)`: a model that draws
    random numbers in training (a sampling router) draws the same ones in the dense and the parallel run.

    Args:
        model: a causal LM whose output has .loss and .logits.
        **inputs: its forward's keyword arguments (input_ids, labels, ...).

    Returns:
        The model's output.

    Example:
        >>> ref, out = lm_step(dense, input_ids=ids, labels=labels), lm_step(model, input_ids=ids, labels=labels)
    """
    torch.manual_seed(5)
    out = model(**inputs)
    out.loss.backward()
    return out


def assert_lm_matches(
    model: torch.nn.Module,
    dense: torch.nn.Module,
    out: Any,
    ref: Any,
    what: str,
    grad_tol: dict[str, float] | None = None,
    **tol: float,
) -> int:
    """The parallelized `model`'s output `out` against the dense model's `ref` (both after `lm_step`): the
    logits (gathered first where the model's are vocab-parallel), the loss, as many tpext.sharding layout
    entries as the dense model's, and every parameter gradient (`assert_grads_match`).

    Args:
        model, dense: the parallelized model and the dense one it was made from.
        out, ref: their outputs.
        what: the case, for the messages.
        grad_tol: rtol / atol for the gradients (None: `tol`).
        **tol: rtol / atol of torch.testing.assert_close.

    Returns:
        How many gradients were compared.

    Example:
        >>> assert_lm_matches(model, dense, out, ref, "llama tp=2", rtol=1e-5, atol=1e-6)
    """
    vocab = ref.logits.shape[-1]
    logits = out.logits if out.logits.shape[-1] == vocab else mappings.gather_from_tp(out.logits, vocab)
    torch.testing.assert_close(logits, ref.logits, **tol, msg=lambda m: f"{what}: logits: {m}")
    torch.testing.assert_close(out.loss, ref.loss, **tol, msg=lambda m: f"{what}: loss: {m}")
    assert len(layouts(model)) == len(layouts(dense)), what
    return assert_grads_match(model, dense, what, **(tol if grad_tol is None else grad_tol))


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


def collectives_under(model: torch.nn.Module, prefix: str, **inputs: Any) -> list[tuple[str, str, str, int]]:
    """The collectives tpext issues for the modules under `prefix` in one forward with labels and the
    backward of its loss, as `tpext.comm_stats` records them.

    Returns:
        Sorted (phase, collective, module name below `prefix`, bytes) tuples.

    Example:
        >>> collectives_under(model, "model.layers.0.self_attn", input_ids=ids, labels=labels)
        [('backward', 'all_reduce', 'q_proj', 8192), ...]
    """
    with tpext.comm_stats() as stats:
        model(**inputs).loss.backward()
    return sorted(
        (r.phase, r.kind, r.module.removeprefix(prefix + "."), r.nbytes)
        for r in stats.records
        if r.module.startswith(prefix)
    )
