"""DropLoRA (Zhang 2025, arXiv 2508.17337): LoRA with dropout on the rank dimension while training.

Training: ``y = x Wᵀ + b + s·((x_in Aᵀ) ⊙ m) Bᵀ`` with ``m ~ Bernoulli(1−p)/(1−p)`` drawn per token and
rank slot every forward (the canonical gate). Eval and merged: exactly LoRA, ``ΔW = s·BA`` — the
released code's dynamic-pruning option gives three different functions for training, unmerged eval
and merge (VARIANTS.md §5.1); that mismatch is a bug lorafx does not copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorafx.adapter import Lowered
from lorafx.config import register_variant
from lorafx.variants.checks import check_interval
from lorafx.variants.lora import LoRAAdapter, LoRAFields


@register_variant
@dataclass(frozen=True)
class DropLoRA(LoRAFields):
    """LoRA with rank-dimension dropout in training.

    Args:
        r: rank of the update.
        alpha: scale numerator; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        rank_dropout: probability p of zeroing one rank slot of one token (paper default 0.5;
            its runs also use 0.1-0.4). Survivors are scaled by ``1/(1-p)``, so the mean is LoRA.
        dropout: input dropout on the adapter path (PEFT's ``lora_dropout``).
        rslora: rank-stabilised scaling.
        init: ``"default"`` (kaiming A, zero B), ``"gaussian"`` or ``"random"`` (tests), as LoRA.

    Example:
        >>> spec = lorafx.Spec(lorafx.DropLoRA(r=32, alpha=64, rank_dropout=0.4), targets="all-linear")
    """

    name: ClassVar[str] = "droplora"
    rank_dropout: float = 0.5  # after LoRA's fields r, alpha, dropout, rslora, init

    def __post_init__(self):
        super().__post_init__()
        check_interval(self, "rank_dropout", 0, 1)

    def make_adapter(self, in_features: int, out_features: int, site: str) -> DropLoRAAdapter:
        return DropLoRAAdapter(self, in_features, out_features, site)


class DropLoRAAdapter(LoRAAdapter):
    """LoRA's parameters (``lora_A [r, d_in]``, ``lora_B [d_out, r]``, same init); the gate is a fresh
    rank-slot mask in training only, so eval and merge are LoRA's own."""

    eval_is_lora = True  # no gate out of training: the eager fast path's three ops are exact

    def lower(self, x: torch.Tensor) -> Lowered:
        p = self.config.rank_dropout
        gate = None
        if self.training and p > 0:
            # The mask is a graph value, so backward (and checkpoint recomputation of this node) reuses it.
            keep = torch.empty(*x.shape[:-1], self.config.r, device=x.device, dtype=self.lora_A.dtype)
            gate = keep.bernoulli_(1.0 - p) / (1.0 - p)
        x_in, drop = self.dropped(x)
        return Lowered(x_in, self.lora_A, self.lora_B, self.scale_arg(), gate, drop=drop)
