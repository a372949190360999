"""The canonical low-rank form and the per-site adapter container.

Every variant lowers one call site to::

    y = x Wᵀ + b + s · ((x_in Aᵉᵀ) ⊙ g) Bᵉᵀ        Aᵉ [R, d_in]  Bᵉ [d_out, R]  g [..., R] or None

where ``x_in`` is the adapter-path input (``x`` after LoRA's input dropout). :class:`Lowered` carries
those operands; :func:`lorafx.kernels.reference.lora_linear` evaluates them. Merging, kernels, ONNX
export and PEFT conversion are written once against this form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from lorafx.config import AdapterConfig
from lorafx.errors import NotMergeableError


class Lowered(NamedTuple):
    """One site's adapter in canonical form (see the module docstring)."""

    x: torch.Tensor  # adapter-path input, [..., d_in] (dropout applied in training)
    A: torch.Tensor  # [R, d_in]
    B: torch.Tensor  # [d_out, R]
    scale: float
    gate: torch.Tensor | None = None  # [..., R]; None = no gate
    base: Callable | None = None  # replaces F.linear(x, W, b) for the frozen term (CE-LoRA's backward)


class Adapter(nn.Module):
    """One adapter at one site. A variant subclasses it and implements :meth:`lower`.

    Mergeable variants also get :meth:`delta_weight` for free from the lowering at eval, gate-free.
    """

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, site: str):
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.site = site

    def lower(self, x: torch.Tensor) -> Lowered:
        raise NotImplementedError

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(Aᵉ, Bᵉ, s) with no input: what merging folds. Variants with a gate raise."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·BᵉAᵉ in fp32 (fp64 for fp64 adapters), ``[d_out, d_in]``; :class:`NotMergeableError` if the variant has a gate."""
        if not self.config.mergeable():
            raise NotMergeableError(
                f"site {self.site!r}: variant {self.config.name!r} is not mergeable (its gate depends on the input)"
            )
        A, B, s = self.effective_weights()
        acc = torch.promote_types(A.dtype, torch.float32)  # fp64 adapters stay fp64 (fp32 would lose bits)
        return (B.to(acc) @ A.to(acc)) * s

    def on_step(self) -> None:
        """Called once per optimizer step by :func:`lorafx.step`; stateful variants (CE-LoRA) override."""

    def extra_repr(self) -> str:
        return f"site={self.site!r}, variant={self.config.name!r}, in={self.in_features}, out={self.out_features}"


class SiteAdapters(nn.Module):
    """All named adapters of one linear call site, and which one is active.

    Lives in the rewritten region as ``region.lorafx[key]``; the graph calls it with the site's input
    and passes what it returns (a :class:`Lowered` or ``None``) to ``lora_linear``.
    """

    def __init__(self, site: str, in_features: int, out_features: int, fan_in_fan_out: bool = False):
        super().__init__()
        self.site = site
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = fan_in_fan_out  # weight stored [d_in, d_out] (transformers Conv1D)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None  # name of the adapter folded into the base weight

    def forward(self, x: torch.Tensor) -> Lowered | None:
        if self.active is None or self.merged is not None:
            return None
        return self.adapters[self.active].lower(x)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, active={self.active!r}, merged={self.merged!r}"
