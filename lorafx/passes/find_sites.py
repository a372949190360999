"""Find the linear call sites of an fx graph, in the three forms front-ends produce.

* ``call_module`` of an ``nn.Linear`` (or transformers' ``Conv1D``, weight ``[d_in, d_out]``) —
  ``torch.fx.symbolic_trace``;
* ``call_function`` of ``F.linear`` / ``torch._C._nn.linear`` with the weight as a ``get_attr`` or a
  placeholder — Dynamo graphs, and modules that call ``F.linear`` themselves;
* ``call_function`` of ``aten.linear.default`` with ``meta["nn_module_stack"]`` — ``torch.export``.

Convolution and embedding sites (:mod:`lorafx.site_kinds`) are found the same way: ``call_module`` of
an ``nn.Conv1d/2d/3d`` or ``nn.Embedding``, and ``call_function`` of ``F.conv1d/2d/3d`` (``groups=1``)
or ``F.embedding`` (no ``max_norm``) with the weight as a ``get_attr``.

Each site is keyed by the FQN of the module that owns the weight. ``apply`` and ``lorafx inspect``
share this function, so what the CLI shows is exactly what the rewrite does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lorafx import site_kinds
from lorafx.moe import is_expert_call

_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_EMBEDDING_DEFAULTS = {
    "padding_idx": None,
    "max_norm": None,
    "norm_type": 2.0,
    "scale_grad_by_freq": False,
    "sparse": False,
}


@dataclass
class LinearSite:
    """One linear call site. ``fqn`` is relative to the model root (``prefix`` + path in the graph)."""

    node: fx.Node
    fqn: str
    form: str  # "call_module" | "call_function" | "aten"
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False  # weight stored [d_in, d_out] (Conv1D)
    module_type: str = "Linear"
    kind: str = site_kinds.LINEAR  # "linear" | "conv" | "embedding" (lorafx.site_kinds)
    options: tuple = ()  # conv: (stride, padding, dilation, groups); embedding: (padding_idx, scale_grad_by_freq, sparse)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so that lorafx never imports transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_module(module: nn.Module) -> bool:
    """``nn.Linear`` or a transformers ``Conv1D`` (the linears lorafx adapts)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def is_site_module(module: nn.Module) -> bool:
    """A module whose weight lorafx can adapt: a linear (:func:`is_linear_module`), a convolution or an embedding."""
    return is_linear_module(module) or site_kinds.kind_of(module) is not None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _dynamo_path(path: str) -> str:
    """``L['self'].layers[0].mlp`` or ``L__self___layers_0`` -> ``layers.0.mlp`` (best effort)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _owner_from_stack(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _type = list(stack.values())[-1]
    return _dynamo_path(path)


def _weight_shape(gm: fx.GraphModule, w: fx.Node) -> tuple[int, ...] | None:
    if w.op == "get_attr":
        try:
            return tuple(gm.get_parameter(w.target).shape)
        except AttributeError:
            t = getattr(gm, w.target, None)
            return tuple(t.shape) if isinstance(t, torch.Tensor) else None
    val = w.meta.get("val", w.meta.get("example_value"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _function_site(gm: fx.GraphModule, node: fx.Node, prefix: str, form: str) -> LinearSite | None:
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(w, fx.Node):
        return None
    fan_in_fan_out = w.op == "call_method" and w.target == "t" and isinstance(w.args[0], fx.Node)
    if fan_in_fan_out:  # F.linear(x, W.t(), b): a Conv1D-style weight stored [d_in, d_out]
        w = w.args[0]
    shape = _weight_shape(gm, w)
    if shape is None or len(shape) != 2:
        return None
    if fan_in_fan_out:
        shape = shape[::-1]
    if w.op == "get_attr" and w.target.endswith("weight"):
        owner = w.target.rsplit(".", 1)[0] if "." in w.target else ""
    else:
        owner = _owner_from_stack(node)
        if owner is None:
            return None
    return LinearSite(node, _join(prefix, owner), form, shape[1], shape[0], fan_in_fan_out)


def _bound(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    """The call's arguments by name (positional and keyword), defaults filled in."""
    return {**defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs}


