"""Pass: the eager-inference twin of a region's graph, each plain site one call.

A rewritten linear site is two nodes, ``low = lorafx.<key>(x)`` (the container's module call) and
``y = lora_linear(x, W, b, low)``. For eager calls without autograd this pass makes a copy of the
graph in which each such pair is one node, ``y = eager_lora_linear(x, W, b, lorafx.<key>)``: the
container is handed over as a module, not called, and :func:`lorafx.canonical.eager_lora_linear`
picks three ops or the canonical pair per call. The containers are read as ``lorafx._modules[key]``,
one ``Module.__getattr__`` per region call instead of two per site: on the benchmark Llama's decode
step those lookups (cold caches) cost 0.8% of the step (1.011× vs 1.0025× base with the site itself a
plain ``F.linear``, medians of five runs of 150 interleaved steps). The region's own graph (what torch.compile, export,
``lorafx inspect`` and every other pass see) is not touched; :class:`lorafx.adapted_region.AdaptedRegion`
runs the twin only where it is exact.

Only pairs of that exact shape are rewritten: a container output read by another node, a site with
keyword arguments (export's ``inplace=False``), another implementation (kernels, quantized, convolution,
embedding, attention, experts) stays as it is.
"""

from __future__ import annotations

import copy
import operator

from torch import fx

from lorafx.canonical import eager_lora_linear, lora_linear


def eager_sites_graph(graph: fx.Graph, container: str) -> fx.Graph | None:
    """A copy of ``graph`` with every plain ``lora_linear`` site as one ``eager_lora_linear`` node,
    or None when it has no such site (the region then has no eager twin). ``container`` is the
    region's attribute that holds the site containers (:data:`lorafx.adapted_region.CONTAINER`)."""
    new = copy.deepcopy(graph)
    changed = False
    containers = None  # the region's ``lorafx._modules``, read once per call
    for node in list(new.nodes):
        if node.op != "call_function" or node.target is not lora_linear or node.kwargs or len(node.args) != 4:
            continue
        x, weight, bias, low = node.args
        plain = (
            isinstance(low, fx.Node)
            and low.op == "call_module"
            and low.target.startswith(f"{container}.")
            and low.args == (x,)
            and not low.kwargs
            and len(low.users) == 1
        )
        if not plain:
            continue
        with new.inserting_before(node):
            if containers is None:  # before the first site, so before every other site too
                containers = new.get_attr(f"{container}._modules")
            sites = new.call_function(operator.getitem, (containers, low.target.removeprefix(f"{container}.")))
            fast = new.call_function(eager_lora_linear, (x, weight, bias, sites))
        fast.meta.update(node.meta)
        node.replace_all_uses_with(fast)
        new.erase_node(node)
        new.erase_node(low)
        changed = True
    if not changed:
        return None
    new.lint()
    return new
