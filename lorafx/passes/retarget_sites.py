"""Pass: point every lorafx site of a region at another site implementation.

A rewritten site is one node ``impl(x, W, b, low)`` whose target is any function registered in
:data:`lorafx.canonical.SITE_IMPLEMENTATIONS` (``"composite"``: the eager evaluator;
``"functional"``: the out-of-place form export traces; ``"ops"``: the ``lorafx::`` op family). This
pass recognises all of them, so lowering to ops, export and inspect agree on what a site is whatever
an earlier pass did.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lorafx.canonical import SITE_IMPLEMENTATIONS, is_site_call
from lorafx.errors import SpecError
from lorafx.passes.insert_adapters import copy_graph_module


def retarget_sites(gm: fx.GraphModule, implementation: str) -> PassResult:
    """A new GraphModule (sharing ``gm``'s submodules and weights) whose site nodes call
    ``implementation``; ``gm`` is not modified. ``modified`` is False when nothing changed."""
    if implementation not in SITE_IMPLEMENTATIONS:
        raise SpecError(f"unknown site implementation {implementation!r}; known: {sorted(SITE_IMPLEMENTATIONS)}")
    target = SITE_IMPLEMENTATIONS[implementation]
    new = copy_graph_module(gm, gm.graph, class_name=type(gm).__name__)
    changed = False
    for node in new.graph.nodes:
        if is_site_call(node) and node.target is not target:
            node.target = target
            changed = True
    new.graph.lint()
    new.recompile()
    return PassResult(new, changed)
