"""The per-site adapter (:class:`Adapter`, one per variant) and container (:class:`SiteAdapters`).

An adapter's one job is :meth:`Adapter.lower`: its site in the canonical form
(:class:`lorafx.canonical.Lowered`), which :mod:`lorafx.canonical` evaluates. Merging, kernels, ONNX
export and PEFT conversion are written once against that form.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lorafx.canonical import Lowered
from lorafx.config import AdapterConfig
from lorafx.errors import NotMergeableError


class Adapter(nn.Module):
    """One adapter at one site. A variant subclasses it and implements :meth:`lower`.

    Mergeable variants also get :meth:`delta_weight` for free from the lowering at eval, gate-free.

    ``self.scale`` reads as a 0-dim fp32 tensor and accepts a float on assignment. A Python float read
    inside ``forward`` becomes a torch.compile guard (``scale == 2.0``), so changing it would
    recompile; a tensor is a graph input. The tensor is a persistent buffer (``scale_t``): a scale
    changed by :func:`lorafx.set_scale` is state, kept by ``state_dict`` round trips and adapter files.
    """

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, site: str):
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.site = site
        self.register_buffer("scale_t", torch.ones((), dtype=torch.float32))
        self._scale_value = 1.0  # exact value, to refill scale_t after a dtype change

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_t

    @scale.setter
    def scale(self, value: float | torch.Tensor) -> None:
        self._scale_value = float(value)
        with torch.no_grad():  # in place: the tensor compiled graphs read stays the same object
            self.scale_t.fill_(self._scale_value)
        self._note_scale()

    def scale_arg(self) -> float | torch.Tensor:
        """The scale as :meth:`lower` hands it on: :attr:`scale` (the tensor) while torch.compile,
        torch.export or ``torch.jit.trace`` records the call, so a graph reads it as an input and
        ``set_scale`` never recompiles; its Python value in eager mode, so that the expand folds it into
        ``addmm``'s ``alpha``. The tensor costs an ``[T, R]`` multiply and a cast per site per call:
        one decode step of a 64-wide site went from 110 to 63 µs without them (2 loaded cores).

        The float is the value last written through :attr:`scale`, a move or a state-dict load; any
        other in-place write to ``scale_t`` (DDP's buffer broadcast, a user's ``fill_``) bumps the
        tensor's version counter, and the float is then re-read from the tensor.
        """
        t = self._buffers["scale_t"]
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return t
        try:
            version = t._version
        except RuntimeError:  # a tensor made under torch.inference_mode keeps no version counter
            return t
        seen = self.__dict__.get("_scale_seen")
        if seen is None or seen[0] is not t or seen[1] != version:
            if float(t) != float(torch.tensor(self._scale_value, dtype=t.dtype)):
                self._scale_value = float(t)  # written behind our back: the tensor is the truth
            self._note_scale()
        return self._scale_value

    def _note_scale(self) -> None:
        """Record which tensor, at which version, :attr:`_scale_value` describes (see :meth:`scale_arg`)."""
        t = self._buffers["scale_t"]
        try:
            self.__dict__["_scale_seen"] = (t, t._version)
        except RuntimeError:  # inference tensor: scale_arg hands on the tensor itself
            self.__dict__["_scale_seen"] = None

    def _apply(self, fn, recurse=True):
        # The exact Python value is the truth; the tensor is refilled from it after every move:
        # .half()/.to(bf16) would round the scale too (16/12 -> 1.3359 in bf16), so it stays fp32, or
        # fp64 for an fp64 model (fp32 16/√7 is off by 1.5e-6 relative); and to_empty() after building
        # on the meta device leaves garbage in every buffer (5.8e-37 seen for 2.0).
        out = super()._apply(fn, recurse)
        dtype = torch.float64 if self.scale_t.dtype == torch.float64 else torch.float32
        if self.scale_t.device.type != "meta":
            self.scale_t = torch.full((), self._scale_value, dtype=dtype, device=self.scale_t.device)
            self._note_scale()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A loaded scale that differs from ours beyond its own rounding is a new value (set_scale in
        # the saved model); one equal to ours rounded keeps the exact Python value for fp64 refills.
        loaded = float(self.scale_t)
        if loaded != float(torch.tensor(self._scale_value, dtype=self.scale_t.dtype)):
            self._scale_value = loaded
        self._note_scale()

    def lower(self, x: torch.Tensor) -> Lowered:
        raise NotImplementedError

    # A class that sets ``eval_is_lora = True`` in its own body says: out of training, lower() is plain
    # LoRA on eager_operands() (A, contiguous Bᵀ, float s). Adapted regions called eagerly without
    # autograd then evaluate it in three ops (lorafx.canonical.eager_lora_linear). Not inherited: a
    # subclass with other math must not get the fast path by accident.
    eval_is_lora: ClassVar[bool] = False

    def eager_operands(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, Bᵀ contiguous, s)`` for an eager evaluation without autograd, or None (see :attr:`eval_is_lora`)."""
        return None

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

    def attach(self, weight: torch.Tensor, force: bool = False) -> None:
        """Called by ``apply`` with the site's base weight ``[d_out, d_in]``, after the adapter is moved
        to the weight's device and the site's train/eval mode, and by ``lorafx.compile`` (``force``)
        while :attr:`needs_attach`; CE-LoRA takes its SVD here."""

    def init_for_embedding(self) -> None:
        """Called by ``apply`` for an embedding site; a variant that initialises embeddings as PEFT
        does (A = 0, B ~ N(0, 1): LoRA) overrides it."""

    needs_attach = False  # an adapter that still needs its base weight before it can be compiled

    def on_step(self) -> None:
        """Called once per optimizer step by :func:`lorafx.step`; stateful variants (CE-LoRA) override."""

    def extra_repr(self) -> str:
        return f"site={self.site!r}, variant={self.config.name!r}, in={self.in_features}, out={self.out_features}"


