"""The site rule: every use of a weight is adapted correctly, or the site is refused by name.

A linear module is a *candidate*; whether lorafx can adapt it depends on how the model uses its
weight. :func:`apply_rules` decides, once, in the plan, for every candidate:

* **Module behaviour.** An ``nn.Linear`` subclass with its own ``forward`` (a scaled linear, a QAT
  fake-quant linear) would lose it when its call becomes ``F.linear(x, W, b) + adapter``: refused.
* **Quantized bases** (:mod:`lorafx.quantized`) are *quantized sites*, not refused: bitsandbytes'
  ``Linear4bit``/``Linear8bitLt`` keep their own forward for the base term (the packed weight cannot
  go to ``F.linear``), torchao weight-only tensors go through ``F.linear``'s subclass dispatch.
  ``site.quantized`` names the kind; ``lorafx.merge`` refuses them (``merge_dequantized`` is the
  path). CE-LoRA needs the dense W (its SVD and backward): refused on a quantized base. A parametrized weight (``weight_norm``, ``spectral_norm``,
  ``orthogonal``) is computed on every read, so merge could not write into it: refused, with the fix.
  A weight that is not a registered Parameter (old-style hook ``weight_norm``): refused.
* **Weights read without a call.** ``nn.MultiheadAttention`` hands ``out_proj.weight`` to
  ``F.multi_head_attention_forward`` and never calls ``out_proj``: an adapter there alone would never
  run. Refused, unless the MultiheadAttention itself is adapted (a site of kind ``"mha"``, which
  selects its ``out_proj`` too and runs both adapters in its call: :func:`lorafx.site_kinds.lora_mha`). Likewise any parent whose ``forward`` computes with ``self.<child>.weight``
  (:func:`direct_read`, read from the parent's source; a traced parent is checked on its graph in
  :mod:`lorafx.plan`). ``nn.TransformerEncoderLayer``'s eval fast path reads ``linear1``/``linear2`` weights
  directly: those sites are adapted and the layer's fast path is turned off (``slow_path``: the
  commit registers a no-op forward pre-hook, one of the conditions PyTorch documents for leaving it).
* **MoE expert tensors** (:mod:`lorafx.moe`): adapted when the experts module has the layout lorafx
  reimplements and its own forward equals the grouped form on a probe batch; LoRA only.
* **Shared weights** (found by storage, :mod:`lorafx.weights`). When every holder of a weight is a
  selected linear site with the same config, they share one adapter (``tied_to``): every use
  computes ``W + ΔW`` and merge writes ΔW once. Otherwise (tied embeddings, a holder the spec does
  not select) the site is refused with the fix: select every holder, or ``lorafx.untie`` first. An
  embedding and a linear sharing one weight (tied ``embed_tokens``/``lm_head``) are refused together:
  one adapter cannot be both a lookup's ``ΔE`` and the head's ``ΔW`` layout (untie, or adapt one only).
* **Convolutions and embeddings** (:mod:`lorafx.site_kinds`): a subclass with its own forward, a
  grouped convolution, a non-zero ``padding_mode`` or an embedding with ``max_norm`` is refused
  (:func:`lorafx.site_kinds.kind_refusal`); a variant whose lowering depends on the input (MoR's
  router, DropLoRA's per-token mask, CE-LoRA's SVD backward of a 2-D W) is refused at these sites by
  name (its config's ``site_kinds``).

"all-linear" silently skips refused sites (``lorafx inspect`` lists them with the reason); a target
that names one is a :class:`~lorafx.errors.SpecError` with the reason.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn
from torch.nn.utils import parametrize

from lorafx import moe, site_kinds
from lorafx.config import variant_class, variant_names
from lorafx.quantized import needs_own_forward, quantized_kind
from lorafx.regions import is_region
from lorafx.weights import other_users, weight_users

# Modules whose own forward reads a child linear's weight without calling the child.
_DIRECT_READERS = (nn.MultiheadAttention,)
# Modules with an eval fast path that reads child linear weights directly; any forward pre-hook on
# the module turns the fast path off (PyTorch checks `_forward_pre_hooks` of every submodule).
_FAST_PATH_LAYERS = (nn.TransformerEncoderLayer,)


def _behaviour_refusal(module: nn.Module) -> str | None:
    if needs_own_forward(module):
        return None  # a quantized site: the rewrite keeps calling its forward for the base term
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return (
            f"{type(module).__name__} has its own forward (an nn.Linear subclass); lorafx would replace it "
            "by F.linear and lose what it does"
        )
    if parametrize.is_parametrized(module, "weight"):
        return (
            "its weight is parametrized (weight_norm/spectral_norm/orthogonal), so merge could not write it; "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') first"
        )
    if "weight" not in module._parameters:
        return "its weight is not a registered Parameter (an old-style weight_norm hook computes it)"
    return None


_COMPUTE = ("linear(", "matmul(", "mm(", "einsum(", "@")


@functools.cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # built-in or generated code: nothing to read
        return ""


def direct_read(parent: nn.Module, leaf: str) -> str | None:
    """The line of ``type(parent).forward`` that computes with ``self.<leaf>.weight`` without calling
    ``self.<leaf>`` (``F.linear(x, self.proj.weight)``, ``x @ self.proj.weight.T``), or None.

    Reads that only look at the weight (``self.wo.weight.dtype``, ``isinstance(self.wo.weight, ...)``,
    as T5 does) are not computations and are not reported."""
    source = _forward_source(type(parent))
    for m in re.finditer(rf"self\.{re.escape(leaf)}\.weight\b(?!\s*\.\s*(?!T\b)\w)", source):
        line = source[source.rfind("\n", 0, m.start()) + 1 : source.find("\n", m.end())]
        if any(op in line for op in _COMPUTE):
            return line.strip()
    return None


def stray_weight_reads(gm, site_nodes: set, locals_: list[str]) -> dict[str, str]:
    """In a traced region: local site -> the first node that uses its weight other than through a
    linear call (``x @ self.proj.weight.T`` traced inline). Its adapter would not run there."""
    stray = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.target.endswith(".weight"):
            continue
        local = node.target[: -len(".weight")]
        if local not in locals_:
            continue
        for user in node.users:
            through_t = user.op == "call_method" and user.target == "t" and set(user.users) <= site_nodes
            if user not in site_nodes and not through_t:
                stray.setdefault(local, user.format_node())
    return stray


def _parent(fqn: str, modules: dict[str, nn.Module]) -> tuple[str, nn.Module | None]:
    name = fqn.rpartition(".")[0]
    return name, modules.get(name)


def apply_rules(model: nn.Module, sites: dict) -> None:
    """Set ``refused``, ``tied_to`` and ``slow_path`` on every :class:`~lorafx.plan.Site` in place."""
    modules = dict(model.named_modules())
    probed: dict[int, str | None] = {}  # experts module -> its layout/probe refusal (one probe per module)
    for fqn, site in sites.items():
        if is_region(site.module):
            continue  # a lorafx region: its rules were applied when it was made
        if site.param is not None:  # an expert tensor (lorafx.moe)
            site.refused = moe.refusal(site.module, site.config, probed)
            continue
        site.refused = _behaviour_refusal(site.module)
        if site.kind not in (site_kinds.LINEAR, site_kinds.MHA_OUT):
            site.refused = site_kinds.kind_refusal(site.module) or _variant_refusal(site)
        elif site.kind == site_kinds.MHA_OUT:
            site.refused = site.refused or _variant_refusal(site)
        site.quantized = quantized_kind(site.module)
        if site.quantized and site.refused is None and site.selected and site.config.name == "celora":
            site.refused = f"CE-LoRA needs the dense base weight (SVD, exact backward); this base is {site.quantized}"
        parent_fqn, parent = _parent(fqn, modules)
        mha = sites.get(parent_fqn) if site.kind == site_kinds.MHA_OUT else None
        if mha is not None and mha.kind == site_kinds.MHA and mha.selected and mha.refused is None:
            pass  # adapted together with its MultiheadAttention, whose call runs it (lorafx.site_kinds.lora_mha)
        elif site.refused is None and (isinstance(parent, _DIRECT_READERS) or site.kind == site_kinds.MHA_OUT):
            site.refused = (
                f"{type(parent).__name__} {parent_fqn!r} reads this weight directly (F.multi_head_attention_forward) "
                "and never calls the module, so an adapter here would never run"
            )
        if isinstance(parent, _FAST_PATH_LAYERS):
            site.slow_path = parent_fqn
        elif site.refused is None and parent is not None and not is_region(parent):
            line = direct_read(parent, fqn.rpartition(".")[2])
            if line:
                site.refused = (
                    f"{type(parent).__name__}.forward computes with its weight without calling the module "
                    f"({line!r}), so an adapter here would not run there"
                )
    _share_or_refuse(model, sites)


def _variant_refusal(site) -> str | None:
    if not site.selected or site.kind in getattr(site.config, "site_kinds", (site_kinds.LINEAR,)):
        return None
    fit = [n for n in variant_names() if site.kind in variant_class(n).site_kinds]
    return (
        f"variant {site.config.name!r} does not carry over to {site.kind} sites (its adapter depends on the "
        f"input per token or on a 2-D weight); variants that do: {', '.join(fit)}"
    )


def _share_or_refuse(model: nn.Module, sites: dict) -> None:
    users = weight_users(model)
    for fqn, site in sites.items():
        if not site.selected or site.refused or site.tied_to:
            continue
        others = other_users(users, site.weight, site.weight_fqn)
        if not others:
            continue
        holders = [u.rpartition(".")[0] for u in others]
        partners = [h for h in holders if h in sites and sites[h].selected and not sites[h].refused]
        missing = [u for u, h in zip(others, holders, strict=True) if h not in partners or not u.endswith(".weight")]
        differ = [h for h in partners if sites[h].config != site.config]
        kinds = [h for h in partners if sites[h].kind != site.kind]
        if kinds:
            site.refused = (
                f"its weight is shared with {others} (tied) as a {site.kind} and a {sites[kinds[0]].kind} site; one "
                f"adapter cannot fit both layouts. Adapt one use only after lorafx.untie(model, [{fqn!r}])"
            )
            continue
        if missing or differ:
            fix = f"select {missing} too" if missing else f"give {differ} the same config"
            site.refused = (
                f"its weight is shared with {others} (tied); adapting one use would change the others at merge. "
                f"Adapt every use ({fix}) or give this site its own copy: lorafx.untie(model, [{fqn!r}])"
            )
            continue
        for h in partners:  # one adapter for every use of the weight, named after the first holder
            sites[h].tied_to = fqn
