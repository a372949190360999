"""CE-LoRA (Chen et al. 2025, arXiv 2502.01378): LoRA whose frozen base matmul has a cheaper backward.

Forward and merge are exactly LoRA (rank r', ``s = α/√r'`` with rsLoRA, as the paper's scripts). Only
the activation gradient of the frozen term ``x Wᵀ`` changes. With ``G = ∂L/∂y`` ``[T, d_out]``, the
Double-LoRA split ``W = B0·A0 + Res`` (rank-r0 truncated SVD, frozen) and a kept set ``I`` of
``k = ⌈ρ·d_out⌉`` output channels::

    ∂x = (G B0) A0 + G[:, I] · Res[I, :]          (exact G W when k = d_out)

Since ``G W = G[:, I] W[I, :] + G[:, Iᶜ] W[Iᶜ, :]``, this equals ``G[:, I] W[I, :] + (G B0ᶜ) A0`` with
``B0ᶜ`` = B0 with the kept rows zeroed: the kept channels exactly, the dropped ones through the rank-r0
part. That is how ``lorafx::celora_input_grad`` computes it (no ``Res[I, :]`` is ever formed or
stored). Cost ``2T·r0·(d_in+d_out) + 2T·k·d_in`` instead of ``2T·d_out·d_in``. ``I`` is the top-k of
``‖G[:, i]‖·‖Res[i, :]‖`` (the classical approximate-matmul criterion), chosen by :func:`lorafx.step`
(``Adapter.on_step``) after the first optimizer step and every ``recompute_every``-th after it, from
the step's last backward, and used from the next step on; the first step's backward is exact. Steps
are counted by ``lorafx.step``, not by forward calls as in the released code, which also miscounts
with gradient accumulation and checkpointing. The released code's ranking by ``‖Res[i, :]‖`` alone
(its ``G_sums`` is a scalar, VARIANTS.md §3.4) is kept behind ``amm_bug=True`` for reproduction.

The SVD (fp32, or fp64 for fp64 weights) is taken at ``apply`` (training-mode sites), else at the first
eager training forward; A0, B0 and ``I`` are not saved in adapter files (a reloaded adapter's first
backward is exact again). Under ``torch.compile`` training compiles with ``fullgraph=True``: the graph
reads only tensors (``index``, ``col_sq`` written in the backward), and choosing ``I`` happens in
``lorafx.step``, outside the graph. At eval and when merged CE-LoRA is LoRA.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.config import AdapterConfig, register_variant
from lorafx.variants.checks import check_init, check_int, check_interval, check_rank_alpha_dropout
from lorafx.variants.lora import init_lora_pair, lora_scale


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
        check_interval(self, "keep_ratio", 0, 1, closed="(]")
        if self.svd_rank is not None and (not isinstance(self.svd_rank, int) or self.svd_rank < 1):
            raise ValueError(f"celora: svd_rank must be a positive int or None, got {self.svd_rank!r}")
        check_int(self, "recompute_every")
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
    """``F.linear(x, W, b)`` forward; backward ∂x by Double-LoRA + top-k (exact while ``index`` is empty).

    Stateless but for one write: the backward stores ``Σ_t G[t, i]²`` in ``col_sq`` (a buffer, written
    in place, which torch.compile keeps in the compiled backward) for :meth:`CELoRAAdapter.on_step` to
    rank channels from. Choosing ``index`` happens there, in eager Python, never in the graph.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, svd_B0, svd_A0, index, col_sq):
        # x only when W trains (frozen W: no activation kept). No None in the list: Dynamo's tracing of
        # autograd.Function drops it and shifts the tensors after it (seen on torch 2.13).
        ctx.save_for_backward(weight, svd_B0, svd_A0, index, col_sq, *([x] if weight.requires_grad else []))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, svd_B0, svd_A0, index, col_sq, *x = ctx.saved_tensors
        G = grad  # [T, d_out]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if index.numel() == 0:  # before the first selection: exact, as in the paper's first step
                gx = G @ weight
            else:
                from lorafx.kernels.celora_input_grad import celora_input_grad  # registers the op on first use

                gx = celora_input_grad(G, weight, svd_B0, svd_A0, index)
        if ctx.needs_input_grad[1]:
            gw = G.t() @ x[0].to(G.dtype)
        if ctx.needs_input_grad[2]:
            gb = G.sum(0)
        # T·d_out reads, ~1/d_in of the matmul above; overwritten, not accumulated, so DDP's buffer
        # broadcast before a forward cannot leak rank 0's sums into other ranks (and, as in the paper,
        # the ranking uses the last micro-batch of the step).
        col_sq.copy_(G.detach().float().pow(2).sum(0))
        return gx, gw, gb, None, None, None, None


