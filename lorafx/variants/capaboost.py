"""CapaBoost (Song et al., ICLR 2024, arXiv 2407.01320): d masked copies of one shared LoRA pair.

``ΔW = s·Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i)``, ``s = α/r`` (no 1/d), with d fixed random binary masks per
matrix, each with exactly ``int(numel·density)`` ones. Lowered as one rank-``d·r`` LoRA:
``Aᵉ`` = row-stack of ``A ⊙ M^A_i``, ``Bᵉ`` = column-concat of ``B ⊙ M^B_i``. The rank of ΔW reaches
``d·r`` at LoRA's trainable count (A, B are dense and shared by the copies).

Differences from the released code (VARIANTS.md §4.2), on purpose: one Parameter per matrix and
autograd through the masks instead of per-copy parameters synced by trainer hooks (same gradient,
``Σ_i M_i ⊙ ∂L/∂A_i``); B = 0 in every copy at step 0, so the model starts as the base model; masks
are saved buffers drawn from ``(seed, site)`` instead of an unsaved process-global RandomState; A is
initialised as in PEFT (the released code's kaiming on ``[d_in, r]`` gives ``U(±1/√r)``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.config import register_variant
from lorafx.variants.checks import check_init, check_int, check_interval
from lorafx.variants.lora import LowRankConfig, init_lora_pair


@register_variant
@dataclass(frozen=True)
class CapaBoost(LowRankConfig):
    """CapaBoost-LoRA: ``copies`` masked copies of one shared (A, B).

    Args:
        r: rank of the shared pair; ΔW has rank up to ``copies * r``.
        alpha: scale numerator; ``s = alpha / r`` (the paper adds no 1/copies).
        copies: number of masked copies d (paper ``num_layer``, default 2).
        density: fraction of ones in every mask (default 0.5); each mask has exactly
            ``int(numel * density)`` ones.
        seed: mask seed; a site's masks come from ``(seed, crc32(site FQN))``, so they are
            reproducible and differ across sites and copies.
        dropout: input dropout on the adapter path.
        init: ``"default"`` (kaiming A, zero B), ``"gaussian"`` or ``"random"`` (tests).

    Example:
        >>> spec = lorafx.Spec(lorafx.CapaBoost(r=8, copies=2, density=0.5), targets=["query", "value"])
    """

    name: ClassVar[str] = "capaboost"  # fields r, alpha, dropout from LowRankConfig, then:
    # no input-dependent part: Aᵉ/Bᵉ fit a conv kernel and an embedding table as they fit a linear
    site_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding", "mha", "mha_out")
    copies: int = 2
    density: float = 0.5
    seed: int = 0
    init: Literal["default", "gaussian", "random"] = "default"

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "copies")
        check_interval(self, "density", 0, 1, closed="(]")
        check_int(self, "seed", minimum=0)
        check_init(self)

    def make_adapter(self, in_features: int, out_features: int, site: str) -> CapaBoostAdapter:
        return CapaBoostAdapter(self, in_features, out_features, site)


def exact_density_masks(copies: int, shape: tuple[int, ...], density: float, gen: torch.Generator) -> torch.Tensor:
    """``[copies, *shape]`` bool masks, each with exactly ``int(numel * density)`` ones, uniformly placed."""
    numel = 1
    for n in shape:
        numel *= n
    ones = int(numel * density)
    masks = torch.zeros(copies, numel, dtype=torch.bool)
    for i in range(copies):
        masks[i, torch.randperm(numel, generator=gen)[:ones]] = True
    return masks.view(copies, *shape)


class CapaBoostAdapter(Adapter):
    """Dense ``lora_A [r, d_in]``, ``lora_B [d_out, r]``; masks ``mask_A [d, r, d_in]``, ``mask_B [d, d_out, r]``."""

    def __init__(self, config: CapaBoost, in_features: int, out_features: int, site: str):
        super().__init__(config, in_features, out_features, site)
        r, d = config.r, config.copies
        if int(r * min(in_features, out_features) * config.density) < 1:
            raise ValueError(f"capaboost: density {config.density} leaves masks of site {site!r} empty")
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        init_lora_pair(self.lora_A, self.lora_B, config.init)
        gen = torch.Generator().manual_seed(config.seed * 2**32 + zlib.crc32(site.encode()))
        self.register_buffer("mask_A", exact_density_masks(d, (r, in_features), config.density, gen))
        self.register_buffer("mask_B", exact_density_masks(d, (out_features, r), config.density, gen))

    def lower(self, x: torch.Tensor) -> Lowered:
        A, B, s = self.effective_weights()
        return Lowered(self.dropout(x), A, B, s)

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        d, r = self.config.copies, self.config.r
        A = (self.lora_A * self.mask_A).reshape(d * r, self.in_features)  # copy i = rows i·r .. i·r+r-1
        B = (self.lora_B * self.mask_B).permute(1, 0, 2).reshape(self.out_features, d * r)
        return A, B, self.scale
