"""Site kinds beyond the linear: convolutions and embedding lookups, in the canonical form.

A convolution multiplies every receptive field by its weight ``W [C_out, C_in, *k]``: seen as a
linear of ``d_in = C_in·∏k`` inputs and ``d_out = C_out`` outputs per output position (im2col), the
canonical ``Aᵉ [R, d_in]`` is a convolution with R output channels and the site's kernel, stride,
padding and dilation, ``Bᵉ [d_out, R]`` a 1×1 convolution, and ``ΔW = s·BᵉAᵉ`` reshaped to ``W``'s
shape is exactly what merge folds (PEFT 0.21's ``lora.Conv2d``; PEFT's A ignores the site's dilation,
lorafx keeps it so that merged and unmerged agree).

An embedding ``E [V, D]`` is a linear on one-hot inputs with ``W = Eᵀ`` (``d_in = V``, ``d_out = D``):
``Aᵉ [R, V]`` is read as a lookup table (``h = Aᵉᵀ[ids]``, no matmul), ``Bᵉ [D, R]`` as a linear, and
``ΔE = (s·BᵉAᵉ)ᵀ`` (PEFT 0.21's ``lora.Embedding``: ``lora_embedding_A [r, V]``,
``lora_embedding_B [D, r]``). PEFT applies no dropout to embedding adapters; neither does lorafx (the
site lowers from :meth:`Adapter.effective_weights`).

An ``nn.MultiheadAttention`` multiplies by ``in_proj_weight [3E, E]`` and ``out_proj.weight`` inside
its own forward (and its eval fast path), never calling ``out_proj``: targeting the module adapts both
(PEFT 0.21's ``lora.MultiheadAttention``), and :func:`lora_mha` runs the module on ``W + s·BA``.

Only variants whose Aᵉ/Bᵉ do not depend on the input fit these forms (their config's ``site_kinds``). The
evaluators here are out of place and cast the adapter operands, so eager mode, ``torch.compile`` and
ONNX export (merged and unmerged) run the same code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lorafx.canonical import Lowered, expand
from lorafx.errors import SpecError

LINEAR, CONV, EMBEDDING = "linear", "conv", "embedding"
MHA, MHA_OUT = "mha", "mha_out"  # nn.MultiheadAttention's in_proj_weight [3E, E], and its out_proj
SITE_KINDS = (LINEAR, CONV, EMBEDDING, MHA, MHA_OUT)
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kind_of(module: nn.Module) -> str | None:
    """``"conv"`` for ``nn.Conv1d/2d/3d``, ``"embedding"`` for ``nn.Embedding``, else None (linears
    are recognised by :func:`lorafx.passes.find_sites.is_linear_module`)."""
    if isinstance(module, CONV_MODULES):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, nn.MultiheadAttention):
        return MHA
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a conv or embedding site in the canonical form (see the module docstring)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, 3 * module.embed_dim
    w = module.weight
    return int(w.shape[1]) * math.prod(w.shape[2:]), int(w.shape[0])


def conv_options(module: nn.Module) -> tuple:
    """``(stride, padding, dilation, groups)`` of an ``nn.ConvNd``, as ``F.convNd`` takes them."""
    return tuple(module.stride), module.padding, tuple(module.dilation), module.groups


def embedding_options(module: nn.Embedding) -> tuple:
    """``(padding_idx, scale_grad_by_freq, sparse)`` of an ``nn.Embedding`` (``max_norm`` is refused
    by the site rule: it renormalises the weight in place on every lookup)."""
    return module.padding_idx, module.scale_grad_by_freq, module.sparse


def kind_refusal(module: nn.Module) -> str | None:
    """Why a conv or embedding module cannot be adapted, or None."""
    kind = kind_of(module)
    if kind is None:
        return None
    if kind == MHA:
        return mha_refusal(module)
    base = CONV_MODULES[module.weight.dim() - 3] if kind == CONV else nn.Embedding
    if type(module).forward is not base.forward:
        return (
            f"{type(module).__name__} has its own forward (an {base.__name__} subclass); lorafx would replace it "
            f"by F.{base.__name__.lower()} and lose what it does"
        )
    if kind == CONV and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: the adapter's convolution would pad with zeros (PEFT's too)"
    if kind == CONV and module.groups != 1:
        return (
            f"groups={module.groups}: PEFT's layout for grouped convolutions (dense A, grouped B) is not a "
            "grouped ΔW, so it cannot be merged (PEFT refuses to merge it too); lorafx adapts groups=1 only"
        )
    if kind == EMBEDDING and module.max_norm is not None:
        return f"max_norm={module.max_norm}: every lookup renormalises the weight in place, which merge would undo"
    return None


def _one_node(fn: Callable) -> Callable:
    """Re-tracing a rewritten region (unpickling) records ``fn`` as one node, as for the linear sites."""

    @functools.wraps(fn)
    def site(x, *args, **kwargs):
        # lora_mha's first operand is a module (re-tracing hands it over as itself): look at every operand
        proxy = next((a for a in (x, *args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", site, (x, *args), kwargs)
        return fn(x, *args, **kwargs)

    return site


@_one_node
def lora_conv(x: Tensor, weight: Tensor, bias: Tensor | None, low: Lowered | None, options: tuple) -> Tensor:
    """``convNd(x, W, b) + conv1x1(s·convNd(x_in, Aᵉ), Bᵉ)``; with ``low=None`` just the base conv.

    ``options`` is ``(stride, padding, dilation, groups)`` of the site's own call. ``Aᵉ [R, d_in]`` is
    read as an ``[R, C_in, *k]`` kernel, ``Bᵉ [C_out, R]`` as a 1×1 one; the adapter path runs in the
    adapter's dtype and is added in the output's (as PEFT casts it).
    """
    stride, padding, dilation, groups = options
    conv = _CONVS[weight.dim() - 2]
    y = conv(x, weight, bias, stride, padding, dilation, groups)
    if low is None:
        return y
    _check_plain(low, "convolution")
    A = low.A.reshape(low.A.shape[0], *weight.shape[1:])
    # torch 2.13's ONNX exporter emits a wrong-shaped zero bias for a bias-less conv3d (onnxruntime:
    # "bias must be a 1D tensor of size output_channels"); an explicit zero bias of R (or C_out) values exports.
    zero = (lambda n: A.new_zeros(n)) if weight.dim() == 5 else (lambda n: None)
    h = conv(low.x.to(A.dtype), A, zero(A.shape[0]), stride, padding, dilation, 1)
    h = h * torch.as_tensor(low.scale, device=h.device).to(h.dtype)
    B = low.B.to(h.dtype).reshape(*low.B.shape, *[1] * (weight.dim() - 2))
    return y + conv(h, B, zero(B.shape[0])).to(y.dtype)


@_one_node
def lora_embedding(x: Tensor, weight: Tensor, low: Lowered | None, options: tuple) -> Tensor:
    """``E[ids] + s·Aᵉᵀ[ids] Bᵉᵀ``; with ``low=None`` just the lookup. ``options`` is
    ``(padding_idx, scale_grad_by_freq, sparse)``; the padding row gets no gradient in A either, as in PEFT."""
    padding_idx, scale_grad_by_freq, sparse = options
    y = F.embedding(x, weight, padding_idx, None, 2.0, scale_grad_by_freq, sparse)
    if low is None:
        return y
    _check_plain(low, "embedding")
    h = F.embedding(x, low.A.t(), padding_idx)
    return expand(y, h, low.B, low.scale)


def mha_refusal(module: nn.Module) -> str | None:
    """Why an ``nn.MultiheadAttention`` cannot be adapted, or None."""
    if type(module).forward is not nn.MultiheadAttention.forward:
        return f"{type(module).__name__} has its own forward (an nn.MultiheadAttention subclass)"
    if not module._qkv_same_embed_dim:
        return "separate q/k/v weights (kdim/vdim differ from embed_dim): no in_proj_weight to adapt (PEFT refuses too)"
    if not isinstance(module.out_proj, nn.Linear):
        return f"its out_proj is a {type(module.out_proj).__name__}, not an nn.Linear"
    return None


def mha_leaf(query, key, value, *args, **kwargs):
    """Marks the call of an ``nn.MultiheadAttention`` that is its own region (its graph cannot call
    itself as a module); :mod:`lorafx.passes.insert_adapters` replaces it by :func:`lora_mha`."""
    raise RuntimeError("an un-rewritten MultiheadAttention region ran; this is a lorafx bug")


def _dense_delta(low: Lowered, weight: Tensor) -> Tensor:
    _check_plain(low, "MultiheadAttention")
    scale = torch.as_tensor(low.scale, device=low.B.device).to(low.B.dtype)
    return ((low.B * scale) @ low.A).to(weight.dtype)


@_one_node
def lora_mha(sites, low_in: Lowered | None, low_out: Lowered | None, *args, **kwargs):
    """``nn.MultiheadAttention`` (``sites.base``) run with ``in_proj_weight + s·BA`` and
    ``out_proj.weight + s·BA``: its real computation, every option and its own eval fast path included,
    on the adapted weights (PEFT 0.21's ``lora.MultiheadAttention`` computes the same weights). The two
    ΔW are dense ([3E, E] and [E, E]): the module's fused attention takes weights, not a low-rank path;
    at E = 1024 that is 2·4·E²·r FLOPs per call, what 4·E·r-FLOP tokens cost once T > E."""
    mha = sites.base
    params = {}
    if low_in is not None:
        params["in_proj_weight"] = mha.in_proj_weight + _dense_delta(low_in, mha.in_proj_weight)
    if low_out is not None:
        params["out_proj.weight"] = mha.out_proj.weight + _dense_delta(low_out, mha.out_proj.weight)
    if not params:
        return mha(*args, **kwargs)
    return torch.func.functional_call(mha, params, args, kwargs, tie_weights=False, strict=False)


def _check_plain(low: Lowered, kind: str) -> None:
    # The plan refuses gated variants at these sites; a stacked (per-row) adapter is export's multi mode.
    if low.A.dim() != 2:
        raise SpecError(f"per-row adapters (multi-adapter export) are not supported at {kind} sites")
    if low.gate is not None or low.base is not None or low.h is not None:
        raise SpecError(f"an input-dependent adapter (gate, own base term) cannot run at a {kind} site")


KIND_EVALUATORS = {CONV: lora_conv, EMBEDDING: lora_embedding, MHA: lora_mha}


def is_kind_site_call(node) -> bool:
    """True for an fx node that calls a conv or embedding site evaluator."""
    return node.op == "call_function" and any(node.target is fn for fn in KIND_EVALUATORS.values())