class CELoRAAdapter(Adapter):
    """LoRA ``lora_A [r', d_in]``, ``lora_B [d_out, r']`` plus frozen, unsaved buffers: the SVD factors
    ``svd_A0 [r0, d_in]``, ``svd_B0 [d_out, r0]``, ``res_norm [d_out]`` (‖Res[i, :]‖), the kept channels
    ``index [k]`` (empty: exact backward) and ``col_sq [d_out]`` (last backward's ‖G[:, i]‖²).

    All state the graph reads is tensors, so a compiled training step is one graph (``fullgraph=True``);
    the only recompile is the one switch from the exact first step (``index`` empty) to the approximate
    backward (``index`` of k channels), after which re-selections copy into ``index`` in place.
    """

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
        self.register_buffer("res_norm", torch.empty(0), persistent=False)
        self.register_buffer("index", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("col_sq", torch.zeros(out_features), persistent=False)
        self.steps = 0
        self.pending = True  # select I at the first step that saw a backward
        self._forwards = 0  # eager training forwards since the last step (warns if step() is forgotten)

    @property
    def approximate(self) -> bool:
        return self.k < self.out_features

    @property
    def needs_attach(self) -> bool:
        """True while an approximating adapter has no SVD (see :meth:`attach`)."""
        return self.approximate and self.svd_A0.numel() == 0

    def attach(self, weight: torch.Tensor, force: bool = False) -> None:
        """Take the SVD at ``apply`` time (as the paper's conversion does), so that a model compiled
        before its first step already has it. Skipped for meta weights and, unless ``force``, for
        eval-mode sites (inference never needs it; a 4096² SVD costs ~1 s on GPU, ~10 s on 2 CPU
        cores); those take it in :func:`lorafx.compile` or at their first eager training forward."""
        if self.needs_attach and (self.training or force) and weight.device.type != "meta":
            self.take_svd(weight)

    def lower(self, x: torch.Tensor) -> Lowered:
        base = self._base if torch.is_grad_enabled() and self.training and self.approximate else None
        return Lowered(self.dropout(x), self.lora_A, self.lora_B, self.scale_arg(), base=base)

    def _base(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.svd_A0.numel() == 0:  # a shape: static under torch.compile
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"site {self.site!r}: CE-LoRA has no SVD of its base weight yet (apply() skips it for "
                    "meta weights and eval-mode sites); compile with lorafx.compile(model), which takes it, or run one "
                    "eager training step first"
                )
            self.take_svd(weight)
        if not torch.compiler.is_compiling():
            self._forwards += 1
            if self._forwards == 100 and self.steps == 0:
                warnings.warn(
                    f"site {self.site!r}: 100 CE-LoRA training forwards and lorafx.step(model) was never "
                    "called; the kept channels are chosen there, so the backward is still exact",
                    stacklevel=2,
                )
        # 2-D inside the Function: its output must not be a view, or lora_linear's in-place add of the
        # adapter term is refused; the reshape outside it is an ordinary (in-place safe) view.
        y = _CEBaseLinear.apply(
            x.reshape(-1, x.shape[-1]), weight, bias, self.svd_B0, self.svd_A0, self.index, self.col_sq
        )
        return y.view(*x.shape[:-1], y.shape[-1])

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    def on_step(self) -> None:
        """Count an optimizer step; on the first and every ``recompute_every``-th after it, choose the
        kept channels from the step's last backward (used from the next step on)."""
        if self.steps % self.config.recompute_every == 0:
            self.pending = True
        self.steps += 1
        self._forwards = 0
        if self.pending and self.approximate:
            self.pending = not self._select()

    @torch.no_grad()
    def take_svd(self, weight: torch.Tensor) -> None:
        """Rank-r0 SVD of ``weight [d_out, d_in]`` in fp32 (fp64 for fp64 weights): B0, A0, ‖Res[i, :]‖.

        Taken once. The exact part of the backward reads the live weight, so a base weight changed
        afterwards (merge/unmerge, a reload) only makes the approximation of the dropped channels
        staler; call this again to retake it."""
        W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))  # fp32 at least
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = S[: self.svd_rank].sqrt()
        self.svd_B0 = (U[:, : self.svd_rank] * root).to(weight.dtype)
        self.svd_A0 = (root[:, None] * Vh[: self.svd_rank]).to(weight.dtype)
        self.res_norm = (W - self.svd_B0.to(W.dtype) @ self.svd_A0.to(W.dtype)).norm(dim=1).float()

    @torch.no_grad()
    def _select(self) -> bool:
        """Choose I from ``col_sq``; False (nothing chosen) if no backward ran since the last choice."""
        sq = self.col_sq.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP/FSDP each rank saw its shard of the batch; rank on the global batch's column
            # norms so every rank keeps the same channels as one process would (d_out floats).
            torch.distributed.all_reduce(sq)
        if not bool(sq.any()) or self.res_norm.numel() == 0:
            return False
        norms = self.res_norm if self.config.amm_bug else sq.sqrt() * self.res_norm
        index = torch.topk(norms, self.k).indices.sort().values
        if self.index.shape == index.shape:
            self.index.copy_(index)  # in place: compiled graphs keep reading the same buffer
        else:
            self.index = index  # the one shape change, empty -> k (one recompile under torch.compile)
        self.col_sq.zero_()
        return True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r'={self.config.lora_rank}, svd_rank={self.svd_rank}, k={self.k}"
