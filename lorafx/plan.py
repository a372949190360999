"""``plan(model, spec) -> Plan``: decide, once, what ``apply`` will rewrite.

A :class:`Plan` lists every linear call site of the model (a *use* of a weight, found by
:func:`lorafx.passes.find_sites.find_sites` in the traced regions), which of them the spec selects,
with which config and override, and the regions (traced graph modules) that hold them. ``apply``
builds and commits a plan; ``build_report`` / ``lorafx inspect`` describe one and never trace again;
``from_peft`` reads the selection from one. Planning never changes the model.

Cost, measured on a tiny Llama with targets ``q_proj,up_proj``: one walk over the modules and one
``plan_regions`` (each candidate module traced twice, train and eval); before this file, ``apply``
selected twice and ``build_report`` planned regions three times (27 traces).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafx import moe, saved_modules, site_kinds, site_rules
from lorafx.adapter import SiteAdapters
from lorafx.config import AdapterConfig
from lorafx.errors import SpecError
from lorafx.passes.find_sites import find_sites, is_linear_module
from lorafx.passes.insert_adapters import CONTAINER
from lorafx.regions import Region, is_region, plan_regions
from lorafx.spec import Spec


@dataclass
class Site:
    """One linear call site of the model, selected or not."""

    fqn: str  # FQN of the module that owns the weight
    module: nn.Module  # the module (or the lorafx region that already replaced it)
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # weight stored [d_in, d_out] (transformers Conv1D)
    module_type: str  # "Linear" | "Conv1D"
    form: str = "call_module"  # IR form in its traced region: "call_module" | "call_function" | "aten"
    region: str | None = None  # FQN of the region it is rewritten in ("" = the whole model); None = not selected
    rule: str | None = None  # the spec rule that selects it, e.g. "target 'q_proj'"
    config: AdapterConfig | None = None
    override: str | None = None  # override pattern that chose the config
    refused: str | None = None  # why lorafx cannot adapt this site (never offered by "all-linear")
    tied_to: str | None = None  # the selected site whose adapter this one shares (one weight, two users)
    slow_path: str | None = None  # FQN of a TransformerEncoderLayer whose fast path must be turned off
    quantized: str | None = None  # kind of quantized base (lorafx.quantized.quantized_kind), None = dense
    kind: str = site_kinds.LINEAR  # "linear" | "conv" | "embedding" | "mha" | "mha_out" (lorafx.site_kinds)
    param: str | None = None  # expert site (lorafx.moe): the 3-D tensor's name; fqn is its parameter FQN
    num_experts: int | None = None  # expert sites: E of the [E, d_out, d_in] tensor

    @property
    def selected(self) -> bool:
        return self.rule is not None

    @property
    def weight_name(self) -> str:
        """The module attribute holding the weight (``in_proj_weight`` for a MultiheadAttention)."""
        return "in_proj_weight" if self.kind == site_kinds.MHA else "weight"

    @property
    def weight(self):
        """The base weight as stored (``[d_out, d_in]``, ``[d_in, d_out]`` for Conv1D, ``[E, d_out, d_in]``
        for an expert tensor)."""
        return getattr(self.module, self.param) if self.param else getattr(self.module, self.weight_name)

    @property
    def weight_fqn(self) -> str:
        """The FQN of the base weight's parameter."""
        return self.fqn if self.param else f"{self.fqn}.{self.weight_name}"

    @property
    def adapter_kind(self) -> str:
        """What the site's :class:`SiteAdapters` records as its ``kind``: ``"expert"`` and ``"router"``
        (lorafx.moe), else the site kind (lorafx.site_kinds)."""
        return "expert" if self.param else "router" if self.module_type == "Router" else self.kind


@dataclass
class Plan:
    """What ``apply(model, spec, name)`` does, decided once (see the module docstring)."""

    model: nn.Module
    spec: Spec
    name: str
    sites: dict[str, Site]  # every linear site, in model order
    regions: list[Region] = field(default_factory=list)  # regions holding the selected sites
    saved: dict[str, nn.Module] = field(default_factory=dict)  # modules_to_save: FQN -> module (lorafx.saved_modules)

    @property
    def selected(self) -> dict[str, Site]:
        """The selected sites, in model order."""
        return {fqn: s for fqn, s in self.sites.items() if s.selected}

    @property
    def refused(self) -> dict[str, str]:
        """Site FQN -> why it cannot be adapted, for every such linear module of the model."""
        return {fqn: s.refused for fqn, s in self.sites.items() if s.refused}


def leaf_region_adapters(module: nn.Module) -> SiteAdapters | None:
    """The :class:`SiteAdapters` of a single linear that lorafx already rewrote into its own region."""
    container = getattr(module, CONTAINER, None)
    if is_region(module) and isinstance(container, nn.ModuleDict) and "self" in container:
        return container["self"]
    return None


