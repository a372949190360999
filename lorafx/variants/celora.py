"""CE-LoRA (Chen et al. 2025, arXiv 2502.01378): LoRA whose frozen base matmul has a cheaper backward.

Forward and merge are exactly LoRA (rank r', ``s = α/√r'`` with rsLoRA, as the paper's scripts). Only
the activation gradient of the frozen term ``x Wᵀ`` changes. With ``G = ∂L/∂y`` ``[T, d_out]``, the
Double-LoRA split ``W = B0·A0 + Res`` (rank-r0 truncated SVD, frozen) and a kept set ``I`` of
``k = ⌈ρ·d_out⌉`` output channels::

    ∂x = (G B0) A0 + G[:, I] · Res[I, :]          (exact G W when k = d_out)

Cost ``2T·r0·(d_in+d_out) + 2T·k·d_in`` instead of ``2T·d_out·d_in``. ``I`` is the top-k of
``‖G[:, i]‖·‖Res[i, :]‖`` (the classical approximate-matmul criterion), chosen in the backward of the
first step and of every ``recompute_every``-th optimizer step after it; the first step's
backward is exact. Steps are counted by :func:`lorafx.step` (``Adapter.on_step``), not by forward
calls as in the released code, which also miscounts with gradient accumulation and checkpointing.
The released code's ranking by ``‖Res[i, :]‖`` alone (its ``G_sums`` is a scalar, VARIANTS.md
§3.4) is kept behind ``amm_bug=True`` for reproduction.

The SVD (fp32, or fp64 for fp64 weights) is taken from the live weight on the first training forward and redone if the weight
changes (merge/unmerge, ``.to()``); A0, B0 and ``I`` are not saved in adapter files (they are
recomputed; a reloaded adapter's first backward is exact again). Under ``torch.compile`` a CE site in
training is a graph break (its backward updates the index: a side effect Dynamo will not trace;
checked: ``fullgraph=True`` refuses it, the default mode gives the eager gradients); at eval and
when merged it compiles like LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.config import AdapterConfig, register_variant
from lorafx.variants.lora import check_init, check_rank_alpha_dropout, init_lora_pair, lora_scale


@register_variant
@dataclass(frozen=True)
class CELoRA(AdapterConfig):
    """CE-LoRA: LoRA forward, approximate backward of the frozen base matmul.

    Args:
        r: nominal LoRA rank before balancing: the trained rank is ``r' = int(7r/8)`` and the SVD
            rank ``r0 = int(7r/8)`` (paper code); with ``svd_rank`` set, ``r0 = svd_rank`` and
            ``r' = r - int(svd_rank/7)``.
        alpha: scale numerator; ``s = alpha/√r'`` (``rslora=True``, the paper's scripts) or ``alpha/r'``.
        keep_ratio: ρ, fraction of output channels of the residual kept in backward (paper: 0.55 on
            v/o_proj, 0.65 on up/down_proj; 1.0 = exact backward).
        svd_rank: rank r0 of the frozen Double-LoRA factors (default ``int(7r/8)``).
        recompute_every: optimizer steps between index selections (paper 200).
        rslora: rank-stabilised scaling.
        dropout: input dropout on the adapter path.
        init: ``"default"`` (kaiming A, zero B), ``"gaussian"`` or ``"random"`` (tests).
        amm_bug: rank channels by ``‖Res[i,:]‖`` only, as the released code does by mistake.

    Example:
        >>> spec = lorafx.Spec(lorafx.LoRA(r=16, alpha=32, rslora=True), targets="all-linear",
        ...                    overrides={"v_proj": lorafx.CELoRA(keep_ratio=0.55), "up_proj": lorafx.CELoRA(keep_ratio=0.65)})
    """

    name: ClassVar[str] = "celora"
    r: int = 16
    alpha: float = 32.0
    keep_ratio: float = 0.55
    svd_rank: int | None = None
    recompute_every: int = 200
    rslora: bool = True
    dropout: float = 0.0
    init: Literal["default", "gaussian", "random"] = "default"
    amm_bug: bool = False

    def __post_init__(self):
        check_rank_alpha_dropout(self)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"celora: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.svd_rank is not None and (not isinstance(self.svd_rank, int) or self.svd_rank < 1):
            raise ValueError(f"celora: svd_rank must be a positive int or None, got {self.svd_rank!r}")
        if not isinstance(self.recompute_every, int) or self.recompute_every < 1:
            raise ValueError(f"celora: recompute_every must be a positive int, got {self.recompute_every!r}")
        if self.lora_rank < 1:
            raise ValueError(
                f"celora: r={self.r} (svd_rank={self.svd_rank}) leaves a LoRA rank r' = {self.lora_rank} < 1"
            )
        check_init(self)

    @property
    def lora_rank(self) -> int:
        """r', the trained rank after the paper code's balancing (``update_lora_rank_pattern``)."""
        return int(7 * self.r / 8) if self.svd_rank is None else self.r - int(self.svd_rank / 7)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.lora_rank, self.rslora)

    def make_adapter(self, in_features: int, out_features: int, site: str) -> CELoRAAdapter:
        return CELoRAAdapter(self, in_features, out_features, site)


class _CEBaseLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` forward; backward ∂x from the adapter's Double-LoRA + top-k rule."""

    @staticmethod
    def forward(ctx, x, weight, bias, adapter):
        ctx.adapter = adapter
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        G = grad  # [T, d_out]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = ctx.adapter.input_grad(G, weight)
        if ctx.needs_input_grad[1]:
            gw = G.t() @ x.to(G.dtype)
        if ctx.needs_input_grad[2]:
            gb = G.sum(0)
        return gx, gw, gb, None


