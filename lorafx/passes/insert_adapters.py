"""Rewrite linear call sites into the canonical adapter subgraph.

Each selected site ``y = linear(x, W, b)`` becomes::

    low = call_module lorafx.<key>(x)                 # SiteAdapters: the active adapter, lowered
    y   = call_function lora_linear(x, W, b, low)     # x Wᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ

A bitsandbytes site (packed weight, :mod:`lorafx.quantized`) becomes
``y = quantized_lora_linear(x, lorafx.<key>, low)``: its base term is the module's own forward.

The adapters live in the graph module under ``lorafx`` (a ``ModuleDict``), so ``parameters()``,
``state_dict()``, ``.to()`` and DDP see them, and switching the active adapter changes no graph.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lorafx import site_kinds
from lorafx.adapted_region import CONTAINER, AdaptedRegion
from lorafx.adapter import SiteAdapters
from lorafx.canonical import lora_linear, quantized_lora_linear
from lorafx.errors import TraceError
from lorafx.moe import expert_linear
from lorafx.passes.find_sites import LinearSite, find_sites


def site_key(local_fqn: str) -> str:
    """ModuleDict key of a site inside its region (``""`` is the region itself)."""
    return local_fqn.replace(".", "__") if local_fqn else "self"


# Forward and backward hooks of a module lorafx replaces by a rewritten GraphModule. The dicts are
# carried over as the same objects, so the user's RemovableHandles still remove them and they fire in
# the same order, now around the adapted computation.
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


# Plain attributes of a MultiheadAttention region (lorafx.regions), carried to every copy:
# nn.TransformerEncoderLayer reads them from its self_attn (batch_first, num_heads, ...) before it
# decides on its fast path.
CARRIED_ATTRS = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim")


def has_hooks(module: nn.Module) -> bool:
    """True when ``module`` has any forward or backward hook of its own."""
    return any(getattr(module, d, None) for d in HOOK_DICTS)


def carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the hooks of ``source`` (the same dicts; see :data:`HOOK_DICTS`)."""
    for d in HOOK_DICTS:
        if hasattr(source, d):
            setattr(target, d, getattr(source, d))
    if hasattr(source, "_is_full_backward_hook"):
        target._is_full_backward_hook = source._is_full_backward_hook


