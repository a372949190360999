"""The canonical form of an adapted call site, and its one evaluator.

Every variant lowers one call site to::

    y = x Wᵀ + b + s · ((x_in Aᵉᵀ) ⊙ g) Bᵉᵀ        Aᵉ [R, d_in]  Bᵉ [d_out, R]  g [..., R] or None

where ``x_in`` is the adapter-path input (``x`` after LoRA's input dropout). :class:`Lowered` carries
those operands. This module is the only place that evaluates the form: the rewritten graphs call
:func:`lora_linear`, the ``lorafx::`` ops' CPU composites call :func:`shrink` and :func:`expand`, ONNX
export calls :func:`lora_linear` with ``inplace=False`` (and batched per-row adapters), ``lorafx inspect``
counts FLOPs by running it, and the tests use it as their oracle.

Order of work is the cheap one: ``x_in Aᵀ`` first (T·R·d_in), then the expand into the base output
(T·R·d_out), never a dense ΔW (d_out·d_in). In eager mode the expand is one in-place ``addmm_`` into
the base output: it saves one ``[T, d_out]`` temporary and one pass over it; on the benchmark Llama
(hidden 1024, T = 512, r = 16, 2 CPU cores) that brings the unmerged forward from ~1.06× to ~1.02× of
the base model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from lorafx.seeded_dropout import Dropped, dropped_shrink

# ---- site implementations ------------------------------------------------------------------------
# A rewritten site is one ``call_function`` node ``impl(x, W, b, low)``. Every function that may stand
# there is registered here, by name, so that "is this node a lorafx site?" has one answer for every
# pass (lowering to ops, export, inspect) whatever implementation the site currently calls.

SITE_IMPLEMENTATIONS: dict[str, Callable] = {}


def site_implementation(name: str, records_itself: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(x, weight, bias, low)`` as the site implementation called ``name``.

    ``records_itself``: ``fn`` starts with ``if isinstance(x, fx.Proxy): return record_site(fn, ...)``
    and is registered as it is; otherwise a wrapper does that check. The eager hot path
    (:func:`lora_linear`) records itself: the wrapper's extra frame and argument packing cost about
    1 µs per site per call, 3% of an unmerged decode step's overhead on the tiny Llama.
    """

    def register(fn: Callable) -> Callable:
        if name in SITE_IMPLEMENTATIONS:
            raise ValueError(f"site implementation {name!r} is registered twice")
        if records_itself:
            SITE_IMPLEMENTATIONS[name] = fn
            return fn

        @functools.wraps(fn)
        def site(x, weight, bias, low, *rest, **kwargs):
            if isinstance(x, fx.Proxy):
                return record_site(site, x, weight, bias, low, *rest, **kwargs)
            return fn(x, weight, bias, low, *rest, **kwargs)

        SITE_IMPLEMENTATIONS[name] = site
        return site

    return register


def record_site(site: Callable, x: fx.Proxy, *args, **kwargs) -> fx.Proxy:
    """The site as one ``call_function`` node: symbolic tracing (re-tracing a rewritten region, as
    unpickling a GraphModule does) records it instead of tracing into its ``low is None`` branch."""
    return x.tracer.create_proxy("call_function", site, (x, *args), kwargs)


def is_site_call(node) -> bool:
    """True for an fx node that calls a registered site implementation."""
    return node.op == "call_function" and any(node.target is fn for fn in SITE_IMPLEMENTATIONS.values())