def linear_sites(model: nn.Module) -> dict[str, Site]:
    """FQN -> :class:`Site` for every linear module (``nn.Linear``, Conv1D, or one already rewritten),
    MoE router and expert tensor (:mod:`lorafx.moe`)."""
    sites = {}
    parents = dict(model.named_modules())
    for fqn, m in model.named_modules():
        sa = leaf_region_adapters(m)
        for name, (e, d_out, d_in) in moe.expert_tensors(m).items():
            key = f"{fqn}.{name}".strip(".")
            sites[key] = Site(key, m, d_in, d_out, False, "Experts", param=name, num_experts=e)
        if sa is not None:
            kind = (
                "Router"
                if sa.kind == "router"
                else {site_kinds.CONV: "Conv", site_kinds.EMBEDDING: "Embedding"}.get(sa.kind)
            )
            kind = kind or ("Conv1D" if sa.fan_in_fan_out else "Linear")
            sites[fqn] = Site(fqn, m, sa.in_features, sa.out_features, sa.fan_in_fan_out, kind, quantized=sa.quantized)
            if sa.kind not in ("router", "expert"):  # lorafx.moe's kinds are linear sites of their own
                sites[fqn].kind = sa.kind
        elif isinstance(m, nn.Linear):
            sites[fqn] = Site(fqn, m, m.in_features, m.out_features, False, "Linear")
            parent = parents.get(fqn.rpartition(".")[0])
            is_mha = (
                isinstance(parent, nn.MultiheadAttention) or getattr(leaf_region_adapters(parent), "kind", "") == "mha"
            )
            if fqn.endswith("out_proj") and is_mha:
                sites[fqn].kind = site_kinds.MHA_OUT
        elif is_linear_module(m):
            d_in, d_out = m.weight.shape  # Conv1D stores [d_in, d_out]
            sites[fqn] = Site(fqn, m, int(d_in), int(d_out), True, "Conv1D")
        elif site_kinds.kind_of(m) is not None:  # a convolution or an embedding (lorafx.site_kinds)
            kind = site_kinds.kind_of(m)
            d_in, d_out = site_kinds.features(m)
            sites[fqn] = Site(fqn, m, d_in, d_out, kind == site_kinds.EMBEDDING, type(m).__name__, kind=kind)
        else:
            for name, child in m.named_children():
                if moe.router_of(m, name, child):
                    key = f"{fqn}.{name}".strip(".")
                    d_out, d_in = child.weight.shape
                    sites[key] = Site(key, child, int(d_in), int(d_out), False, "Router")
    return sites


def _wrapper_kinds() -> dict[type, str]:
    """Module wrappers that own the user's model: apply must see the model itself."""
    kinds: dict[type, str] = {nn.DataParallel: "module"}
    try:
        from torch._dynamo.eval_frame import OptimizedModule

        kinds[OptimizedModule] = "_orig_mod"
    except ImportError:  # pragma: no cover - torch without Dynamo
        pass
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        kinds.update({DistributedDataParallel: "module", FullyShardedDataParallel: "module", FSDPModule: ""})
    return kinds


def refuse_wrapped(model: nn.Module) -> None:
    """A wrapped model (torch.compile, DDP, DataParallel, FSDP) is refused: DDP and FSDP register
    the parameters they see at construction (adapter gradients would not be synchronised, ranks
    drift apart: 2.9e-3 after a few steps), torch.compile has traced the old graph, and every site
    name would carry the wrapper's prefix (``_orig_mod.``, ``module.``)."""
    for cls, inner in _wrapper_kinds().items():
        if isinstance(model, cls):
            where = f"model.{inner}" if inner else "the model before fully_shard"
            raise SpecError(
                f"apply() got a model wrapped in {cls.__name__}; apply lorafx to the model itself ({where}) "
                "and wrap it afterwards"
            )