class _PicksSlot:
    """An adapter name (``str | None``) of :class:`SiteAdapters`, stored in the instance ``__dict__``;
    setting it re-picks the adapter ``forward`` runs (``SiteAdapters._slot``)."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_{name}"

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.key]

    def __set__(self, obj, name: str | None) -> None:
        obj.__dict__[self.key] = name
        obj._update_slot()


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
        self.__dict__["_active"] = None
        self.__dict__["_merged"] = None
        self.__dict__["_slot"] = None
        self.quantized: str | None = None  # kind of quantized base (lorafx.quantized.quantized_kind)
        self.kind = "linear"  # "linear" | "conv" | "embedding" | "mha" | "mha_out" (lorafx.site_kinds), "router" | "expert" (lorafx.moe: site is the expert tensor's FQN)
        self.weight_shape: tuple[int, ...] | None = None  # a conv's kernel shape, which ΔW [d_out, d_in] folds into
        self.weight_name = "weight"  # the site module's weight attribute ("in_proj_weight" for MultiheadAttention)
        self.__dict__["_base"] = None  # bitsandbytes: the module whose own forward computes the base term

    @property
    def base(self) -> nn.Module | None:
        """The quantized module whose own forward is this site's base term (not a registered child:
        its parameters belong to the region, under the base model's own names), or None."""
        return self.__dict__["_base"]

    def set_base(self, module: nn.Module | None) -> None:
        self.__dict__["_base"] = module

    def train(self, mode: bool = True) -> SiteAdapters:
        # The base is not a child, so Module.train would not reach it: bitsandbytes' forward depends on
        # the mode (on AVX512-BF16 CPUs its eval forward repacks the weight for a bf16 kernel).
        super().train(mode)
        if self.__dict__.get("_base") is not None:
            self.__dict__["_base"].train(mode)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.__dict__.get("_base_state_key") is not None and self.__dict__["_base"] is not None:
            from lorafx.quantized import save_base_state

            save_base_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if self.__dict__.get("_base_state_key") is not None and self.__dict__["_base"] is not None:
            from lorafx.quantized import load_base_state

            load_base_state(self, state_dict, prefix, local_metadata, strict, unexpected, errors)

    def weight_in(self, model: nn.Module) -> torch.Tensor:
        """This site's base weight in ``model``: the owner's weight attribute, or the expert tensor itself."""
        if self.kind == "expert":
            return model.get_parameter(self.site)
        return getattr(model.get_submodule(self.site), self.weight_name)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base term ``x Wᵀ + b`` computed by :attr:`base`'s own forward (its dequant-GEMM)."""
        return self.__dict__["_base"].forward(x)

    # torch.compile guards on what ``forward`` reads. Reading the name ``active`` (a str) guards on its
    # value, so every switch recompiled. ``forward`` reads only ``_slot``, the active adapter module
    # kept outside ``_modules`` (no duplicate state_dict keys); Dynamo guards its *type* only and
    # lifts its parameters as graph inputs, so switching between adapters of one variant is free.
    active = _PicksSlot("Name of the active adapter at this site (None: disabled; a tuple: several, summed).")
    merged = _PicksSlot("Name of the adapter folded into the base weight (a tuple: several, summed), or None.")

    def _update_slot(self) -> None:
        if isinstance(self._active, tuple):  # several active adapters (lorafx.several): their sum
            from lorafx.several import SumOfAdapters

            present = {n: self.adapters[n] for n in self._active if n in self.adapters}
            on = self._merged is None and present
            self.__dict__["_slot"] = SumOfAdapters(self.site, present) if on else None
            return
        on = self._active is not None and self._merged is None and self._active in self.adapters
        self.__dict__["_slot"] = self.adapters[self._active] if on else None

    def forward(self, x: torch.Tensor) -> Lowered | None:
        adapter = self._slot
        if adapter is None:  # disabled or merged
            return None
        if self.kind in ("embedding", "mha", "mha_out"):
            # token ids / a module that takes weights: no input dropout (PEFT's lora.Embedding has none;
            # its lora.MultiheadAttention merges the weights before the call)
            return Lowered(x, *adapter.effective_weights())
        return adapter.lower(x)

    def extra_repr(self) -> str:
        quantized = f", quantized={self.quantized!r}" if self.quantized else ""
        return f"site={self.site!r}, active={self.active!r}, merged={self.merged!r}{quantized}"