class Lowered(NamedTuple):
    """One site's adapter in canonical form (see the module docstring)."""

    x: Tensor  # adapter-path input, [..., d_in] (dropout applied in training)
    A: Tensor  # [R, d_in], or [rows, R, d_in] for per-row adapters (export's multi mode)
    B: Tensor  # [d_out, R], or [rows, d_out, R]
    scale: float | Tensor  # 0-dim tensor from Adapter.scale (a float would be a compile guard); [rows] per row
    gate: Tensor | None = None  # [..., R]; None = no gate
    base: Callable | None = None  # replaces F.linear(x, W, b) for the frozen term (CE-LoRA's backward)
    h: Tensor | None = None  # x_in Aᵉᵀ precomputed a cheaper, equal way ([..., R]; MoR's one shared shrink)
    # Per-row adapters (lorafx.rows): token t gets adapter rows[t] of the [n, R, d_in]/[n, d_out, R]
    # stacks with scale[rows[t]] (< 0: base only), through torch.ops.lorafx.lora_linear_multi.
    rows: Tensor | None = None
    drop: Dropped | None = None  # how x was dropped into x_in (seed): the shrink then saves x, not x_in


def shrink(
    x_in: Tensor, A: Tensor, gate: Tensor | None = None, h: Tensor | None = None, drop: Dropped | None = None
) -> Tensor:
    """``(x_in Aᵀ) ⊙ g`` ``[..., R]`` in A's dtype; ``h`` replaces ``x_in Aᵀ`` when given; with ``drop``
    (the :class:`~lorafx.seeded_dropout.Dropped` record of ``x_in``) the backward rebuilds ``x_in``
    from ``x`` and the seed instead of keeping it.

    A ``[rows, R, d_in]`` stack takes ``x_in`` as ``rows`` equal blocks of tokens (one adapter per
    block) and returns ``[rows, T/rows, R]``; ``bmm`` exports to one ONNX MatMul where ``matmul`` adds
    Expand/Reshape nodes.
    """
    if A.dim() == 3:
        rows = A.shape[0]
        if h is None:
            h = torch.bmm(x_in.reshape(rows, -1, x_in.shape[-1]).to(A.dtype), A.transpose(1, 2))
        else:
            h = h.reshape(rows, -1, A.shape[1])
        return h if gate is None else h * gate.reshape(h.shape)
    if h is None and drop is not None and drop.x_in is x_in and torch.is_grad_enabled():
        h = dropped_shrink(drop, A)
    if h is None:  # a no-op .to() still costs a dispatch (~1 µs per site per decode step)
        h = F.linear(x_in if x_in.dtype == A.dtype else x_in.to(A.dtype), A)
    return h if gate is None else h * gate


def expand(y: Tensor, h: Tensor, B: Tensor, scale: float | Tensor, inplace: bool = False) -> Tensor:
    """``y + s·h Bᵀ``. The scale multiplies ``h`` ``[T, R]`` rather than the ``[T, d_out]`` delta
    (R/d_out of a pass: 16/4096 at Llama-7B sizes). ``inplace`` adds into ``y`` with one ``addmm_`` when
    the dtypes agree and ``y`` is contiguous (callers pass it only where autograd allows: ``y`` is not
    needed by the base matmul's backward)."""
    if B.dim() == 3:  # per-row adapters: h [rows, T/rows, R], scale [rows]
        rows = B.shape[0]
        one = isinstance(scale, float) and scale == 1.0  # the scale is in B (ONNX export): no Mul
        hs = h if one else h * torch.as_tensor(scale).to(h.dtype).reshape(rows, 1, 1)
        return y + torch.bmm(hs, B.transpose(1, 2).to(hs.dtype)).reshape(y.shape).to(y.dtype)
    alpha = scale
    if isinstance(alpha, Tensor):
        h, alpha = h * alpha.to(h.dtype), 1.0
    d_out = B.shape[0]
    if _compiled_one_token_inference(h):
        # One token through a compiled graph (a decode step): inductor hands ``h Bᵀ`` to MKL as a
        # gemv over rows of r floats, 45 µs per site at d_out 2816, r 16, 2 threads; as a product
        # and a sum over r it generates one vectorised loop instead: 7.9 µs.
        delta = (h.unsqueeze(-2) * B.to(h.dtype)).sum(-1)
        return y + (delta if alpha == 1.0 else delta * alpha).to(y.dtype)
    if inplace and y.dtype == B.dtype and h.dtype == B.dtype and y.is_contiguous():
        y2 = y if y.dim() == 2 else y.view(-1, d_out)
        y2.addmm_(h if h.dim() == 2 else h.reshape(-1, h.shape[-1]), B.t(), alpha=alpha)
        return y
    delta = F.linear(h, B.to(h.dtype))
    if alpha != 1.0:
        delta = delta * alpha
    return y + delta.to(y.dtype)