def _kind_function_site(gm: fx.GraphModule, node: fx.Node, prefix: str) -> LinearSite | None:
    """``F.convNd(x, W, ...)`` / ``F.embedding(x, W, ...)`` with ``W`` a module's ``get_attr``."""
    conv = node.target in _CONV_FUNCTIONS
    args = _bound(node, *((_CONV_ARGS, _CONV_DEFAULTS) if conv else (_EMBEDDING_ARGS, _EMBEDDING_DEFAULTS)))
    w = args["weight"]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith("weight")):
        return None
    if any(isinstance(a, fx.Node) for k, a in args.items() if k not in ("input", "weight", "bias")):
        return None  # options computed in the graph: not a site lorafx can rewrite (its weight read is refused)
    shape = _weight_shape(gm, w)
    owner = _join(prefix, w.target.rsplit(".", 1)[0] if "." in w.target else "")
    if conv and shape is not None and len(shape) == _CONV_FUNCTIONS[node.target] + 2 and args["groups"] == 1:
        options = (args["stride"], args["padding"], args["dilation"], 1)
        d_in = shape[1] * math.prod(shape[2:])
        return LinearSite(node, owner, "call_function", d_in, shape[0], False, "Conv", site_kinds.CONV, options)
    if not conv and shape is not None and len(shape) == 2 and args["max_norm"] is None:
        options = (args["padding_idx"], args["scale_grad_by_freq"], args["sparse"])
        return LinearSite(
            node, owner, "call_function", shape[0], shape[1], True, "Embedding", site_kinds.EMBEDDING, options
        )
    return None


def _mha_sites(mha: nn.Module, node: fx.Node, fqn: str) -> list[LinearSite]:
    """An ``nn.MultiheadAttention`` call uses two weights: ``in_proj_weight`` [3E, E] (site ``fqn``)
    and ``out_proj.weight`` (site ``fqn.out_proj``, read without calling ``out_proj``)."""
    e = mha.embed_dim
    return [
        LinearSite(node, fqn, node.op, e, 3 * e, False, "MultiheadAttention", site_kinds.MHA),
        LinearSite(node, _join(fqn, "out_proj"), node.op, e, e, False, "Linear", site_kinds.MHA_OUT),
    ]


def _kind_module_site(mod: nn.Module, node: fx.Node, prefix: str) -> LinearSite:
    kind = site_kinds.kind_of(mod)
    d_in, d_out = site_kinds.features(mod)
    fqn = _join(prefix, node.target)
    if kind == site_kinds.CONV:
        return LinearSite(
            node, fqn, "call_module", d_in, d_out, False, type(mod).__name__, kind, site_kinds.conv_options(mod)
        )
    return LinearSite(
        node, fqn, "call_module", d_in, d_out, True, type(mod).__name__, kind, site_kinds.embedding_options(mod)
    )


def find_sites(gm: fx.GraphModule, prefix: str = "") -> list[LinearSite]:
    """Every linear call site of ``gm`` in graph order. ``prefix`` is ``gm``'s FQN inside the model."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Linear):
                sites.append(
                    LinearSite(node, _join(prefix, node.target), "call_module", mod.in_features, mod.out_features)
                )
            elif _is_conv1d(mod):
                d_in, d_out = mod.weight.shape
                sites.append(LinearSite(node, _join(prefix, node.target), "call_module", d_in, d_out, True, "Conv1D"))
            elif isinstance(mod, nn.MultiheadAttention):
                sites += _mha_sites(mod, node, _join(prefix, node.target))
            elif site_kinds.kind_of(mod) is not None:
                sites.append(_kind_module_site(mod, node, prefix))
        elif node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
            site = _function_site(gm, node, prefix, "call_function")
            if site is not None:
                sites.append(site)
        elif node.op == "call_function" and node.target is site_kinds.mha_leaf:  # an MHA that is its own region
            sites += _mha_sites(gm, node, prefix)
        elif node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target is F.embedding):
            site = _kind_function_site(gm, node, prefix)
            if site is not None:
                sites.append(site)
        elif (
            is_expert_call(node) and node.args[1].op == "get_attr"
        ):  # lorafx.moe's grouped form: the site is the expert tensor
            E, d_out, d_in = gm.get_parameter(node.args[1].target).shape
            sites.append(LinearSite(node, _join(prefix, node.args[1].target), "experts", d_in, d_out, False, "Experts"))
        elif node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            site = _function_site(gm, node, prefix, "aten")
            if site is not None:
                sites.append(site)
    return sites
