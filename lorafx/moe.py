"""Mixture-of-experts sites: fused expert tensors and their router.

transformers 5 keeps a MoE layer's experts as 3-D parameters (Mixtral, Qwen2/3-MoE, ...:
``experts.gate_up_proj [E, 2·I, H]``, ``experts.down_proj [E, H, I]``) and calls them through a
grouped GEMM over the tokens each expert was routed; the router (``gate``) is a module of its own
that calls ``F.linear`` with its ``weight [E, H]``. Both are sites (uses of a weight):

* **Expert sites**, one per 3-D tensor, keyed by the parameter's FQN (``...experts.gate_up_proj``).
  LoRA gets one ``(A_e, B_e)`` pair per expert (``A [E, r, d_in]``, ``B [E, d_out, r]``): an expert
  index is an adapter index. The experts module becomes a region whose graph is the grouped form
  (:func:`experts_graph`): tokens sorted by expert, then per projection
  ``y = x W_eᵀ + s·(x A_eᵀ) B_eᵀ`` over each expert's own rows (:func:`expert_linear`, three calls of
  ``lorafx::grouped_linear``), never a dense ΔW. Merge folds ``s·B_e A_e`` into each expert's slice.
* **Router sites**: the router module is a traced region with an ordinary ``F.linear`` site.

Only the layout lorafx reimplements is adapted; the rule (:func:`refusal`) refuses, by name, any
other (biases, transposed or interleaved tensors, a custom gate, expert parallelism) and checks on a
probe batch that the grouped form equals the module's own forward before anything is rewritten.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import torch
from torch import Tensor, fx, nn

from lorafx.adapter import Adapter
from lorafx.canonical import Lowered
from lorafx.kernels.grouped_linear import grouped_linear
from lorafx.variants.lora import init_lora_pair

EXPERTS_SIGNATURE = ("hidden_states", "top_k_index", "top_k_weights")
FUSED = {"gate_up_proj": 2}  # projections fused in one tensor: gate and up (PEFT's w1 + w3)
VARIANTS = ("lora",)  # the variants an expert site takes; the others are refused by name
# The probe compares the grouped form with the module's own forward on E tokens (every expert hit),
# relative to the output's max. Measured on tiny Mixtral/Qwen3-MoE (64 tokens, 5 seeds): 0 against
# transformers' grouped_mm implementation in every dtype; against its eager loop (index_add_ in the
# model dtype, where lorafx sums in fp32) 0 in fp32, 9.4e-4 in fp16, 7.3e-3 in bf16: ~4x headroom.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 4e-3}
PROBE_RTOL_HALF = 3e-2  # bf16 (and any other dtype)


def _opaque(fn):
    """Keep ``fn`` one graph node when a region is traced again (unpickling): its body sorts tokens
    by data, which a symbolic trace cannot follow."""

    def wrapper(*args):
        proxy = next((a for a in args if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", wrapper, args, {})
        return fn(*args)

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


# ---- recognition ---------------------------------------------------------------------------------


def expert_tensors(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Name -> ``(E, d_out, d_in)`` of the 3-D expert tensors of a transformers experts module (its
    forward takes ``hidden_states, top_k_index, top_k_weights``) or of the region lorafx made of one,
    in registration order; empty for any other module."""
    if isinstance(module, fx.GraphModule):  # a region: lorafx's grouped form, or anything else
        if not any(is_expert_call(n) for n in module.graph.nodes):
            return {}
    elif not isinstance(getattr(module, "num_experts", None), int):
        return {}
    else:
        try:
            names = tuple(inspect.signature(module.forward).parameters)[:3]
        except (TypeError, ValueError):
            return {}
        if names != EXPERTS_SIGNATURE:
            return {}
    return {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def router_of(parent: nn.Module, name: str, module: nn.Module) -> bool:
    """True for a router: a child of a MoE block, beside its experts, with a ``weight [E, H]``
    Parameter it multiplies by (not an ``nn.Linear``: those are linear sites already)."""
    if isinstance(module, nn.Linear) or isinstance(module, fx.GraphModule):
        return False
    w = module._parameters.get("weight")
    if w is None or w.dim() != 2:
        return False
    return any(
        c is not module and any(shape[0] == w.shape[0] for shape in expert_tensors(c).values())
        for c in parent.children()
    )


def fused_count(param: str) -> int:
    """How many projections the tensor ``param`` holds fused (``gate_up_proj``: 2), 1 otherwise."""
    return FUSED.get(param, 1)


def all_linear_config(config, param: str):
    """The config ``"all-linear"`` gives expert tensor ``param``: a tensor of k fused projections gets
    rank k·r and alpha k·α, so each projection keeps r and the scale α/r of a separate linear (PEFT
    0.21 does the same for Mixtral and Qwen2/3-MoE: ``rank_pattern`` ``.*\\.gate_up_proj: 2r``)."""
    k = fused_count(param)
    if k == 1 or not hasattr(config, "r") or not hasattr(config, "alpha"):
        return config
    return dataclasses.replace(config, r=config.r * k, alpha=config.alpha * k)


# ---- the rule --------------------------------------------------------------------------------------


def _layout_refusal(module: nn.Module) -> str | None:
    cls = type(module).__name__
    if getattr(module, "has_bias", False):
        return f"{cls} has expert biases; lorafx's grouped form has none"
    if getattr(module, "is_transposed", False):
        return f"{cls} stores its experts transposed ([E, d_in, d_out]); lorafx supports [E, d_out, d_in]"
    if not getattr(module, "is_concatenated", True):
        return f"{cls} interleaves gate and up rows; lorafx supports the concatenated [gate; up] layout"
    if getattr(module, "has_post_expert_norm", False):
        return f"{cls} normalises after each expert; lorafx's grouped form does not"
    if getattr(module, "_is_expert_parallel", False):
        return f"{cls} is expert-parallel (sharded experts); apply lorafx before sharding"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate.__name__ != "_default_apply_gate":
        return f"{cls} has its own gate ({gate.__qualname__}); lorafx applies act(gate) * up"
    if set(expert_tensors(module)) != {"gate_up_proj", "down_proj"} or not isinstance(
        getattr(module, "act_fn", None), nn.Module
    ):
        return f"{cls} is not the gate_up_proj/down_proj/act_fn layout lorafx reimplements"
    return None


def _probe_refusal(module: nn.Module) -> str | None:
    """Run the module's own forward and the grouped form on E tokens that hit every expert."""
    W = module.gate_up_proj
    if W.device.type == "meta":
        return None  # nothing to compare; the layout checks stand alone
    E, k = module.num_experts, min(2, module.num_experts)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(E, W.shape[2], generator=gen).to(device=W.device, dtype=W.dtype)
    idx = ((torch.arange(E)[:, None] + torch.arange(k)[None]) % E).to(W.device)
    weights = torch.softmax(torch.randn(E, k, generator=gen), -1).to(W.device)
    try:
        with torch.no_grad():
            ref = type(module).forward(module, x, idx, weights)  # its own forward, no user hooks
            ours = experts_graph(module)(x, idx, weights)
    except Exception as e:  # the module's own forward or ours cannot run: nothing is adapted
        return f"{type(module).__name__} could not be checked on a probe batch ({type(e).__name__}: {e})"
    rtol = PROBE_RTOL.get(W.dtype, PROBE_RTOL_HALF)
    err = float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
    if not err <= rtol:
        return (
            f"lorafx's grouped form differs from {type(module).__name__}.forward on a probe batch "
            f"(relative error {err:.3g} > {rtol}); its forward is not the gate_up/act/down form"
        )
    return None


def refusal(module: nn.Module, config, probed: dict[int, str | None]) -> str | None:
    """Why an expert tensor of ``module`` cannot be adapted with ``config`` (None: not selected), or
    None; ``probed`` caches the verdict per module (both tensors share it). The probe batch runs only
    for selected tensors: it reads every expert's weights once."""
    if config is not None and config.name not in VARIANTS:
        return (
            f"variant {config.name!r} does not apply to expert tensors (one adapter per expert in a grouped "
            f"GEMM); use {', '.join(VARIANTS)} there, or exclude the experts"
        )
    layout = _layout_refusal(module)
    if layout or config is None:
        return layout
    if id(module) not in probed:
        probed[id(module)] = _probe_refusal(module)
    return probed[id(module)]


# ---- the grouped form --------------------------------------------------------------------------------


@_opaque
def route(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, num_experts: int):
    """Sort the (token, expert) pairs by expert: ``(x [N, H], counts [E], order [N], weights [N])``
    with ``N = tokens·k``; static shapes (counts by ``scatter_add``, not ``bincount``), so
    torch.compile keeps one graph."""
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    return hidden[order // top_k_index.shape[-1]], counts, order, top_k_weights.reshape(-1)[order]


@_opaque
def combine(y: Tensor, order: Tensor, weights: Tensor, hidden: Tensor, k: int) -> Tensor:
    """Weight each expert output by its router weight and sum each token's k outputs, in token order."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    weighted = (y * weights[:, None])[inverse]
    return weighted.view(hidden.shape[0], k, -1).sum(1).to(hidden.dtype)


@_opaque
def expert_linear(x: Tensor, W: Tensor, counts: Tensor, low: Lowered | None = None) -> Tensor:
    """``x W_eᵀ + s·(x_in A_eᵀ) B_eᵀ`` for the rows of each expert ``e`` (``counts[e]`` rows, in
    order): the base term with the expert tensor, then shrink and expand with the stacked adapter."""
    y = grouped_linear(x, W, counts)
    if low is None:
        return y
    h = grouped_linear(low.x.to(low.A.dtype), low.A, counts) * low.scale.to(low.A.dtype)
    return y + grouped_linear(h, low.B, counts).to(y.dtype)


@_opaque
def gate_up(h: Tensor) -> tuple[Tensor, Tensor]:
    """Split a ``gate_up_proj`` output ``[N, 2·I]`` into gate and up (concatenated layout)."""
    gate, up = h.chunk(2, dim=-1)
    return gate, up


def experts_graph(module: nn.Module) -> fx.GraphModule:
    """The experts module as a region in the grouped form (sharing its tensors and ``act_fn``)."""
    g = fx.Graph()
    hidden, idx, weights = (g.placeholder(n) for n in EXPERTS_SIGNATURE)
    routed = g.call_function(route, (hidden, idx, weights, module.num_experts))
    x, counts, order, w = (g.call_function(operator.getitem, (routed, i)) for i in range(4))
    h = g.call_function(expert_linear, (x, g.get_attr("gate_up_proj"), counts))
    split = g.call_function(gate_up, (h,))
    gate, up = g.call_function(operator.getitem, (split, 0)), g.call_function(operator.getitem, (split, 1))
    act = g.call_function(operator.mul, (g.call_module("act_fn", (gate,)), up))
    y = g.call_function(expert_linear, (act, g.get_attr("down_proj"), counts))
    k = g.call_method("size", (idx, -1))
    g.output(g.call_function(combine, (y, order, w, hidden, k)))
    gm = fx.GraphModule(module, g, class_name=type(module).__name__)
    return gm.train(module.training)


def is_expert_call(node: fx.Node) -> bool:
    """True for a graph node that is an expert site (a call of :func:`expert_linear`)."""
    return node.op == "call_function" and node.target is expert_linear


class ExpertLoRAAdapter(Adapter):
    """LoRA on an expert tensor: one pair per expert, ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``,
    each initialised as PEFT initialises a linear's pair (kaiming A over ``d_in``, zero B)."""

    def __init__(self, config, num_experts: int, in_features: int, out_features: int, site: str):
        super().__init__(config, in_features, out_features, site)
        self.num_experts = num_experts
        self.lora_A = nn.Parameter(torch.empty(num_experts, config.r, in_features))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        for e in range(num_experts):
            init_lora_pair(self.lora_A[e], self.lora_B[e], config.init)

    def lower(self, x: Tensor) -> Lowered:
        return Lowered(self.dropout(x), self.lora_A, self.lora_B, self.scale)

    def effective_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.lora_A, self.lora_B, self.scale  # ΔW_e = s·B_e A_e: Adapter.delta_weight batches over e