def output_head(model: nn.Module) -> str | None:
    """FQN of the output head (``get_output_embeddings()``), which ``"all-linear"`` skips as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((fqn for fqn, m in model.named_modules() if m is head), None)


def select(model: nn.Module, spec: Spec, sites: dict[str, Site]) -> dict[str, nn.Module]:
    """Mark the sites ``spec`` selects (rule, config, override), in place, applying the site rules of
    :mod:`lorafx.site_rules`; return the modules it saves whole (``modules_to_save``). Raises
    :class:`SpecError` naming the target entries or overrides that match nothing, and the sites a
    target names that cannot be adapted (with the reason)."""
    head = output_head(model)
    saved = saved_modules.plan_saved(model, spec)
    for fqn, site in sites.items():
        site.rule = spec.match(fqn, is_output_head=fqn == head)
        holder = saved_modules.covered(fqn, saved)
        if holder and site.rule == "all-linear":  # a saved module is trained whole, never adapted inside
            site.rule = None
        elif holder and site.rule:
            raise SpecError(
                f"site {fqn!r} is inside {holder!r}, which modules_to_save trains whole; target one or the other"
            )
        if site.rule == "all-linear" and site.kind != site_kinds.LINEAR:
            site.rule = None  # PEFT's "all-linear" too: nn.Linear and Conv1D only, never a conv or an embedding
        if site.rule is not None:
            site.config, site.override = spec.config_for(fqn)
            if site.param and site.rule == "all-linear" and site.override is None:
                site.config = moe.all_linear_config(site.config, site.param)
    for fqn, site in sites.items():  # PEFT adapts a MultiheadAttention's in_proj and out_proj together
        out = sites.get(f"{fqn}.out_proj")
        if site.kind == site_kinds.MHA and site.selected and out is not None and not out.selected:
            out.rule, out.config, out.override = f"with its MultiheadAttention {fqn!r}", site.config, site.override
    site_rules.apply_rules(model, sites)
    named = {fqn: s.refused for fqn, s in sites.items() if s.selected and s.refused and s.rule != "all-linear"}
    if named:
        listed = "; ".join(f"{fqn!r}: {why}" for fqn, why in list(named.items())[:4])
        raise SpecError(f"spec selects site(s) lorafx cannot adapt: {listed}{' ...' if len(named) > 4 else ''}")
    for site in sites.values():
        if site.refused:  # "all-linear" offers only sites that can be adapted
            site.rule = site.config = site.override = None
    chosen = [fqn for fqn, s in sites.items() if s.selected]
    names = list(sites)
    if not chosen:
        raise SpecError(
            f"spec targets {_describe(spec.targets)} match no linear site of {type(model).__name__}{_closest(spec, names)}"
        )
    unused = spec.unused_patterns(chosen)
    if unused:
        raise SpecError(f"spec entries {unused} match no selected linear site{_closest(spec, names, unused)}")
    dead = spec.dead_entries(names, {fqn: sites[fqn].override for fqn in chosen})
    if dead:
        raise SpecError(f"spec entries that would do nothing: {'; '.join(dead)}{_closest(spec, names, [])}")
    return saved


def plan(model: nn.Module, spec: Spec, name: str = "default") -> Plan:
    """Plan ``apply(model, spec, name)`` without changing ``model``.

    Raises :class:`SpecError` when the spec is not a :class:`Spec` or selects nothing (naming the
    closest linear names).
    """
    if not isinstance(spec, Spec):
        raise SpecError(f"apply() takes a lorafx.Spec, got {type(spec).__name__}")
    refuse_wrapped(model)
    sites = linear_sites(model)
    saved = select(model, spec, sites)
    regions = plan_regions(model, [fqn for fqn, s in sites.items() if s.selected])
    for region in regions:
        found = find_sites(region.graph_module, region.fqn)
        if not region.rewritten:
            stray = site_rules.stray_weight_reads(region.graph_module, {s.node for s in found}, region.sites)
            if stray:
                local, node = next(iter(stray.items()))
                fqn = f"{region.fqn}.{local}".strip(".")
                raise SpecError(
                    f"site {fqn!r}: the traced region {region.fqn!r} uses its weight outside a linear call "
                    f"({node}), where an adapter would not run; exclude the site"
                )
        forms = {s.fqn: s.form for s in found}
        for fqn, form in forms.items():  # every site traced in the region, selected or not
            if fqn in sites:
                sites[fqn].form = form
        for local in region.sites:
            fqn = f"{region.fqn}.{local}".strip(".") if local else region.fqn
            sites[fqn].region = region.fqn
            if fqn not in forms:  # a region lorafx made earlier: the site is its lora_linear call
                sites[fqn].form = "call_function"
    lost = [fqn for fqn, s in sites.items() if s.selected and s.region is None]
    if lost:  # e.g. a router whose forward does not trace: never a silent no-op
        raise SpecError(f"sites {lost[:4]} are selected but no traceable region holds their weight's call")
    return Plan(model, spec, name, sites, regions, saved)


def _describe(targets) -> str:
    return repr(targets if isinstance(targets, str) else list(targets))


def _closest(spec: Spec, names: list[str], entries: list[str] | None = None) -> str:
    if entries is None:
        entries = [spec.targets] if isinstance(spec.targets, str) else list(spec.targets)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    hints = []
    for entry in entries:
        leaf = entry.rsplit(".", 1)[-1]
        if leaf in leaves:  # e.g. an override for v_proj while targets select q_proj only
            hints.append(f"{entry!r} names linear sites that the targets/exclude do not select")
            continue
        close = difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.5)
        if close:
            hints.append(f"{entry!r} -> did you mean {close}?")
    listed = ", ".join(leaves[:12]) + (" ..." if len(leaves) > 12 else "")
    return f" ({'; '.join(hints) + '; ' if hints else ''}linear names in the model: {listed or 'none'})"
