"""Plain LoRA (Hu et al. 2021): ``ΔW = s·BA``, ``s = α/r`` (``α/√r`` with rsLoRA).

Initialisation follows PEFT so that checkpoints and tests line up: ``A ~ kaiming_uniform(a=√5)`` on
the ``[r, d_in]`` tensor (= ``U(−1/√d_in, 1/√d_in)``) and ``B = 0``, so the adapted model equals the
base model at step 0.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.config import AdapterConfig, register_variant
from lorafx.seeded_dropout import Dropped, seeded_dropout
from lorafx.variants.checks import check_init, check_rank_alpha_dropout


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass(frozen=True)
class LowRankConfig(AdapterConfig):
    """The fields of every variant built on one trained (A, B) pair: rank, scale numerator, input
    dropout; ``s = alpha / r``. Subclasses add their own fields after these."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        check_rank_alpha_dropout(self)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class LoRAFields(LowRankConfig):
    """Plain LoRA's fields and scale (rsLoRA optional), shared by the variants that add to it (DropLoRA)."""

    rslora: bool = False
    init: Literal["default", "gaussian", "random"] = "default"

    def __post_init__(self):
        super().__post_init__()
        check_init(self)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)


@register_variant
@dataclass(frozen=True)
class LoRA(LoRAFields):
    """Plain LoRA.

    Args:
        r: rank of the update.
        alpha: scale numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``).
        dropout: input dropout on the adapter path only (PEFT's ``lora_dropout``).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``, steadier at large r (Kalajdzievski 2023).
        init: ``"default"`` (PEFT: kaiming A, zero B), ``"gaussian"`` (A ~ N(0, 1/r), zero B), or
            ``"random"`` (both non-zero; for tests and for loading weights over).

    Example:
        >>> import lorafx
        >>> spec = lorafx.Spec(lorafx.LoRA(r=8, alpha=16), targets=["q_proj", "v_proj"])
    """

    name: ClassVar[str] = "lora"
    # no input-dependent part: Aᵉ/Bᵉ fit a conv kernel and an embedding table as they fit a linear
    site_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding", "mha", "mha_out")

    def make_adapter(self, in_features: int, out_features: int, site: str) -> LoRAAdapter:
        return LoRAAdapter(self, in_features, out_features, site)


# The module attributes LoRAAdapter.eager_operands caches from or depends on: assigning any of them drops the cache.
_CACHED_FROM = frozenset({"lora_A", "lora_B", "scale_t", "_parameters", "_buffers", "training"})
# The default process group or None, as torch.distributed.is_initialized() finds it, without its three
# Python frames (itself, GroupMember.WORLD, _World.default_pg): the check runs per site per decode step,
# where they cost 0.3-1.5% of an eager step (benchmark Llama, five processes). A C-level attribute read
# of the object they end at where this torch has it; tests/test_decode_path.py fails if it stops meaning that.
try:
    from torch.distributed import distributed_c10d as _c10d

    _default_group = functools.partial(operator.attrgetter("_default_pg"), _c10d._world)
    _default_group()
except (ImportError, AttributeError):  # a build without torch.distributed, or other internals
    _default_group = (lambda: torch.distributed.GroupMember.WORLD) if torch.distributed.is_available() else lambda: None