def _compiled_one_token_inference(h: Tensor) -> bool:
    """True while Dynamo (not torch.export: ONNX graphs keep their MatMul) traces a call without
    autograd whose ``h`` holds one token, provably, so that no shape guard is added."""
    if not torch.compiler.is_dynamo_compiling():  # eager: one cheap call, nothing imported
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return (
        not torch.compiler.is_exporting()
        and not torch.is_grad_enabled()
        and statically_known_true(h.numel() == h.shape[-1])
    )


@site_implementation("composite", records_itself=True)
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, low: Lowered | None, inplace: bool = True) -> Tensor:
    """``x Wᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ``; with ``low=None`` just the base linear.

    The call target of every rewritten site (:mod:`lorafx.passes.insert_adapters`).

    Args:
        x: input ``[..., d_in]``.
        weight: base weight ``[d_out, d_in]`` (frozen).
        bias: base bias ``[d_out]`` or None.
        low: the adapter in canonical form, or None (no adapter, disabled, or merged).
        inplace: add the adapter into the base output in place (eager); export passes False.
    """
    if isinstance(x, fx.Proxy):
        return record_site(lora_linear, x, weight, bias, low, **({} if inplace else {"inplace": False}))
    if low is None:
        return F.linear(x, weight, bias)
    if low.rows is not None:  # registered by lorafx.rows, the only maker of such a Lowered
        return torch.ops.lorafx.lora_linear_multi(x, weight, bias, low.A, low.B, low.scale, low.rows)
    y = F.linear(x, weight, bias) if low.base is None else low.base(x, weight, bias)
    return expand(y, shrink(low.x, low.A, low.gate, low.h, low.drop), low.B, low.scale, inplace)


def eager_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, sites) -> Tensor:
    """:func:`lora_linear` for an eager call without autograd, given the site's container.

    What an adapted region runs instead of ``lora_linear(x, W, b, sites(x))`` when it is called eagerly
    with autograd off on plain tensors (:mod:`lorafx.passes.eager_sites`, :class:`lorafx.adapted_region.AdaptedRegion`):
    for an evaluating plain-LoRA adapter (a class that says ``eval_is_lora``), three ops,
    ``y = x Wᵀ + b``, ``h = x Aᵀ``, ``y += s·h Bᵀ`` on the adapter's cached contiguous ``Bᵀ``; with no
    active adapter at the site (merged or disabled), ``x Wᵀ + b`` alone; anything else (other variants, dropout in training, per-row or several adapters, hooks on the
    container or a ``forward`` set on it, a parameter without a trusted cache) goes the canonical way, ``lora_linear(x, W, b, sites(x))``.

    Why a second entry: a decode step streams every weight once (~330 MB on the benchmark Llama) and
    evicts the interpreter's code and data between sites, so each Python-level call costs 8–15 µs
    there instead of ~1 µs in a hot loop. The canonical chain (the container's module call, ``lower``,
    a :class:`Lowered`, the evaluator's branches) put lorafx at 1.11–1.13× the base model's decode
    step; this entry at 1.075–1.09×, against 1.05–1.07× for the same three ops written by hand with no
    check at all (benchmark Llama, batch 1, 2 threads, medians of 200 interleaved steps per process).
    """
    a = sites._slot
    ops = None
    # Hooks, or a forward replaced on the instance (accelerate's hooks do that), need the module call.
    # No slot (merged or disabled): the container would return None, the base linear alone (merged
    # decoding 1.020x base through the module call, benchmark Llama batch 1). A per-row or
    # several-adapter slot is no eval_is_lora class; in training eager_operands says None.
    if not (sites._forward_pre_hooks or sites._forward_hooks or "forward" in sites.__dict__):
        if a is None:
            return F.linear(x, weight, bias)
        if type(a).__dict__.get("eval_is_lora", False):
            ops = a.eager_operands()
    if ops is None:
        return lora_linear(x, weight, bias, sites(x))
    A, Bt, s = ops
    y = F.linear(x, weight, bias)
    h = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A)
    if y.dtype == Bt.dtype and h.dtype == Bt.dtype:
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), Bt, alpha=s)
        return y
    return expand(y, h, Bt.t(), s)  # mixed dtypes (autocast, fp32 adapters on a half model)


