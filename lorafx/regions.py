"""Front-end for ``apply``: choose and trace the regions of a model that hold matching sites.

A user's model must stay the user's model (a transformers model keeps ``generate``, ``config``,
``save_pretrained``, gradient checkpointing and its Python control flow), so the rewrite works on
regions: the largest submodule that traces *safely* and holds matching sites, down to the single
linear. Measured on transformers 5.23: ``LlamaMLP``, ``GPT2MLP`` and BERT's ``BertSelfOutput`` /
``BertIntermediate`` / ``BertOutput`` trace; every attention block and decoder layer fails, so their
projections become single-linear regions.

"Safely" is stricter than "symbolic_trace does not raise", because tracing bakes Python decisions
into the graph: a region's ``forward`` must take only required positional arguments (an optional
argument tested with ``is None`` would be baked to one branch) and must trace to the same code in
train and eval mode (``F.dropout(..., training=self.training)`` would be baked otherwise).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from lorafx import site_kinds
from lorafx.moe import expert_tensors, experts_graph
from lorafx.passes.find_sites import find_sites, is_site_module
from lorafx.passes.insert_adapters import CARRIED_ATTRS, CONTAINER, has_hooks
from lorafx.saved_modules import SavedModule


@dataclass
class Region:
    """A traced region: ``fqn`` in the model, its graph module, and the site FQNs inside it."""

    fqn: str
    module: nn.Module
    graph_module: fx.GraphModule
    sites: list[str] = field(default_factory=list)
    rewritten: bool = False  # already a lorafx region (a later adapter is being added)


class _Tracer(fx.Tracer):
    """Keeps lorafx regions and transformers' Conv1D opaque, like torch.nn leaf modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_region(m) or is_site_module(m) or isinstance(m, SavedModule) or super().is_leaf_module(m, qualname)


def is_region(module: nn.Module) -> bool:
    """True for a module lorafx has rewritten (it holds a ``lorafx`` container of sites)."""
    return isinstance(module, fx.GraphModule) and isinstance(getattr(module, CONTAINER, None), nn.ModuleDict)


