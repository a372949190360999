"""MoR, Mixture of Ranks (Tang et al. 2024, arXiv 2410.13408): N cheap experts over one shared LoRA pair.

Per site: shared ``A [r, d_in]``, ``B [d_out, r]``; expert i is two scaling vectors ``Ω_A[i] ∈ R^r``,
``Ω_B[i] ∈ R^{d_out}``; a softmax router ``G(x) = softmax(W_g x) ∈ R^N`` per token::

    y = x Wᵀ + b + (α/r)·Σ_i G_i(x)·diag(Ω_B[i])·B·diag(Ω_A[i])·A x

Canonical form (R = N·r): ``Aᵉ`` = row-stack of ``diag(Ω_A[i])A``, ``Bᵉ`` = column-concat of
``diag(Ω_B[i])B``, gate = G repeated r times per expert. Not mergeable (the gate depends on x).

Cost: the canonical shrink ``x Aᵉᵀ`` is N·r·d_in per token; MoR's factored form computes
``h = x Aᵀ`` once (r·d_in) and rescales it per expert (N·r), passed to the op as ``Lowered.h``.
No official code exists; init and the router input are this library's reading (VARIANTS.md §1):
Ω = 1, router ``N(0, router_std)`` on the adapter-path input, no bias, no balance loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.config import register_variant
from lorafx.errors import NotMergeableError
from lorafx.variants.checks import check_at_least, check_init, check_int
from lorafx.variants.lora import LowRankConfig, init_lora_pair


@register_variant
@dataclass(frozen=True)
class MoR(LowRankConfig):
    """Mixture of Ranks.

    Args:
        r: rank of the shared pair (per-token ΔW has rank ≤ r although the canonical R = experts·r).
        alpha: scale numerator, ``s = alpha / r``.
        experts: number of experts N (paper best 8; > 12 plateaus).
        dropout: input dropout on the adapter path (the router reads the dropped input too).
        router_std: std of the router's normal init. Never 0 together with Ω = 1: every expert would
            then get the same gradient forever.
        shared_expert: add r always-on slots (gate 1) over the same A, B: an ungated ``s·BAx`` term.
        init: ``"default"`` (kaiming A, zero B: base model at step 0) or ``"random"`` (both non-zero,
            and Ω drawn around 1 so experts differ; for tests).

    Example:
        >>> spec = lorafx.Spec(lorafx.MoR(r=32, alpha=64, experts=8), targets=["gate_proj", "up_proj", "down_proj"])
    """

    name: ClassVar[str] = "mor"  # fields r, alpha, dropout from LowRankConfig, then:
    experts: int = 4
    router_std: float = 0.02
    shared_expert: bool = False
    init: Literal["default", "random"] = "default"

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "experts")
        check_at_least(self, "router_std", 0)
        check_init(self, ("default", "random"))

    def mergeable(self) -> bool:
        return False

    def make_adapter(self, in_features: int, out_features: int, site: str) -> MoRAdapter:
        return MoRAdapter(self, in_features, out_features, site)


class MoRAdapter(Adapter):
    """``lora_A [r, d_in]``, ``lora_B [d_out, r]``, ``omega_A [N, r]``, ``omega_B [N, d_out]``, ``router [N, d_in]``."""

    def __init__(self, config: MoR, in_features: int, out_features: int, site: str):
        super().__init__(config, in_features, out_features, site)
        r, n = config.r, config.experts
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.omega_A = nn.Parameter(torch.ones(n, r))
        self.omega_B = nn.Parameter(torch.ones(n, out_features))
        self.router = nn.Parameter(torch.empty(n, in_features))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        init_lora_pair(self.lora_A, self.lora_B, config.init)
        with torch.no_grad():
            nn.init.normal_(self.router, std=config.router_std)
            if config.init == "random":
                self.omega_A.uniform_(0.5, 1.5)
                self.omega_B.uniform_(0.5, 1.5)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Aᵉ [R, d_in], Bᵉ [d_out, R]) with expert i at slots i·r .. i·r+r-1, then the shared slots."""
        n, r = self.config.experts, self.config.r
        A = (self.omega_A[:, :, None] * self.lora_A[None]).reshape(n * r, self.in_features)
        B = (self.omega_B[:, :, None] * self.lora_B[None]).permute(1, 0, 2).reshape(self.out_features, n * r)
        if self.config.shared_expert:
            A, B = torch.cat([A, self.lora_A]), torch.cat([B, self.lora_B], dim=1)
        return A, B

    def lower(self, x: torch.Tensor) -> Lowered:
        r = self.config.r
        x_in = self.dropout(x).to(self.lora_A.dtype)
        g = torch.softmax(x_in @ self.router.t(), dim=-1)  # [..., N]
        gate = g.repeat_interleave(r, dim=-1)  # [..., N·r]
        h = x_in @ self.lora_A.t()  # the one shared shrink, [..., r]
        h_all = (h[..., None, :] * self.omega_A).flatten(-2)  # = x_in Aᵉᵀ, [..., N·r]
        if self.config.shared_expert:
            gate = torch.cat([gate, torch.ones_like(h)], dim=-1)
            h_all = torch.cat([h_all, h], dim=-1)
        A, B = self._stacked()
        return Lowered(x_in, A, B, self.scale, gate, h=h_all)

    def effective_weights(self):
        raise NotMergeableError(
            f"site {self.site!r}: variant 'mor' has no constant (Aᵉ, Bᵉ): its gate depends on the input"
        )