def init_lora_pair(A: torch.Tensor, B: torch.Tensor, init: str) -> None:
    """Initialise ``A [r, d_in]`` and ``B [d_out, r]`` in place, as PEFT does for each ``init``."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


class LoRAAdapter(Adapter):
    """``lora_A [r, d_in]``, ``lora_B [d_out, r]``; lowers to (A, B, s) with no gate."""

    eval_is_lora = True

    def __init__(self, config: LoRA, in_features: int, out_features: int, site: str):
        super().__init__(config, in_features, out_features, site)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        init_lora_pair(self.lora_A, self.lora_B, config.init)

    def lower(self, x: torch.Tensor) -> Lowered:
        # Eager decoding runs this once per site per token: the parameters are read from their dict
        # (Module.__getattr__ is a failed attribute lookup first) and the dropout module is called only
        # when it can act; traced calls keep the plain form, so compiled graphs and guards stay as before.
        if torch.compiler.is_compiling():
            return Lowered(self.dropout(x), self.lora_A, self.lora_B, self.scale)
        if not (self.training or torch.is_grad_enabled()):
            A, B, s = self.inference_operands()
            return Lowered(x, A, B, s)
        A, B = self._parameters.get("lora_A"), self._parameters.get("lora_B")
        if A is None or B is None:  # not plain parameters (a parametrization, FSDP's views): ask the module
            A, B = self.lora_A, self.lora_B
        x_in, drop = self.dropped(x)
        return Lowered(x_in, A, B, self.scale_arg(), drop=drop)

    def inference_operands(self) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
        """``(A, B, s)`` for an eager call without autograd.

        ``B [d_out, r]`` is handed on as a view of a contiguous ``Bᵀ [r, d_out]`` copy. The expand is
        ``y += s·h Bᵀ``: with ``Bᵀ`` contiguous an axpy over rows of ``d_out`` floats, with PEFT's
        ``[d_out, r]`` layout a gemv over rows of ``r`` floats. Measured (cold cache, d_out 2816, r 16,
        one token): 14.0 µs vs 29.9 µs per site on one thread, 14.0 vs 41.6 µs on two: the largest
        single cost of an unmerged decode step.
        """
        ops = self.eager_operands()
        if ops is None:
            A, B = self._parameters.get("lora_A"), self._parameters.get("lora_B")
            if A is None or B is None:  # parametrized / FSDP views: ask the module
                return self.lora_A, self.lora_B, self.scale_arg()
            return A, B, self.scale_arg()
        A, Bt, s = ops
        return A, Bt.t(), s

    def eager_operands(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A [r, d_in], Bᵀ [r, d_out] contiguous, s)`` for an eager call without autograd, or None
        in training and where no cached ``Bᵀ`` can be trusted (parametrized or FSDP parameters,
        ``torch.distributed``, inference-mode tensors).

        The copy is a detached cache outside the parameters (training, compiled graphs and files see
        ``B`` itself). A call checks only what can change without passing through this module: ``B``'s
        version counter, storage and object, ``A``'s object, and the scale tensor's version (every other check, run per site
        per decode step, cost ~1% of the step). Everything else drops the cache when it happens: a new
        ``lora_A``/``lora_B``/``scale_t`` (``__setattr__``, ``register_*``, ``del``), a move or cast,
        a state-dict load, every ``train``/``eval`` switch. Writes that bypass the version counter
        (``B.data`` in place, collectives writing into a parameter) would not be seen, so under
        ``torch.distributed`` there is no cache, and ``model.eval()`` after a write through ``.data``
        refreshes it.
        """
        seen = self.__dict__.get("_inference")
        if seen is not None:
            B, t, key, ops = seen
            params = self._parameters  # a write straight into the dict bypasses __setattr__
            if (
                key == (B._version, t._version, B.data_ptr())
                and params.get("lora_B") is B
                and params.get("lora_A") is ops[0]
                and _default_group() is None
            ):
                return ops
        return self._cache_eager_operands()

    def _cache_eager_operands(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        A, B = self._parameters.get("lora_A"), self._parameters.get("lora_B")
        t = self._buffers["scale_t"]
        if (
            self.training or A is None or B is None or _default_group() is not None
        ):  # parametrized / FSDP views, or DDP/FSDP's writes
            return None
        try:
            key = (B._version, t._version, B.data_ptr())
        except RuntimeError:  # inference-mode tensors keep no version counter
            return None
        ops = (A, B.detach().t().contiguous(), self.scale_arg())
        self.__dict__["_inference"] = (B, t, key, ops)
        return ops

    def _drop_eager_operands(self) -> None:
        self.__dict__.pop("_inference", None)

    def __setattr__(self, name, value):
        if name in _CACHED_FROM:
            self._drop_eager_operands()
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in _CACHED_FROM:
            self._drop_eager_operands()
        super().__delattr__(name)

    def register_parameter(self, name, param):
        self._drop_eager_operands()
        super().register_parameter(name, param)

    def register_buffer(self, name, tensor, persistent=True):
        self._drop_eager_operands()
        super().register_buffer(name, tensor, persistent)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_eager_operands()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._drop_eager_operands()  # a move or cast makes new tensors (and a stale copy)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self._drop_eager_operands()
        return super().train(mode)

    def dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, Dropped | None]:
        """``(x_in, record)``: ``x`` after the input dropout. In eager training the mask comes from a seed
        (:mod:`lorafx.seeded_dropout`: the shrink then keeps the seed, not a dropped copy of ``x``);
        traced calls use ``nn.Dropout`` (record None); with no dropout acting, ``(x, None)``."""
        if not self.training:
            return x, None
        if torch.compiler.is_compiling() or not isinstance(self.dropout, nn.Dropout) or self.dropout.p == 0:
            return self.dropout(x), None
        drop = seeded_dropout(x, self.dropout.p)
        return drop.x_in, drop

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    def init_for_embedding(self) -> None:
        # PEFT's lora.Embedding (after loralib): A = 0, B ~ N(0, 1). A zero A also keeps the padding row
        # of the table unchanged for good: its column of A gets no gradient through the lookup.
        if self.config.init == "default":
            with torch.no_grad():
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
