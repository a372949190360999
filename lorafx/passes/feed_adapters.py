"""Pass: make every adapted site of a region read its adapter from fed tensors (ONNX export).

In a rewritten region a site is two nodes::

    low = call_module lorafx.<key>(x)           # SiteAdapters: the live adapter, lowered
    y   = call_function <impl>(x, W, b, low)    # any site implementation

On a *copy* of the region this pass points each ``low`` node at a :class:`FedSite` (under the
container ``lorafx_fed``) that returns ``lowered_for(site_adapters, x)`` — the adapter computed from
tensors the export wrapper feeds as graph inputs — and each site node at the ``"functional"``
implementation (out of place, fed fp32 operands cast to the activation dtype, per-row stacks), which
exports to standard ONNX operators whatever the site called before (composite, ``lorafx::`` ops).
The live region and its :class:`~lorafx.adapter.SiteAdapters` are never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lorafx.adapter import Lowered, SiteAdapters
from lorafx.canonical import SITE_IMPLEMENTATIONS
from lorafx.errors import TraceError
from lorafx.passes.insert_adapters import CONTAINER
from lorafx.passes.retarget_sites import retarget_sites
from lorafx.site_kinds import is_kind_site_call

FED = "lorafx_fed"  # container of FedSite modules in the copy (the live ``lorafx`` container stays as is)

LoweredFor = Callable[[SiteAdapters, torch.Tensor], Lowered | None]


class FedSite(nn.Module):
    """Stands where a site's :class:`SiteAdapters` was called: ``forward(x) = lowered_for(sa, x)``."""

    def __init__(self, site_adapters: SiteAdapters, lowered_for: LoweredFor):
        super().__init__()
        # Kept out of ``_modules``: registered here too, every adapter parameter would appear under a
        # second name in state_dict (the copy still holds the live ``lorafx`` container).
        self.__dict__["site_adapters"] = site_adapters
        self.lowered_for = lowered_for

    def forward(self, x: torch.Tensor) -> Lowered | None:
        return self.lowered_for(self.site_adapters, x)

    def extra_repr(self) -> str:
        return f"site={self.site_adapters.site!r}"


def _is_container_call(node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(node.target, str) and node.target.startswith(CONTAINER + ".")


def feed_adapters(gm: fx.GraphModule, lowered_for: LoweredFor) -> PassResult:
    """A copy of region ``gm`` (sharing its weights and adapters) whose sites are fed (see the module
    docstring); ``gm`` is not modified. ``modified`` is False when the region has no site.

    A site node is recognised both by its registered target (:func:`lorafx.canonical.is_site_call`,
    through :func:`~lorafx.passes.retarget_sites.retarget_sites`) and by taking a container call as
    its ``low`` argument, so a site retargeted to a function not (yet) in the registry is fed too.
    """
    new = retarget_sites(gm, "functional").graph_module
    functional = SITE_IMPLEMENTATIONS["functional"]
    fed = nn.ModuleDict()
    for node in [n for n in new.graph.nodes if _is_container_call(n)]:
        key = node.target[len(CONTAINER) + 1 :]
        sa = gm.get_submodule(node.target)  # the container may be a ModuleDict or, in a copy, a plain Module
        if not isinstance(sa, SiteAdapters):
            raise TraceError(f"{node.target} in region {type(gm).__name__} is a {type(sa).__name__}, not SiteAdapters")
        fed[key] = FedSite(sa, lowered_for)
        node.target = f"{FED}.{key}"
        for user in node.users:
            if is_kind_site_call(user):  # conv / embedding evaluators are already out of place and cast
                continue
            if user.op != "call_function" or len(user.args) != 4 or user.args[3] is not node:
                raise TraceError(f"site {sa.site!r}: its adapter feeds {user.format_node()}, not a site call")
            user.target = functional
    new.add_submodule(FED, fed)
    new.graph.lint()
    new.recompile()
    return PassResult(new, len(fed) > 0)