def copy_graph_module(gm: fx.GraphModule | nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A new region (:class:`~lorafx.adapted_region.AdaptedRegion`) over a copy of ``graph`` with ``gm``'s module tree: the same children,
    parameters and buffers (shared, never copied), training flag, hooks and lorafx state record.

    ``fx.GraphModule(gm, graph)`` alone copies only what the graph references, rebuilding the path to
    each as plain modules: a region's ``lorafx`` ModuleDict became a bare Module holding only the
    called sites, and its training flags were reset.
    """
    new_graph = fx.Graph()
    out = new_graph.graph_copy(graph, {})
    new_graph.output(out)
    new = AdaptedRegion(gm, new_graph, class_name=class_name)
    new._modules.update(gm._modules)
    new._parameters.update(gm._parameters)
    new._buffers.update(gm._buffers)
    new._non_persistent_buffers_set |= gm._non_persistent_buffers_set
    new.training = gm.training
    for name in CARRIED_ATTRS:
        if name in gm.__dict__:
            new.__dict__[name] = gm.__dict__[name]
    carry_hooks(gm, new)
    if "_lorafx" in gm.__dict__:  # a whole-model region carries the model's adapter state (lorafx.state)
        new.__dict__["_lorafx"] = gm.__dict__["_lorafx"]
    return new


def _operands(gm: fx.GraphModule, site: LinearSite) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(x, weight [d_out, d_in], bias) nodes for ``site``; inserts get_attr nodes for module forms."""
    node = site.node
    if site.form == "call_module":
        mod = gm.get_submodule(node.target)
        w = gm.graph.get_attr(f"{node.target}.weight")
        if site.fan_in_fan_out:
            w = gm.graph.call_method("t", (w,))
        b = gm.graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
        return node.args[0], w, b
    x = node.args[0]
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, b


def _kind_site(gm: fx.GraphModule, site: LinearSite, low: fx.Node) -> fx.Node:
    """The evaluator call of a convolution or embedding site (:mod:`lorafx.site_kinds`)."""
    node = site.node
    if site.form == "call_module":
        mod = gm.get_submodule(node.target)
        x, w = node.args[0], gm.graph.get_attr(f"{node.target}.weight")
        b = gm.graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
    else:
        x = node.args[0] if node.args else node.kwargs["input"]
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if site.kind == site_kinds.EMBEDDING:
        return gm.graph.call_function(site_kinds.lora_embedding, (x, w, low, site.options))
    return gm.graph.call_function(site_kinds.lora_conv, (x, w, b, low, site.options))


def _mha_site(gm: fx.GraphModule, site: LinearSite, local: str, sites: Mapping[str, SiteAdapters]) -> fx.Node:
    """``lora_mha(sites, low_in, low_out, *call args)`` for a MultiheadAttention call (module or leaf)."""
    node = site.node
    query = node.args[0] if node.args else node.kwargs["query"]
    key = site_key(local)
    low_in = gm.graph.call_module(f"{CONTAINER}.{key}", (query,))
    out = f"{local}.out_proj" if local else "out_proj"
    low_out = gm.graph.call_module(f"{CONTAINER}.{site_key(out)}", (query,)) if out in sites else None
    sa = gm.graph.get_attr(f"{CONTAINER}.{key}")
    return gm.graph.call_function(site_kinds.lora_mha, (sa, low_in, low_out, *node.args), dict(node.kwargs))


def insert_adapters(gm: fx.GraphModule, sites: Mapping[str, SiteAdapters], prefix: str = "") -> PassResult:
    """Return a new GraphModule in which every call of every site named in ``sites`` calls ``lora_linear``.

    Args:
        gm: the traced region; it is not modified (the result shares its weights).
        sites: local site FQN (relative to ``gm``) -> the :class:`SiteAdapters` to install there.
        prefix: ``gm``'s FQN in the model, to report sites by their full names.
    """
    new = copy_graph_module(gm, gm.graph, class_name=type(gm).__name__)
    container = nn.ModuleDict(dict(getattr(gm, CONTAINER, {}) or {}))
    found: dict[str, list[LinearSite]] = {}
    for s in find_sites(new):  # a module (or weight) used twice in the region is two call sites
        found.setdefault(s.fqn, []).append(s)
    missing = sorted(set(sites) - set(found))
    if missing:
        raise TraceError(
            f"no linear call site for {[f'{prefix}.{m}'.strip('.') for m in missing]} in the traced region {prefix!r}"
        )
    for local, adapters in sites.items():
        container[site_key(local)] = adapters
    new.add_submodule(CONTAINER, container)
    for local, adapters in sites.items():
        key = site_key(local)
        for site in found[local]:  # every call gets the adapter: the same SiteAdapters, lowered per call
            with new.graph.inserting_before(site.node):
                if site.kind == site_kinds.MHA_OUT:
                    continue  # rewritten with its MultiheadAttention's call (the same node)
                if site.form == "experts":  # lorafx.moe: the grouped form takes the stacked adapter
                    x, w, counts = site.node.args[:3]
                    low = new.graph.call_module(f"{CONTAINER}.{key}", (x,))
                    y = new.graph.call_function(expert_linear, (x, w, counts, low))
                elif site.kind == site_kinds.MHA:
                    y = _mha_site(new, site, local, sites)
                elif site.kind != site_kinds.LINEAR:
                    x = site.node.args[0] if site.node.args else site.node.kwargs["input"]
                    low = new.graph.call_module(f"{CONTAINER}.{key}", (x,))
                    y = _kind_site(new, site, low)
                elif adapters.base is not None:  # quantized (bitsandbytes): the base is the module's forward
                    x = site.node.args[0]
                    sites_node = new.graph.get_attr(f"{CONTAINER}.{key}")
                    low = new.graph.call_module(f"{CONTAINER}.{key}", (x,))
                    y = new.graph.call_function(quantized_lora_linear, (x, sites_node, low))
                else:
                    x, w, b = _operands(new, site)
                    low = new.graph.call_module(f"{CONTAINER}.{key}", (x,))
                    y = new.graph.call_function(lora_linear, (x, w, b, low))
            y.meta.update(site.node.meta)
            site.node.replace_all_uses_with(y)
            operands = [a for a in site.node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            new.graph.erase_node(site.node)
            for a in operands:  # a quantized site's unused packed-weight reads
                if not a.users:
                    new.graph.erase_node(a)
    new.graph.lint()
    new.recompile()
    return PassResult(new, bool(sites))
