"""``lorafx.verify_merge``: how far a merged model's outputs are from the unmerged ones, on your inputs.

Merging folds ``s·BᵉAᵉ`` into ``W`` and rounds once to the base dtype, so the merged model differs
from the unmerged one by rounding only; how much depends on the dtype and the model. Run this on a
few real inputs before shipping a merged checkpoint (the README's precision table shows typical
values: ~1e-6 in fp32, ~1e-2 in bf16 on logits of magnitude ~1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorafx import state
from lorafx.errors import NotMergeableError, SpecError
from lorafx.merge import merge, merge_dequantized, merge_requantized, mergeable_sites, unmerge


def _logits(out: Any) -> torch.Tensor:
    """The main output tensor: a tensor, ``.logits`` / ``.last_hidden_state``, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise SpecError(f"verify_merge: cannot find an output tensor in a {type(out).__name__}")


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return _logits(model(**inputs)).detach().float()
    if isinstance(inputs, (tuple, list)):
        return _logits(model(*inputs)).detach().float()
    return _logits(model(inputs)).detach().float()


@torch.no_grad()
def verify_merge(model: nn.Module, inputs: Any, quantized: str | None = None) -> dict:
    """Compare the model's outputs with the active adapter merged and unmerged; restore the model.

    The model runs in eval mode on ``inputs`` (a tensor, a tuple of positional arguments, or a dict
    of keyword arguments) once unmerged and once merged (``merge(keep_original=True)``); then the
    original weights are put back bit for bit and every module's train/eval flag restored, whatever
    happens.

    Args:
        model: a model adapted by :func:`lorafx.apply` with an active, mergeable, unmerged adapter.
        inputs: what to call the model with.
        quantized: for a quantized base (:mod:`lorafx.quantized`), which merge to measure:
            ``"dequantize"`` (:func:`lorafx.merge_dequantized`) or ``"requantize"``
            (:func:`lorafx.merge_requantized`; the report adds ``"delta_lost"``, the largest fraction
            of ΔW a site's requantization lost). None: :func:`lorafx.merge`, which refuses quantized bases.

    Returns:
        ``{"adapter", "dtype", "sites", "max_abs_diff", "mean_abs_diff", "max_abs_output"}``: the
        differences are over every element of the output (logits), computed in fp32.

    Example:
        >>> report = lorafx.verify_merge(model, tokenizer("hello", return_tensors="pt").input_ids)
        >>> assert report["max_abs_diff"] < 1e-4
    """
    name, sites = mergeable_sites(model, "verify_merge")
    if quantized not in (None, "dequantize", "requantize"):
        raise SpecError(f"verify_merge: quantized must be None, 'dequantize' or 'requantize', got {quantized!r}")
    extra = {}
    with state.eval_mode(model):
        unmerged = _run(model, inputs)
        if quantized == "dequantize":
            merge_dequantized(model)
        elif quantized == "requantize":
            extra["delta_lost"] = max(merge_requantized(model).values())
        else:
            merge(model, keep_original=True)  # keep_original: unmerge restores W exactly, not W + ΔW - ΔW
        try:
            merged = _run(model, inputs)
        finally:
            unmerge(model)
    for what, out in (("unmerged", unmerged), ("merged", merged)):
        bad = int((~torch.isfinite(out)).sum())
        if bad:
            raise NotMergeableError(
                f"verify_merge: the {what} model's output holds {bad} non-finite values of {out.numel()} "
                f"(adapter {name!r}); a merge check on non-finite outputs proves nothing"
            )
    diff = (merged - unmerged).abs()
    weight = sites[0].weight_in(model)
    return {
        "adapter": name,
        "dtype": next((sa.quantized for sa in sites if sa.quantized), None) or str(weight.dtype).removeprefix("torch."),
        "sites": len(sites),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_abs_output": unmerged.abs().max().item(),
        **extra,
    }
