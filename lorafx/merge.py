"""Fold adapters into base weights and back.

``W ← round(W_fp32 + ΔW_fp32)``: the sum is taken in fp32 and rounded to the base dtype once. PEFT
adds ΔW in the base dtype, which drifts in bf16 (peft#1388); measured numbers are in the README's
precision table (``benchmarks/precision.py``). Unmerge subtracts the same fp32 ΔW, so it restores W
up to one rounding of the base dtype; ``keep_original=True`` keeps a copy and restores it bit for bit.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorafx import state
from lorafx.adapter import SiteAdapters
from lorafx.errors import NotMergeableError, SpecError
from lorafx.quantized import dense_linear, dequantized_weight, quantized_kind, requantized, swap_base
from lorafx.several import names_of
from lorafx.state import iter_sites


def _weight(model: nn.Module, sa: SiteAdapters) -> torch.Tensor:
    return sa.weight_in(model)


def _acc(w: torch.Tensor) -> torch.Tensor:
    """``w`` in its accumulation dtype: fp32, or fp64 for an fp64 base (fp32 would round W itself)."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _delta(sa: SiteAdapters, name: str | tuple[str, ...]) -> torch.Tensor:
    """ΔW of adapter ``name`` at ``sa``; for several active adapters (a tuple), the sum of the ΔW of
    those the site has, accumulated in fp32 (PEFT's semantics: their deltas add)."""
    deltas = [sa.adapters[n].delta_weight() for n in names_of(name) if n in sa.adapters]
    delta = functools.reduce(torch.add, deltas)
    if sa.weight_shape is not None:  # a convolution: ΔW [C_out, C_in·∏k] is its kernel, flattened
        return delta.reshape(sa.weight_shape)
    return delta.t() if sa.fan_in_fan_out else delta


def _has(sa: SiteAdapters, name: str | tuple[str, ...]) -> bool:
    return any(n in sa.adapters for n in names_of(name))


