"""Uni-LoRA (Li et al., NeurIPS 2025, arXiv 2506.00799): one trainable vector for the whole model.

Every site's ``A [r, d_in]`` and ``B [d_out, r]`` are gathered from one shared ``θ ∈ R^d``:
``A = θ[idxA]·sA``, ``B = θ[idxB]·sB``, ``y = x Wᵀ + b + B A x`` (no α/r). Stacking all sites'
flattened A then B (site order, row-major) gives ``θ_D = P θ`` with ``P ∈ R^{D×d}`` one non-zero per
row and column j's non-zeros ``1/√n_j``: ``PᵀP = I``, an isometry.

The assignment follows the official PEFT integration (``zh37908/Uni-LoRA``, ``generate_index``):
balanced groups (``repeat(arange(d), D//d)`` plus ``D % d`` distinct extra columns), shuffled with
``numpy.random.default_rng(seed)``, sliced consecutively per site, A then B. Indices and scales are
saved buffers; the vector lives at ``model.lorafx_shared["<name>__unilora"]``. The default init
``θ ~ U(±0.02)`` is *not* zero: the adapted model differs from the base model at step 0, as in the
paper's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.config import AdapterConfig, register_variant
from lorafx.errors import SpecError
from lorafx.variants.checks import check_at_least, check_int, check_interval


@register_variant
@dataclass(frozen=True)
class UniLoRA(AdapterConfig):
    """Uni-LoRA: all sites share one trainable vector of ``vector_length`` entries.

    Args:
        r: rank of each site's gathered (A, B).
        vector_length: d, the number of trainable parameters of the whole adapter (paper: 23,040
            for RoBERTa GLUE; must not exceed D = Σ r·(d_in + d_out) over the adapted sites).
        seed: projection seed (numpy ``default_rng``); same seed + same sites = same indices.
        init_bound: ``θ ~ U(-init_bound, init_bound)``, drawn from ``torch.Generator(seed)``.
        dropout: input dropout on the adapter path.

    Example:
        >>> spec = lorafx.Spec(lorafx.UniLoRA(r=4, vector_length=23040), targets=["query", "value"])
    """

    name: ClassVar[str] = "unilora"
    # no input-dependent part: Aᵉ/Bᵉ fit a conv kernel and an embedding table as they fit a linear
    site_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding", "mha", "mha_out")
    r: int = 4
    vector_length: int = 23040
    seed: int = 0
    init_bound: float = 0.02
    dropout: float = 0.0

    def __post_init__(self):
        check_int(self, "r")
        check_int(self, "vector_length")
        check_int(self, "seed", minimum=0)
        check_at_least(self, "init_bound", 0)
        check_interval(self, "dropout", 0, 1)

    def make_adapter(self, in_features: int, out_features: int, site: str) -> UniLoRAAdapter:
        return UniLoRAAdapter(self, in_features, out_features, site)

    @classmethod
    def finalize(cls, adapters: dict, adapter_name: str) -> UniLoRAVector:
        """Create the shared vector and assign every site's indices and scales (site order, A then B)."""
        configs = {(a.config.vector_length, a.config.seed, a.config.init_bound) for a in adapters.values()}
        if len(configs) > 1:
            raise SpecError(
                f"adapter {adapter_name!r}: all Uni-LoRA sites share one vector, so vector_length, seed and "
                f"init_bound must agree across overrides; got {sorted(configs)}"
            )
        d, seed, bound = configs.pop()
        sizes = [n for a in adapters.values() for n in (a.idx_A.numel(), a.idx_B.numel())]
        total = sum(sizes)
        if d > total:
            raise SpecError(
                f"adapter {adapter_name!r}: Uni-LoRA vector_length {d} exceeds D = {total}, the number of "
                f"A and B entries over its {len(adapters)} sites ({', '.join(list(adapters)[:4])}...); "
                f"every vector entry must be used: lower vector_length or adapt more sites"
            )
        assignment = balanced_assignment(total, d, seed)
        scale = 1.0 / np.sqrt(np.bincount(assignment, minlength=d))[assignment]
        first = next(iter(adapters.values()))
        vector = UniLoRAVector(d, bound, seed).to(device=first.scale_A.device, dtype=first.scale_A.dtype)
        start = 0
        with torch.no_grad():
            for a in adapters.values():
                for idx, sc in ((a.idx_A, a.scale_A), (a.idx_B, a.scale_B)):
                    n = idx.numel()
                    idx.copy_(torch.from_numpy(assignment[start : start + n]).view_as(idx))
                    sc.copy_(torch.from_numpy(scale[start : start + n]).view_as(sc))
                    start += n
                a.__dict__["_vector"] = vector  # a reference, not a submodule: saved once, under lorafx_shared
        return vector


def balanced_assignment(total: int, d: int, seed: int) -> np.ndarray:
    """Column of P for each of ``total`` rows: every column ⌊total/d⌋ or ⌈total/d⌉ times, shuffled."""
    rng = np.random.default_rng(seed)
    base = np.repeat(np.arange(d), total // d)
    extra = rng.choice(d, total % d, replace=False)
    assignment = np.concatenate([base, extra])
    rng.shuffle(assignment)
    return assignment


class UniLoRAVector(nn.Module):
    """The one trainable vector ``theta [d]`` shared by every Uni-LoRA site of one adapter."""

    def __init__(self, d: int, bound: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.empty(d).uniform_(-bound, bound, generator=gen))

    def extra_repr(self) -> str:
        return f"d={self.theta.numel()}"


class UniLoRAAdapter(Adapter):
    """No parameters of its own: buffers ``idx_A``, ``scale_A`` ``[r, d_in]`` and ``idx_B``, ``scale_B`` ``[d_out, r]``."""

    def __init__(self, config: UniLoRA, in_features: int, out_features: int, site: str):
        super().__init__(config, in_features, out_features, site)
        r = config.r
        self.register_buffer("idx_A", torch.zeros(r, in_features, dtype=torch.long))
        self.register_buffer("scale_A", torch.zeros(r, in_features))
        self.register_buffer("idx_B", torch.zeros(out_features, r, dtype=torch.long))
        self.register_buffer("scale_B", torch.zeros(out_features, r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def vector(self) -> UniLoRAVector:
        v = self.__dict__.get("_vector")
        if v is None:
            raise RuntimeError(f"site {self.site!r}: Uni-LoRA adapter used before UniLoRA.finalize assigned its vector")
        return v

    def lower(self, x: torch.Tensor) -> Lowered:
        A, B, s = self.effective_weights()
        return Lowered(self.dropout(x), A, B, s)

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        theta = self.vector.theta
        return theta[self.idx_A] * self.scale_A, theta[self.idx_B] * self.scale_B, 1.0
