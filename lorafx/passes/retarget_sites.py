"""Pass: point every lorafx site of a region at another site implementation.

A rewritten site is one node ``impl(x, W, b, low)`` whose target is any function registered in
:data:`lorafx.canonical.SITE_IMPLEMENTATIONS` (``"composite"``: the eager evaluator;
``"functional"``: the out-of-place form export traces; ``"ops"``: the ``lorafx::`` op family). This
pass recognises all of them, so lowering to ops, export and inspect agree on what a site is whatever
an earlier pass did. Quantized sites (``impl(x, sites, low)``, :data:`lorafx.canonical.QUANTIZED_SITE_IMPLEMENTATIONS`)
are retargeted to the quantized implementation of the same name when there is one (``"composite"``,
``"ops"``) and left alone otherwise (``"functional"``: export dequantizes them first).
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lorafx.canonical import QUANTIZED_SITE_IMPLEMENTATIONS, SITE_IMPLEMENTATIONS, is_quantized_site_call, is_site_call
from lorafx.errors import SpecError
from lorafx.passes.insert_adapters import copy_graph_module


def retarget_sites(gm: fx.GraphModule, implementation: str) -> PassResult:
    """A new GraphModule (sharing ``gm``'s submodules and weights) whose site nodes call
    ``implementation``; ``gm`` is not modified. ``modified`` is False when nothing changed."""
    if implementation not in SITE_IMPLEMENTATIONS:
        raise SpecError(f"unknown site implementation {implementation!r}; known: {sorted(SITE_IMPLEMENTATIONS)}")
    new = copy_graph_module(gm, gm.graph, class_name=type(gm).__name__)
    changed = False
    for node in new.graph.nodes:
        target = site_target(node, implementation)
        if target is not None and node.target is not target:
            node.target = target
            changed = True
    new.graph.lint()
    new.recompile()
    return PassResult(new, changed)


def site_target(node: fx.Node, implementation: str):
    """The function site ``node`` calls under ``implementation``, or None when ``node`` is not a site
    (or is a quantized site with no implementation of that name)."""
    if is_site_call(node):
        return SITE_IMPLEMENTATIONS[implementation]
    if is_quantized_site_call(node):
        return QUANTIZED_SITE_IMPLEMENTATIONS.get(implementation)
    return None
