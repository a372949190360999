"""Weighted combinations of adapters into a new named adapter: PEFT's ``add_weighted_adapter``.

Every source adapter is read in the canonical form, ``ΔWᵢ = sᵢ·BᵢAᵢ`` (:meth:`Adapter.effective_weights`),
so one implementation serves every mergeable variant. The new adapter is a plain LoRA adapter with
scale 1 (PEFT sets ``lora_alpha = r``) at every site that holds at least one source; with ``wᵢ`` the
weights, per site:

* ``cat``: ``A = [w₁s₁A₁; w₂s₂A₂; ...]``, ``B = [B₁ B₂ ...]``, rank Σrᵢ: exactly ``ΔW = Σ wᵢΔWᵢ``.
* ``svd``: the best rank-k approximation of ``Σ wᵢΔWᵢ`` (``B = U_k·S_k``, ``A = V_kᵀ``); k is
  ``svd_rank`` or the largest source rank; ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd`` first combine the ΔWᵢ with that method instead of the plain sum.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: combine the factors
  separately, ``A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`` and ``B = Σ √|wᵢsᵢ|·Bᵢ`` (or the method's pruned
  version of those sums). ``BA`` then holds cross terms ``BᵢAⱼ``: PEFT calls it "a very rough
  approximation". The factors must be a variant's own trained pair (LoRA, DropLoRA, CE-LoRA) of
  one rank at a site; Uni-LoRA (factors gathered from one shared vector) and CapaBoost (masked
  copies of shared factors) are refused by name: ``cat`` and ``svd`` are exact for them.

Variants with an input-dependent gate (MoR) have no ΔW and are refused by name. ``dare_*`` draw
their random masks from torch's global generator in PEFT's order (per site: the A factors, then the
B factors; per source in the given order), so a seeded call reproduces PEFT's result.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import torch
from torch import nn

from lorafx import state
from lorafx.errors import NotMergeableError, SpecError

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_DELTA = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *ON_DELTA, *FACTORWISE)
_NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")
# variants whose effective (A, B) are their own trained factors, so a factor-wise mix means what PEFT means
_OWN_FACTORS = ("lora", "droplora", "celora")


# -- the merge methods on stacked task tensors [n, ...] (TIES: Yadav et al. 2023; DARE: Yu et al. 2023)


def _prune(t: torch.Tensor, density: float, method: str) -> torch.Tensor:
    if density >= 1:
        return t
    if method == "magnitude":  # keep the int(density·numel) largest |values|
        keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
        return t * keep.view_as(t)
    # random: keep each value with probability density, rescaled by 1/density (unbiased)
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _combine(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, sign: str):
    """``method`` (a FACTORWISE name, or "svd" for the plain weighted sum) over ``tensors``."""
    if method in ("linear", "svd"):
        pruned = tensors
    else:
        pruned = [_prune(t, density, "random" if method.startswith("dare") else "magnitude") for t in tensors]
    stacked = torch.stack(pruned)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if not method.endswith("ties"):
        return weighted.sum(0)
    # TIES: elect a sign per entry (by total mass or by count), keep the entries that agree, average them
    votes = stacked.sum(0) if sign == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


# -- per site --------------------------------------------------------------------------------------


def _sources(sa, names: Sequence[str], weights: Sequence[float], combination: str) -> list:
    """(weight, A, B, s) of each source present at the site, in fp32 or wider, checked."""
    out = []
    for name, w in zip(names, weights, strict=True):
        if name not in sa.adapters:
            continue
        adapter = sa.adapters[name]
        variant = adapter.config.name
        if not adapter.config.mergeable():
            raise NotMergeableError(
                f"site {sa.site!r}: adapter {name!r} ({variant}) has an input-dependent gate, so no ΔW to combine"
            )
        if combination in FACTORWISE and variant not in _OWN_FACTORS:
            raise SpecError(
                f"site {sa.site!r}: combination {combination!r} mixes A and B factors separately, which "
                f"adapter {name!r} ({variant}) does not own (its factors are built from shared parameters); "
                "use 'cat' or 'svd', which combine ΔW exactly"
            )
        with torch.no_grad(), state.eval_mode(adapter):
            A, B, s = adapter.effective_weights()
        acc = torch.promote_types(A.dtype, torch.float32)
        out.append((float(w), A.detach().to(acc), B.detach().to(acc), float(s)))
    return out


def _site_pair(site: str, src: list, combination: str, rank: int, density, sign: str, clamp):
    """The new adapter's (A [k, d_in], B [d_out, k]) at one site, scale 1."""
    if combination == "cat":
        return torch.cat([w * s * A for w, A, _, s in src]), torch.cat([B for *_, B, _ in src], dim=1)
    if combination in FACTORWISE:
        ranks = sorted({A.shape[0] for _, A, _, _ in src})
        if len(ranks) > 1:
            raise SpecError(
                f"site {site!r}: combination {combination!r} needs one rank for all adapters, got ranks {ranks}; "
                "use 'cat' or 'svd'"
            )
        roots = [math.sqrt(abs(w * s)) for w, _, _, s in src]
        signs = [1.0 if w * s >= 0 else -1.0 for w, _, _, s in src]  # on A only, or it would cancel
        wa = torch.tensor([r * g for r, g in zip(roots, signs, strict=True)], dtype=src[0][1].dtype)
        wb = torch.tensor(roots, dtype=src[0][1].dtype)
        A = _combine(combination, [A for _, A, _, _ in src], wa, density, sign)
        B = _combine(combination, [B for *_, B, _ in src], wb, density, sign)
        return A, B
    deltas = [s * (B @ A) for _, A, B, s in src]
    weights = torch.tensor([w for w, *_ in src], dtype=deltas[0].dtype)
    delta = _combine(combination.removesuffix("_svd"), deltas, weights, density, sign)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    B, A = U[:, :k] * S[:k], Vh[:k]
    if clamp is not None:  # PEFT's svd_clamp: clip both factors at the clamp-quantile of their entries
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