def mergeable_sites(model: nn.Module, caller: str = "") -> tuple[str, list[SiteAdapters]]:
    """The active adapter's name and sites, or a :class:`SpecError` if there is none or it is merged.

    The one precondition of :func:`merge` and :func:`lorafx.verify_merge` (``caller`` prefixes the
    message)."""
    prefix = f"{caller}: " if caller else ""
    name = state.get(model).active
    if name is None:
        raise SpecError(f"{prefix}no active adapter to merge; lorafx.set_adapter(model, name) first")
    sites = [sa for sa in iter_sites(model).values() if _has(sa, name)]
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
    name, sites = _checked_sites(model)
    quantized = [sa for sa in sites if sa.quantized]
    if quantized:
        kinds = sorted({sa.quantized for sa in quantized})
        raise NotMergeableError(
            f"adapter {name!r} cannot be merged into the quantized base ({', '.join(kinds)}) of sites "
            f"{[sa.site for sa in quantized][:4]}{' ...' if len(quantized) > 4 else ''}: the quantized weight "
            "cannot hold W + ΔW, and adding ΔW to the original high-precision W gives neither the trained model "
            "nor the base. Two correct paths: (1) lorafx.merge_dequantized(model) (merge_and_unload(model, "
            "dequantize=True)): the base becomes dense in its compute dtype with W = dequant(Wq) + ΔW; "
            "(2) lorafx.merge_requantized(model): quantize dequant(Wq) + ΔW again, returning per site the "
            "requantization error relative to ‖ΔW‖ (lorafx.verify_merge(model, inputs, quantized='requantize') "
            "measures the outputs against the unmerged model). The model is unchanged"
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


def _checked_sites(model: nn.Module, caller: str = "") -> tuple[str, list[SiteAdapters]]:
    name, sites = mergeable_sites(model, caller)
    here = [(sa, sa.adapters[n]) for sa in sites for n in names_of(name) if n in sa.adapters]
    bad = [sa for sa, a in here if not a.config.mergeable()]
    if bad:
        variants = sorted({a.config.name for _, a in here if not a.config.mergeable()})
        raise NotMergeableError(
            f"adapter {name!r} (variant {', '.join(map(repr, variants))}) cannot be merged at sites "
            f"{[sa.site for sa in bad]}: its gate depends on the input"
        )
    return name, sites


@torch.no_grad()
def merge_dequantized(model: nn.Module) -> None:
    """Merge the active adapter onto a quantized base the correct way: every adapted quantized base
    (:mod:`lorafx.quantized`) becomes a frozen ``nn.Linear`` in its compute dtype holding
    ``W = dequant(Wq) + ΔW`` (summed in fp32, rounded once) — never the original high-precision W,
    which the adapter was not trained against. Dense sites of the same adapter merge as in
    :func:`merge`. :func:`unmerge` puts the quantized modules back, bit for bit.

    ``merge_and_unload(model, dequantize=True)`` is this followed by the unload.
    """
    _merge_quantized(model, dense_linear, "merge_dequantized")


@torch.no_grad()
def merge_requantized(model: nn.Module) -> dict[str, float]:
    """Merge the active adapter and quantize again: every adapted bitsandbytes base becomes a new
    module of the same kind and settings quantized from ``dequant(Wq) + ΔW``. Returns, per site, the
    requantization error relative to the adapter, ``‖Q(W') − W'‖ / ‖ΔW‖`` with ``W' = dequant(Wq) + ΔW``
    (near 1 the rounding is as large as the adapter itself). ``lorafx.verify_merge(model, inputs,
    quantized="requantize")`` measures the outputs. :func:`unmerge` puts the original modules back."""
    lost: dict[str, float] = {}

    def make(base: nn.Module, delta: torch.Tensor) -> nn.Module:
        new = requantized(base, delta)
        target = dequantized_weight(base) + delta.float()
        lost[base_site[0]] = float((dequantized_weight(new) - target).norm() / delta.float().norm().clamp_min(1e-30))
        return new

    base_site = [""]
    _merge_quantized(model, make, "merge_requantized", base_site)
    return lost


def _merge_quantized(model: nn.Module, make, caller: str, current: list | None = None) -> None:
    name, sites = _checked_sites(model, caller)
    if not any(sa.quantized for sa in sites):
        raise SpecError(f"{caller}: adapter {name!r} has no quantized base; use lorafx.merge(model)")
    undo = []
    try:
        for sa in sites:
            if not sa.quantized:
                w = _weight(model, sa)
                new = _merged_weight(sa, name, w)
                undo.append(functools.partial(w.copy_, w.detach().clone()))
                w.copy_(new)
                continue
            base = sa.base if sa.base is not None else model.get_submodule(sa.site)
            if current is not None:
                current[0] = sa.site
            replacement = make(base, _delta(sa, name))
            check = dequantized_weight(replacement) if quantized_kind(replacement) else replacement.weight
            if not bool(torch.isfinite(check).all()):
                raise NotMergeableError(
                    f"{caller}: adapter {name!r} cannot be merged at site {sa.site!r}: dequant(Wq) + ΔW is not "
                    "finite (NaN/Inf in the adapter or beyond the compute dtype's range); the model is unchanged"
                )
            restore = swap_base(model, sa, replacement)
            undo.append(restore)
            sa.__dict__["_lorafx_quantized_base"] = restore
    except BaseException:
        for fn in reversed(undo):
            fn()
        for sa in sites:
            sa.__dict__.pop("_lorafx_quantized_base", None)
        raise
    for sa in sites:
        sa.merged = name
        sa.__dict__["_lorafx_original"] = None


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: subtract the fp32 ΔW (or restore the kept original exactly)."""
    sites = [sa for sa in iter_sites(model).values() if sa.merged is not None]
    if not sites:
        raise SpecError("nothing is merged")
    for sa in sites:  # merge_dequantized: put the quantized module back (nothing to compute, cannot fail)
        restore = sa.__dict__.pop("_lorafx_quantized_base", None)
        if restore is not None:
            restore()
            sa.merged = None
    sites = [sa for sa in sites if sa.merged is not None]
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