def _simple_signature(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


# torch.fx's tracer patches ``nn.Module.__call__`` process-wide while it traces, so two traces in
# two threads (two ``apply`` calls, a ``load_adapter`` beside an ``apply``) corrupt each other
# ("module is not installed as a submodule"). One lock serialises lorafx's traces. A *forward* of
# the same model in another thread waits too: ``apply`` holds the model's lock
# (lorafx.state.model_lock), as ``using_adapter`` does for a request. A forward of an unrelated
# model in another thread during a trace is not protected (torch.fx's limitation, not lorafx's).
_TRACE_LOCK = threading.Lock()


def _trace(module: nn.Module) -> fx.GraphModule | None:
    """Trace ``module`` if it traces to the same graph in train and eval mode, else None."""
    if not _simple_signature(module):
        return None
    with _TRACE_LOCK:
        return _trace_locked(module)


def _trace_locked(module: nn.Module) -> fx.GraphModule | None:
    was_training = module.training
    codes, graphs = [], []
    try:
        for mode in (True, False):
            module.train(mode)
            graph = _Tracer().trace(module)
            for node in graph.nodes:
                # `from __future__ import annotations` makes a forward's annotations strings; fx keeps
                # them as node types, and pickling the GraphModule then fails ("'str' object has no
                # attribute '__name__'"). A type is documentation only: drop string ones.
                if isinstance(node.type, str):
                    node.type = None
            graphs.append(graph)
            codes.append(graph.python_code("self").src)
    except Exception:  # any failure to trace means "not a region"; its children are tried instead
        return None
    finally:
        module.train(was_training)
    if codes[0] != codes[1]:
        return None
    gm = fx.GraphModule(module, graphs[0], class_name=type(module).__name__)
    gm.train(was_training)
    return gm


def _leaf_graph(module: nn.Module) -> fx.GraphModule:
    """A single linear as its own region: ``F.linear(x, W, b)`` (``Wᵀ`` for Conv1D's [d_in, d_out]);
    a convolution or embedding calls its functional form with the module's options."""
    graph = fx.Graph()
    x = graph.placeholder("input")
    w = graph.get_attr("weight")
    kind = site_kinds.kind_of(module)
    if kind == site_kinds.MHA:
        return _mha_leaf_graph(module)
    if kind == site_kinds.EMBEDDING:
        padding_idx, scale_grad_by_freq, sparse = site_kinds.embedding_options(module)
        graph.output(graph.call_function(F.embedding, (x, w, padding_idx, None, 2.0, scale_grad_by_freq, sparse)))
        return fx.GraphModule(module, graph, class_name=type(module).__name__)
    if kind == site_kinds.CONV:
        b = graph.get_attr("bias") if module.bias is not None else None
        conv = (F.conv1d, F.conv2d, F.conv3d)[module.weight.dim() - 3]
        graph.output(graph.call_function(conv, (x, w, b, *site_kinds.conv_options(module))))
        return fx.GraphModule(module, graph, class_name=type(module).__name__)
    if not isinstance(module, nn.Linear):
        w = graph.call_method("t", (w,))
    b = graph.get_attr("bias") if getattr(module, "bias", None) is not None else None
    graph.output(graph.call_function(F.linear, (x, w, b)))
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _mha_leaf_graph(module: nn.Module) -> fx.GraphModule:
    """An ``nn.MultiheadAttention`` as its own region: its forward's signature and one
    :func:`~lorafx.site_kinds.mha_leaf` call; the region keeps every parameter and child under the
    module's own names, and the plain attributes ``nn.TransformerEncoderLayer`` reads (``batch_first``, ...)."""
    graph = fx.Graph()
    params = list(inspect.signature(nn.MultiheadAttention.forward).parameters.values())[1:]
    nodes = [graph.placeholder(p.name, default_value=p.default) for p in params]
    graph.output(
        graph.call_function(
            site_kinds.mha_leaf, tuple(nodes[:3]), {p.name: n for p, n in zip(params[3:], nodes[3:], strict=True)}
        )
    )
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm._parameters.update(module._parameters)
    gm._modules.update(module._modules)
    for name in CARRIED_ATTRS:
        setattr(gm, name, getattr(module, name))
    return gm


def _contains(prefix: str, fqn: str) -> bool:
    return prefix == "" or fqn == prefix or fqn.startswith(prefix + ".")


def plan_regions(model: nn.Module, sites: list[str]) -> list[Region]:
    """Regions covering ``sites`` (FQNs of linear modules): existing lorafx regions first, else the
    largest safely traceable module, else recurse into children."""
    regions: list[Region] = []

    def local(prefix: str, fqn: str) -> str:
        return fqn[len(prefix) + 1 :] if prefix else fqn

    def visit(prefix: str, module: nn.Module, pending: list[str]) -> None:
        if not pending:
            return
        if is_region(module):
            regions.append(Region(prefix, module, module, [local(prefix, s) for s in pending], True))
            return
        wanted = [local(prefix, s) if s != prefix else "" for s in pending]
        if expert_tensors(module):  # a MoE experts module: its region is the grouped form (lorafx.moe)
            regions.append(Region(prefix, module, experts_graph(module), wanted))
            return
        if is_site_module(module) and not is_region(module):
            if prefix in pending:  # a MultiheadAttention's region holds its out_proj site too
                regions.append(Region(prefix, module, _leaf_graph(module), [""] + [w for w in wanted if w]))
            return
        # A submodule with hooks would lose them inside a region (traced through, or its call
        # rewritten): such a module is not a region, its children are tried (the hooked module itself
        # becomes a region that carries its hooks over).
        hooked = any(has_hooks(m) for m in list(module.modules())[1:])
        # A module holding experts is never traced whole: tracing would bake their routing.
        experts = any(expert_tensors(m) and not is_region(m) for m in module.modules())
        gm = None if hooked or experts else _trace(module)
        if gm is not None and set(wanted) <= {s.fqn for s in find_sites(gm)}:
            regions.append(Region(prefix, module, gm, wanted))
            return
        for name, child in module.named_children():
            child_fqn = f"{prefix}.{name}" if prefix else name
            visit(child_fqn, child, [s for s in pending if _contains(child_fqn, s)])

    visit("", model, list(sites))
    return regions