def _check(model, names, weights, name, combination, svd_rank, density, sign, clamp) -> str:
    data = state.get(model)
    if isinstance(names, str) or not names:
        raise SpecError(f"adapters must be a non-empty list of adapter names, got {names!r}")
    for n in names:
        state.require(model, n)
    if len(set(names)) != len(names):
        raise SpecError(f"adapters {list(names)} name one adapter twice")
    if len(weights) != len(names) or not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise SpecError(f"weights {list(weights)} must be {len(names)} finite numbers, one per adapter")
    state.check_name(name)
    if name in data.specs:
        raise SpecError(f"adapter {name!r} already exists on this model; delete_adapter() it or choose another name")
    if combination not in COMBINATIONS:
        raise SpecError(f"unknown combination {combination!r}; choose one of {', '.join(COMBINATIONS)}")
    if len(names) == 1 and combination in FACTORWISE:
        combination = "linear"  # as PEFT: nothing to prune against or elect a sign from
    if any(k in combination for k in _NEEDS_DENSITY) and not (isinstance(density, numbers.Real) and 0 < density <= 1):
        raise SpecError(f"combination {combination!r} needs density in (0, 1], got {density!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise SpecError(f"svd_rank must be a positive int, got {svd_rank!r}")
    if sign not in ("total", "frequency"):
        raise SpecError(f"majority_sign_method must be 'total' or 'frequency', got {sign!r}")
    if clamp is not None and not 0 < clamp <= 1:
        raise SpecError(f"svd_clamp must be a quantile in (0, 1], got {clamp!r}")
    return combination


@state.locked
def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
) -> nn.Module:
    """Add adapter ``name``, a weighted combination of ``adapters``, as PEFT's ``add_weighted_adapter``.

    The result is a plain LoRA adapter (scale 1) at every site holding any of ``adapters``, added
    without activating it (``lorafx.set_adapter(model, name)``); it saves, loads, merges and exports
    like any other. The module docstring gives each ``combination``'s formula. On any error the
    model is unchanged.

    Args:
        model: a model with the ``adapters`` already on it.
        adapters: names of the source adapters.
        weights: one number per adapter (negative subtracts).
        name: the new adapter's name.
        combination: ``cat``, ``svd`` (PEFT's default), ``linear``, ``ties``, ``dare_linear``,
            ``dare_ties``, ``magnitude_prune``, or ``ties_svd``/``dare_linear_svd``/``dare_ties_svd``/
            ``magnitude_prune_svd``.
        svd_rank: rank of the ``*svd`` result (default: the largest source rank).
        density: fraction of entries kept by ``ties``/``dare``/``magnitude_prune`` (0 < density <= 1).
        majority_sign_method: TIES's sign election, ``"total"`` or ``"frequency"``.
        svd_clamp: quantile at which ``*svd`` clips the new factors (PEFT's ``svd_clamp``).

    Returns:
        The model (apply's return value: use it, as after :func:`lorafx.apply`).

    Example:
        >>> model = lorafx.add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], name="ab", combination="cat")
    """
    from lorafx.apply import apply
    from lorafx.spec import Spec
    from lorafx.variants.lora import LoRA

    combination = _check(
        model, adapters, weights, name, combination, svd_rank, density, majority_sign_method, svd_clamp
    )
    sites = {fqn: sa for fqn, sa in state.iter_sites(model).items() if any(n in sa.adapters for n in adapters)}
    experts = [fqn for fqn, sa in sites.items() if sa.kind == "expert"]
    if experts:  # one pair per expert ([E, r, d_in]): the combinations here are written for one ΔW per site
        raise SpecError(
            f"add_weighted_adapter: MoE expert sites {experts[:3]} are not supported; the model is unchanged"
        )
    found = {fqn: _sources(sa, adapters, weights, combination) for fqn, sa in sites.items()}
    # PEFT's default svd rank is the largest rank over the sources' configs, not per site
    rank = svd_rank or max(A.shape[0] for src in found.values() for _, A, _, _ in src)
    pairs = {
        fqn: _site_pair(fqn, src, combination, rank, density, majority_sign_method, svd_clamp)
        for fqn, src in found.items()
    }
    ranks = {fqn: A.shape[0] for fqn, (A, _) in pairs.items()}
    if min(ranks.values()) < 1:
        raise SpecError(f"the combination has rank 0 at {[f for f, r in ranks.items() if r < 1][:4]}")
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    spec = Spec(
        LoRA(r=common, alpha=float(common)),
        targets="|".join(re.escape(f) for f in sorted(pairs)),  # exactly these sites (full-match regex)
        overrides={re.escape(f): {"r": r, "alpha": float(r)} for f, r in ranks.items() if r != common},
    )
    model = apply(model, spec, name=name, activate=False)
    placed = state.iter_sites(model)
    with torch.no_grad():
        for fqn, (A, B) in pairs.items():
            new = placed[fqn].adapters[name]
            new.lora_A.copy_(A.to(new.lora_A.dtype))
            new.lora_B.copy_(B.to(new.lora_B.dtype))
    return model
