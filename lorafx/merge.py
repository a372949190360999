"""Fold adapters into base weights and back.

``W ← round(W_fp32 + ΔW_fp32)``: the sum is taken in fp32 and rounded to the base dtype once. PEFT
adds ΔW in the base dtype, which drifts in bf16 (peft#1388); measured numbers are in the README's
precision table (``benchmarks/precision.py``). Unmerge subtracts the same fp32 ΔW, so it restores W
up to one rounding of the base dtype; ``keep_original=True`` keeps a copy and restores it bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafx import state
from lorafx.adapter import SiteAdapters
from lorafx.errors import NotMergeableError, SpecError
from lorafx.state import iter_sites


def _weight(model: nn.Module, sa: SiteAdapters) -> torch.Tensor:
    return model.get_submodule(sa.site).weight


def _acc(w: torch.Tensor) -> torch.Tensor:
    """``w`` in its accumulation dtype: fp32, or fp64 for an fp64 base (fp32 would round W itself)."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _delta(sa: SiteAdapters, name: str) -> torch.Tensor:
    delta = sa.adapters[name].delta_weight()
    return delta.t() if sa.fan_in_fan_out else delta


def mergeable_sites(model: nn.Module, caller: str = "") -> tuple[str, list[SiteAdapters]]:
    """The active adapter's name and sites, or a :class:`SpecError` if there is none or it is merged.

    The one precondition of :func:`merge` and :func:`lorafx.verify_merge` (``caller`` prefixes the
    message)."""
    prefix = f"{caller}: " if caller else ""
    name = state.get(model).active
    if name is None:
        raise SpecError(f"{prefix}no active adapter to merge; lorafx.set_adapter(model, name) first")
    sites = [sa for sa in iter_sites(model).values() if name in sa.adapters]
    if any(sa.merged is not None for sa in sites):
        raise SpecError(f"{prefix}adapter {name!r} is already merged; lorafx.unmerge(model) first")
    return name, sites


def _merged_weight(sa: SiteAdapters, name: str, w: torch.Tensor) -> torch.Tensor:
    """``round(W + ΔW)`` for site ``sa``, refused if it would put NaN or Inf where W is finite: a NaN
    in the adapter, or a sum beyond the base dtype's range (fp16 tops out at 65504), would be folded
    into the base weights for good (unmerge cannot subtract it)."""
    delta = _delta(sa, name).to(w.device)
    total = _acc(w) + delta
    new = total.to(w.dtype)
    broken = ~torch.isfinite(new) & torch.isfinite(w)
    if bool(broken.any()):
        n, why = int(broken.sum()), "NaN/Inf in the adapter"
        if bool(torch.isfinite(delta).all()):
            why = f"W + ΔW beyond the range of {str(w.dtype).removeprefix('torch.')} (max |W + ΔW| {float(total.abs().max()):.4g})"
        raise NotMergeableError(
            f"adapter {name!r} cannot be merged at site {sa.site!r}: the merged weight would hold {n} "
            f"non-finite values of {w.numel()} ({why}); the model is unchanged"
        )
    return new


@torch.no_grad()
def merge(model: nn.Module, keep_original: bool = False) -> None:
    """Fold the active adapter into the base weights of every site that has it.

    Raises :class:`NotMergeableError` (before changing anything) if any site's adapter is not
    mergeable, e.g. MoR. After merging, the adapted sites run the base matmul only.
    """
    name, sites = mergeable_sites(model)
    bad = [sa for sa in sites if not sa.adapters[name].config.mergeable()]
    if bad:
        variants = sorted({sa.adapters[name].config.name for sa in bad})
        raise NotMergeableError(
            f"adapter {name!r} (variant {', '.join(map(repr, variants))}) cannot be merged at sites "
            f"{[sa.site for sa in bad]}: its gate depends on the input"
        )
    originals = []
    try:
        for sa in sites:
            w = _weight(model, sa)
            new = _merged_weight(sa, name, w)
            originals.append((sa, w.detach().clone()))
            w.copy_(new)
    except BaseException:
        for sa, orig in originals:
            _weight(model, sa).copy_(orig)
        raise
    for sa, orig in originals:
        sa.merged = name
        sa.__dict__["_lorafx_original"] = orig if keep_original else None


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: subtract the fp32 ΔW (or restore the kept original exactly)."""
    sites = [sa for sa in iter_sites(model).values() if sa.merged is not None]
    if not sites:
        raise SpecError("nothing is merged")
    # All new weights are computed before any is written, and the writes are undone if one fails, so
    # a failure leaves every site merged as before (the same pattern as merge()).
    restored = []
    for sa in sites:
        w = _weight(model, sa)
        orig = sa.__dict__.get("_lorafx_original")
        restored.append(orig if orig is not None else (_acc(w) - _delta(sa, sa.merged).to(w.device)).to(w.dtype))
    merged_weights = []
    try:
        for sa, new in zip(sites, restored, strict=True):
            w = _weight(model, sa)
            merged_weights.append((w, w.detach().clone()))
            w.copy_(new)
    except BaseException:
        for w, old in merged_weights:
            w.copy_(old)
        raise
    for sa in sites:
        sa.__dict__.pop("_lorafx_original", None)
        sa.merged = None


def is_merged(model: nn.Module) -> bool:
    """True when an adapter is folded into the base weights."""
    return any(sa.merged is not None for sa in iter_sites(model).values())
