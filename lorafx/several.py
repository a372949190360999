"""Several active adapters at once: ``lorafx.set_adapter(model, ["a", "b"])`` (PEFT's semantics).

Their deltas add: ``y = x Wᵀ + b + Σᵢ sᵢ·((x Aᵢᵀ) ⊙ gᵢ) Bᵢᵀ``. That sum is itself one canonical form,
so the sites need nothing new: :class:`SumOfAdapters` stands in a site's slot and lowers to the
adapters concatenated along the rank axis, ``A = [A₁; A₂]``, ``B = [s₁B₁, s₂B₂]`` (scales folded into
B, ``s = 1``), gates concatenated (ones for an adapter without one) and a precomputed shrink kept
where an adapter has one (MoR). Merging several active adapters folds ``Σᵢ ΔWᵢ`` (``lorafx.merge``).

Not combinable, refused with the site and variant named: adapters whose adapter-path inputs differ
(different input dropout while training) and CE-LoRA's approximated training backward (each one
replaces the frozen matmul's backward; two cannot both do so).
"""

from __future__ import annotations

import torch

from lorafx.canonical import Lowered, shrink
from lorafx.errors import SpecError


def names_of(active: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """An active (or merged) record as a tuple of adapter names: ``None`` -> ``()``, ``"a"`` -> ``("a",)``."""
    if active is None:
        return ()
    return active if isinstance(active, tuple) else (active,)


class SumOfAdapters:
    """The slot of a site where several adapters are active: ``lower`` returns their sum in canonical
    form (see the module docstring). ``adapters``: name -> adapter module, in activation order."""

    def __init__(self, site: str, adapters: dict):
        self.site = site
        self.adapters = list(adapters.values())
        self.names = list(adapters)

    def lower(self, x: torch.Tensor) -> Lowered:
        lows = [a.lower(x) for a in self.adapters]
        for name, low in zip(self.names, lows, strict=True):
            if low.base is not None:
                raise SpecError(
                    f"site {self.site!r}: adapter {name!r} replaces the frozen matmul's backward (CE-LoRA while "
                    "training), which cannot be combined with another active adapter; train it alone"
                )
            if low.x is not lows[0].x:
                raise SpecError(
                    f"site {self.site!r}: adapters {self.names} read different adapter-path inputs (input dropout "
                    "while training); several active adapters need dropout=0 or model.eval()"
                )
        dtype = lows[0].A.dtype
        for low in lows:
            dtype = torch.promote_types(dtype, low.A.dtype)
        A = torch.cat([low.A.to(dtype) for low in lows])
        B = torch.cat([low.B.to(dtype) * low.scale for low in lows], dim=1)
        gate = h = None
        if any(low.gate is not None for low in lows):
            gate = torch.cat([_gate_or_ones(low, x) for low in lows], dim=-1)
        if any(low.h is not None for low in lows):
            h = torch.cat([low.h if low.h is not None else shrink(low.x, low.A) for low in lows], dim=-1)
        one = torch.ones((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=A.device)
        return Lowered(lows[0].x, A, B, one, gate, None, h)


def _gate_or_ones(low: Lowered, x: torch.Tensor) -> torch.Tensor:
    if low.gate is not None:
        return low.gate
    return torch.ones((*x.shape[:-1], low.A.shape[0]), dtype=low.A.dtype, device=x.device)
