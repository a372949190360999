"""Quantized bases (QLoRA): recognise quantized linears, dequantize them, merge onto them correctly.

Two families, recognised by class and module path so that ``import lorafx`` never imports them:

* **bitsandbytes** ``Linear4bit`` (``LinearNF4``/``LinearFP4``, nf4/fp4, double quant) and
  ``Linear8bitLt``: ``nn.Linear`` subclasses whose ``weight`` is packed (``Params4bit`` is ``uint8``
  ``[n, 1]``). ``F.linear`` on it fails, so the rewritten site keeps calling the module's own
  ``forward`` (its dequant-GEMM) for the base term and adds the adapter with
  :func:`lorafx.canonical.quantized_lora_linear` (:attr:`SiteAdapters.base` holds the module).
* **torchao** weight-only tensors (int8, int4): a plain ``nn.Linear`` whose weight is a torchao
  tensor subclass. ``F.linear`` dispatches through the subclass, so these sites are ordinary sites;
  only merging needs to know.

Merging into a quantized weight is refused (:class:`NotMergeableError`): rounding ``W4 + ΔW`` back to
4 bits loses most of ΔW (peft#2321), and merging into the original high-precision W instead of
``dequant(W4)`` gives a model that is neither the trained one nor the base (unsloth-zoo#810).
:func:`merge_dequantized` is the correct path: every adapted quantized base becomes an ``nn.Linear`` in
the compute dtype holding ``dequant(Wq) + ΔW`` (undone by :func:`lorafx.unmerge`, which puts the
quantized module back, bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorafx.errors import NotMergeableError

_BNB_CLASSES = {"Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt"}


def _is_bnb(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and any(c.__name__ in _BNB_CLASSES for c in cls.__mro__)


def _is_torchao_weight(weight) -> bool:
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return isinstance(weight, torch.Tensor) and (
        type(weight).__module__.startswith("torchao") or type(data).__module__.startswith("torchao")
    )


def quantized_kind(module: nn.Module) -> str | None:
    """What kind of quantized linear ``module`` is (``"bnb-nf4"``, ``"bnb-fp4"``, ``"bnb-int8"``,
    ``"torchao-<TensorClass>"``), or None for a dense one."""
    if _is_bnb(module):
        if "8bit" in type(module).__name__:
            return "bnb-int8"
        return f"bnb-{getattr(module.weight, 'quant_type', '4bit')}"
    weight = getattr(module, "weight", None)
    if _is_torchao_weight(weight):
        return f"torchao-{type(weight).__name__}"
    return None


def needs_own_forward(module: nn.Module) -> bool:
    """True when the base term must be the module's own forward (bitsandbytes: packed weight)."""
    return _is_bnb(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized linear computes in (bnb's ``compute_dtype``; torchao's weight dtype)."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if _is_bnb(module):  # Linear8bitLt: the bias's dtype, fp32 without one
        bias = module.bias
        return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
    return module.weight.dtype


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``dequant(Wq)`` ``[d_out, d_in]`` in fp32: the weight the quantized forward multiplies by."""
    w = module.weight
    if _is_bnb(module):
        import bitsandbytes.functional as bnbf

        if "8bit" in type(module).__name__:
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = module.state.SCB
            return w.data.float() * (scb.float().unsqueeze(1) / 127.0)
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(w.data, w.quant_state)
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    data = w.data if isinstance(w, nn.Parameter) else w
    return data.dequantize().float()


def _dequantize_cpu_packed(packed: torch.Tensor, qs) -> torch.Tensor:
    """``dequant(Wq)`` of a 4-bit weight that bitsandbytes repacked for its CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` in eval mode without grad
    rewrites the weight in place into blocks of 32 output rows (each byte: the codes of row ``b`` and
    ``b + 32`` ... of one input pair), un-nests the absmax and rounds it to bf16, then runs a bf16 kernel.
    Its ``dequantize_4bit`` no longer applies, so this decodes that layout: codes ``[N, K]``, then
    ``code[q] · absmax`` with the bf16 absmax the kernel multiplies by."""
    n, k = qs.shape
    rows = packed.reshape(-1, 32)
    codes = torch.cat([rows & 0xF, rows >> 4], dim=-1).reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)
    absmax = qs.absmax.float().t().repeat_interleave(qs.blocksize, dim=1)  # [N, K]
    return qs.code.float()[codes.long()] * absmax


def dense_linear(module: nn.Module, delta: torch.Tensor | None = None) -> nn.Linear:
    """A frozen ``nn.Linear`` in the compute dtype with ``W = dequant(Wq) (+ ΔW)``, summed in fp32 and
    rounded once; the bias is the module's bias in the compute dtype."""
    dtype = compute_dtype(module)
    w = dequantized_weight(module)
    if delta is not None:
        w = w + delta.to(device=w.device, dtype=torch.float32)
    bias = getattr(module, "bias", None)
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    out.train(module.training)
    return out


def requantized(module: nn.Module, delta: torch.Tensor) -> nn.Module:
    """A new bitsandbytes module of ``module``'s kind and settings, quantized from
    ``dequant(Wq) + ΔW`` (fp32 sum) on ``module``'s device; for a torchao int8 weight-only base, an
    ``nn.Linear`` whose weight is requantized the same way (:func:`_requantized_torchao`)."""
    if _is_torchao_weight(getattr(module, "weight", None)):
        return _requantized_torchao(module, delta)
    if not _is_bnb(module):
        raise NotMergeableError(
            f"requantizing a {quantized_kind(module) or type(module).__name__} base is not implemented (only "
            "bitsandbytes and torchao int8 weight-only); use lorafx.merge_dequantized(model); the model is unchanged"
        )
    import bitsandbytes as bnb

    w = dequantized_weight(module) + delta.to(module.weight.device).float()
    has_bias = module.bias is not None
    if "8bit" in type(module).__name__:
        new = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=module.state.threshold,
        )
    else:
        qs = module.weight.quant_state
        new = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=has_bias,
            compute_dtype=module.compute_dtype,
            compress_statistics=bool(getattr(qs, "original_nested", qs.nested)),
            quant_type=qs.quant_type,
            quant_storage=module.weight.quant_storage,
        )
        new.weight.blocksize = qs.blocksize
    dtype = compute_dtype(module)
    state = {"weight": w.to(dtype)}
    if has_bias:
        state["bias"] = module.bias.detach().to(dtype)
    new.load_state_dict(state)
    new.weight.requires_grad_(False)
    return new.to(w.device).train(module.training)


def _region_prefix(sa, prefix: str) -> str | None:
    # "<region>.lorafx.<key>." -> "<region>." ("" for a root region); None unless this is the
    # SiteAdapters of a single-linear region over a bitsandbytes module (see save_base_state)
    parts = prefix.rstrip(".").split(".")
    if len(parts) < 2 or parts[-1] != sa.__dict__.get("_base_state_key") or not _is_bnb(sa.base):
        return None
    region = ".".join(parts[:-2])
    return f"{region}." if region else ""


def _requantized_torchao(module: nn.Module, delta: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` (no bias: :func:`swap_base` replaces only a torchao base's weight) whose
    weight is ``dequant(Wq) + ΔW`` quantized again with the config ``Wq`` was made with. Only torchao's
    int8 weight-only per-row tensor (``Int8WeightOnlyConfig()``'s ``Int8Tensor``, block ``[1, d_in]``,
    no activation quantization) is recognised: other configs cannot be read back from the tensor, so
    they are refused rather than requantized with a different scheme."""
    w = module.weight.data if isinstance(module.weight, nn.Parameter) else module.weight
    d_out, d_in = w.shape
    kind = quantized_kind(module)
    per_row = list(getattr(w, "block_size", [])) == [1, d_in] and getattr(w, "act_quant_kwargs", None) is None
    if type(w).__name__ != "Int8Tensor" or not per_row:
        raise NotMergeableError(
            f"requantizing a {kind} base is not implemented (torchao: only Int8WeightOnlyConfig()'s per-row "
            "int8 weights); use lorafx.merge_dequantized(model); the model is unchanged"
        )
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    dense = dequantized_weight(module) + delta.to(w.device).float()
    new = nn.Linear(d_in, d_out, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(dense.to(w.dtype))
    quantize_(new, Int8WeightOnlyConfig(set_inductor_config=False))  # True would edit inductor's globals
    new.weight.requires_grad_(False)
    return new.train(module.training)


def save_base_state(sa, destination: dict, prefix: str, keep_vars: bool) -> None:
    """Add a bitsandbytes base's own state-dict entries (4-bit quant state: ``weight.absmax``,
    ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4`` ...; 8-bit ``weight.SCB``) under the
    name of the region that replaced it, for a single-linear region (``SiteAdapters`` at key
    ``sa._base_state_key``, ``prefix`` = ``<region>.lorafx.<key>.``). Such a region holds the packed
    weight as its own parameter, so without this its ``state_dict`` lost those entries and a checkpoint
    of the adapted model could not be dequantized or reloaded as bitsandbytes does. Entries already
    written (``weight``, ``bias``) are kept."""
    region = _region_prefix(sa, prefix)
    if region is None:
        return
    extra: dict = {}
    sa.base._save_to_state_dict(extra, region, keep_vars)
    for k, v in extra.items():
        destination.setdefault(k, v)


def load_base_state(sa, state_dict, prefix: str, local_metadata, strict: bool, unexpected: list, errors: list) -> None:
    """The load side of :func:`save_base_state`: the bitsandbytes base loads the entries it owns
    (``Linear8bitLt`` reads ``SCB`` and drops ``weight_format``, as it does unadapted), and those it
    consumed are no longer reported as unexpected by the region. ``Linear4bit`` loads none of its
    quant-state entries, so they stay unexpected, as bitsandbytes reports them unadapted (transformers'
    loader is what reads them): a strict load never silently keeps a stale quant state."""
    region = _region_prefix(sa, prefix)
    if region is None or "8bit" not in type(sa.base).__name__:
        return
    own: dict = {}
    sa.base._save_to_state_dict(own, region, False)
    extra = {k for k in own if k[len(region) :] not in ("weight", "bias")}
    still: list = []
    sa.base._load_from_state_dict(state_dict, region, local_metadata, strict, [], still, errors)
    consumed = extra - set(still)
    unexpected[:] = [k for k in unexpected if k not in consumed]


def swap_base(model: nn.Module, sa, new: nn.Linear) -> Callable[[], None]:
    """Make ``new`` the base of site ``sa`` and return the undo.

    A bitsandbytes base is the module :attr:`SiteAdapters.base` calls: a child of a traced region
    (replaced in its parent) or the module a single-linear region was made from (the region's own
    ``weight``/``bias`` are replaced, so its ``state_dict`` holds the dense ones). A torchao base is
    the owner's ``weight`` Parameter."""
    owner = model.get_submodule(sa.site)
    old_base = sa.base
    old_params = {k: owner._parameters.get(k) for k in ("weight", "bias")}
    parent_name, _, child = sa.site.rpartition(".")
    parent = model.get_submodule(parent_name) if old_base is not None and owner is old_base else None
    if parent is not None:
        setattr(parent, child, new)
    else:
        owner.weight = new.weight
        if old_base is not None and old_params["bias"] is not None:
            owner.bias = new.bias
    if old_base is not None:
        sa.set_base(new)

    def undo() -> None:
        if parent is not None:
            setattr(parent, child, owner)
        else:
            for k, p in old_params.items():
                if p is not None:
                    owner._parameters[k] = p
        if old_base is not None:
            sa.set_base(old_base)

    return undo