class CELoRAAdapter(Adapter):
    """LoRA ``lora_A [r', d_in]``, ``lora_B [d_out, r']`` plus frozen, unsaved ``svd_A0``, ``svd_B0``, ``index``."""

    def __init__(self, config: CELoRA, in_features: int, out_features: int, site: str):
        super().__init__(config, in_features, out_features, site)
        r = config.lora_rank
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        init_lora_pair(self.lora_A, self.lora_B, config.init)
        r0 = config.svd_rank if config.svd_rank is not None else int(7 * config.r / 8)
        self.svd_rank = min(r0, in_features, out_features)
        self.k = min(out_features, math.ceil(config.keep_ratio * out_features))
        self.register_buffer("svd_A0", torch.empty(0, in_features), persistent=False)
        self.register_buffer("svd_B0", torch.empty(out_features, 0), persistent=False)
        self.register_buffer("res_norm", torch.empty(0), persistent=False)  # ‖Res[i, :]‖, [d_out]
        self.register_buffer("index", torch.arange(out_features), persistent=False)  # all rows: exact
        self.steps = 0
        self.refresh_pending = True  # select I in the first backward
        self._w_key = None
        self._rows = None  # cached Res[I, :]

    @property
    def approximate(self) -> bool:
        return self.k < self.out_features

    def lower(self, x: torch.Tensor) -> Lowered:
        base = self._base if torch.is_grad_enabled() and self.training and self.approximate else None
        return Lowered(self.dropout(x), self.lora_A, self.lora_B, self.scale, base=base)

    def _base(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._ensure_svd(weight)
        # 2-D inside the Function: its output must not be a view, or lora_linear's in-place add of the
        # adapter term is refused; the reshape outside it is an ordinary (in-place safe) view.
        y = _CEBaseLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, self)
        return y.view(*x.shape[:-1], y.shape[-1])

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    def on_step(self) -> None:
        self.steps += 1
        if self.steps % self.config.recompute_every == 0:
            self.refresh_pending = True

    @torch.no_grad()
    def _ensure_svd(self, weight: torch.Tensor) -> None:
        """Take the rank-r0 SVD of the live weight (fp32) unless it is unchanged since the last one."""
        key = (id(weight), weight.data_ptr(), weight._version)
        if key == self._w_key:
            return
        W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))  # fp32 at least
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = S[: self.svd_rank].sqrt()
        self.svd_B0 = (U[:, : self.svd_rank] * root).to(weight.dtype)
        self.svd_A0 = (root[:, None] * Vh[: self.svd_rank]).to(weight.dtype)
        self.res_norm = (W - self.svd_B0.to(W.dtype) @ self.svd_A0.to(W.dtype)).norm(dim=1)
        self._w_key, self._rows = key, None

    @torch.no_grad()
    def input_grad(self, G: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """∂x of the frozen term for ``G [T, d_out]``; selects a new index afterwards if one is due."""
        if self.index.numel() >= self.out_features:
            gx = G @ weight
        else:
            if self._rows is None:
                self._rows = weight[self.index] - self.svd_B0[self.index] @ self.svd_A0
            from lorafx.kernels.ops import celora_input_grad  # registers lorafx:: ops on first use

            gx = celora_input_grad(G, self.svd_B0, self.svd_A0, self.index, self._rows)
        if self.refresh_pending:
            self._select(G)
        return gx

    def _select(self, G: torch.Tensor) -> None:
        if self.config.amm_bug:
            norms = self.res_norm  # released code: (G**2).sum(dim=[0, 1]) is a scalar, ranking is static
        else:
            sq = G.float().pow(2).sum(0)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Under DDP/FSDP each rank sees its shard of the batch; rank on the global batch's column
                # norms so every rank keeps the same channels as one process would (d_out floats).
                torch.distributed.all_reduce(sq)
            norms = sq.sqrt() * self.res_norm
        self.index = torch.topk(norms, self.k).indices.sort().values
        self._rows, self.refresh_pending = None, False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r'={self.config.lora_rank}, svd_rank={self.svd_rank}, k={self.k}"