def quantized_lora_linear(x: Tensor, sites, low: Lowered | None) -> Tensor:
    """A quantized base (bitsandbytes) + adapter: ``sites.base_forward(x) + s·((x_in Aᵀ) ⊙ g) Bᵀ``.

    ``sites`` is the site's :class:`~lorafx.adapter.SiteAdapters`; the base term is the quantized
    module's own forward (its dequant-GEMM in the compute dtype), the adapter term the same
    :func:`shrink`/:func:`expand` as :func:`lora_linear`, cast to the base output's dtype. Not a
    registered site implementation: passes that retarget sites to kernels or export them leave it alone.
    """
    if isinstance(x, fx.Proxy):  # re-tracing (unpickling): one node, as for the registered sites
        return x.tracer.create_proxy("call_function", quantized_lora_linear, (x, sites, low), {})
    y = sites.base_forward(x)
    if low is None:
        return y
    if low.rows is not None:
        raise NotImplementedError(f"site {sites.site!r}: per-row adapters over a quantized base are not supported")
    return expand(y, shrink(low.x, low.A, low.gate, low.h, low.drop), low.B, low.scale)


# Quantized sites (``impl(x, sites, low)``) by site-implementation name: "composite" is the function
# above; ``lorafx.kernels.quantized_site`` adds "ops" (the fused 4-bit kernel on CUDA). Passes that
# retarget sites to a kernel choice retarget these nodes too, to the entry of the same name if any.
QUANTIZED_SITE_IMPLEMENTATIONS: dict[str, Callable] = {"composite": quantized_lora_linear}


def is_quantized_site_call(node) -> bool:
    """True for an fx node that calls a quantized site implementation (``impl(x, sites, low)``)."""
    return node.op == "call_function" and any(node.target is fn for fn in QUANTIZED_SITE_IMPLEMENTATIONS.values())


@site_implementation("functional")
def lora_linear_functional(x: Tensor, weight: Tensor, bias: Tensor | None, low: Lowered | None) -> Tensor:
    """:func:`lora_linear` out of place, every adapter operand cast to the output's dtype: the form
    ONNX export traces (adapter tensors are fed fp32; per-row ``[rows, R, d_in]`` stacks allowed)."""
    if low is None:
        return F.linear(x, weight, bias)
    dtype = x.dtype
    low = low._replace(
        x=low.x.to(dtype),
        A=low.A.to(dtype),
        B=low.B.to(dtype),
        scale=low.scale if isinstance(low.scale, float) else torch.as_tensor(low.scale).to(dtype),  # 1.0: no Mul
        gate=None if low.gate is None else low.gate.to(dtype),
        h=None if low.h is None else low.h.to(dtype),
    )
    return lora_linear(x, weight, bias, low, inplace=False)


def adapter_flops(lower: Callable[[Tensor], Lowered | None], x: Tensor, weight: Tensor) -> int:
    """Matmul FLOPs of one adapted site over the tokens of ``x``, minus its base linear: ``lower(x)``
    (the site's adapter, e.g. MoR's router and shared shrink) and :func:`lora_linear` on the result,
    counted by running both under ``torch.utils.flop_counter``. It counts what the rewritten graph
    executes, by construction."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: not at `import lorafx` time

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        low = lower(x)
        lora_linear(x, weight, None, None if low is None else low._replace(base=None), inplace=False)
    return counter.get_total_flops() - 2 * x[..., 0].numel() * weight.shape[0] * weight.shape[1]
