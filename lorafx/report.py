"""What ``apply(model, spec)`` would do, site by site, without touching the model.

:func:`build_report` is the library side of ``lorafx inspect``: it runs the same planning and
building code as :func:`lorafx.apply` (``select_sites``, ``plan_regions``/``find_sites``,
``prepare``), so the numbers are those of the real rewrite, for every variant, with no per-variant
code here. Variant-specific numbers come from the adapters ``prepare`` built:

* **rank** is ``R``, the row count of the lowered ``Aᵉ`` (``r`` for LoRA, ``N·r`` for MoR, ``d·r``
  for CapaBoost);
* **params** are the adapter's parameters (shared modules such as Uni-LoRA's vector are listed
  separately and counted once in the totals, exactly as ``apply`` makes them trainable);
* **bytes** are the adapter's ``state_dict`` (parameters and buffers), what an adapter file holds;
* **FLOPs per token** are the matmul FLOPs of lowering one site and evaluating the canonical form
  ``s·((x Aᵉᵀ) ⊙ g) Bᵉᵀ`` out of place, counted by ``torch.utils.flop_counter`` at 1 and 2 tokens:
  the difference is the per-token cost, the rest is a per-call cost (``flops_fixed``). Elementwise
  work (gate, scale) is not counted, as FLOP counters usually do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lorafx.adapter import Adapter
from lorafx.apply import linear_modules, linear_shape, prepare, select_sites
from lorafx.passes.find_sites import find_sites
from lorafx.regions import plan_regions
from lorafx.spec import Spec


@dataclass
class SiteRow:
    """One linear call site of the model; the adapter columns are None where the spec does not match."""

    fqn: str
    module_type: str  # "Linear" | "Conv1D"
    form: str  # IR form in its traced region: "call_module" | "call_function" | "aten"
    in_features: int
    out_features: int
    region: str | None  # FQN of the region the site is rewritten in ("" = the whole model)
    rule: str | None = None  # the spec rule that selected it, e.g. "target 'q_proj'"
    override: str | None = None  # override pattern that chose its config
    variant: str | None = None
    rank: int | None = None  # R of the lowered Aᵉ [R, d_in]
    params: int = 0
    bytes: int = 0
    flops_per_token: int = 0
    flops_fixed: int = 0
    mergeable: bool | None = None
    fusable: bool | None = None
    gated: bool | None = None

    @property
    def matched(self) -> bool:
        return self.rule is not None


@dataclass
class RegionRow:
    """A traced region that ``apply`` replaces by its rewritten GraphModule."""

    fqn: str  # "" = the whole model
    module_type: str
    sites: list[str]
    kind: str  # "whole model" | "submodule" | "single linear"


@dataclass
class SharedRow:
    """A model-level shared module (``model.lorafx_shared.<key>``), e.g. Uni-LoRA's one vector."""

    key: str
    params: int
    bytes: int


@dataclass
class Report:
    """Everything ``lorafx inspect`` shows; :meth:`to_dict` is its ``--format json``."""

    model: str
    spec: Spec
    sites: list[SiteRow]
    regions: list[RegionRow]
    shared: list[SharedRow]
    base_params: int
    base_bytes: int
    base_flops_per_token: int  # 2·d_in·d_out summed over every linear site (attention scores excluded)
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict, repr=False)  # region FQN -> rewritten

    @property
    def matched(self) -> list[SiteRow]:
        return [s for s in self.sites if s.matched]

    def totals(self) -> dict[str, Any]:
        """Totals over matched sites plus shared modules, and their ratios to the base model."""
        params = sum(s.params for s in self.sites) + sum(s.params for s in self.shared)
        nbytes = sum(s.bytes for s in self.sites) + sum(s.bytes for s in self.shared)
        flops = sum(s.flops_per_token for s in self.sites)
        return {
            "sites": len(self.sites),
            "matched": len(self.matched),
            "regions": len(self.regions),
            "trainable_params": params,
            "bytes": nbytes,
            "flops_per_token": flops,
            "params_ratio": params / max(self.base_params, 1),
            "bytes_ratio": nbytes / max(self.base_bytes, 1),
            "flops_ratio": flops / max(self.base_flops_per_token, 1),
            "mergeable": all(s.mergeable for s in self.matched),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, spec, sites (with ``matched``), regions, shared, base and totals."""
        return {
            "model": self.model,
            "spec": self.spec.to_dict(),
            "sites": [{**dataclasses.asdict(s), "matched": s.matched} for s in self.sites],
            "regions": [dataclasses.asdict(r) for r in self.regions],
            "shared": [dataclasses.asdict(s) for s in self.shared],
            "base": {
                "params": self.base_params,
                "bytes": self.base_bytes,
                "flops_per_token": self.base_flops_per_token,
            },
            "totals": self.totals(),
        }

    def find_graph(self, name: str) -> tuple[str, fx.GraphModule]:
        """The rewritten region named ``name``, or the one holding site ``name``; KeyError otherwise."""
        key = "" if name in ("", ".", "model") else name
        if key in self.graphs:
            return key, self.graphs[key]
        for site in self.matched:
            if (site.fqn == name or site.fqn.endswith("." + name)) and site.region in self.graphs:
                return site.region, self.graphs[site.region]
        raise KeyError(name)


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _count_flops(adapter: Adapter, tokens: int, like: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: not at `import lorafx` time

    x = torch.zeros(
        tokens, adapter.in_features, dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        low = adapter.lower(x)
        h = F.linear(low.x.to(low.A.dtype), low.A)
        if low.gate is not None:
            h = h * low.gate
        F.linear(h, low.B)
    return counter.get_total_flops()


def _describe_adapter(row: SiteRow, adapter: Adapter, weight: torch.Tensor) -> None:
    """Fill the variant columns of ``row`` from the built adapter (generic over variants)."""
    was_training = adapter.training
    adapter.eval()  # inference form: no dropout masks; gates that remain are input-dependent
    try:
        with torch.no_grad():
            low = adapter.lower(torch.zeros(1, adapter.in_features, dtype=adapter_dtype(adapter), device=weight.device))
        one, two = _count_flops(adapter, 1, weight), _count_flops(adapter, 2, weight)
    finally:
        adapter.train(was_training)
    cfg = adapter.config
    row.variant = cfg.name
    row.rank = int(low.A.shape[0])
    row.gated = low.gate is not None
    row.params = sum(p.numel() for p in adapter.parameters())
    row.bytes = _state_bytes(adapter)
    row.flops_per_token = two - one
    row.flops_fixed = one - (two - one)
    row.mergeable = bool(cfg.mergeable())
    fusable = getattr(cfg, "fusable", None)
    # Fusable = one lora_linear launch computes the site: any gate and scale fit the fused kernel; a
    # replaced base term (CE-LoRA's custom backward) needs its own op unless the variant says otherwise.
    row.fusable = bool(fusable()) if callable(fusable) else low.base is None


def adapter_dtype(adapter: Adapter) -> torch.dtype:
    p = next(adapter.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _forms(model: nn.Module, fqns: list[str]) -> tuple[dict[str, str], dict[str, str], list[RegionRow]]:
    """Site FQN -> IR form and -> region FQN, and the regions, as ``plan_regions`` plans them."""
    forms, where, rows = {}, {}, []
    if not fqns:
        return forms, where, rows
    for region in plan_regions(model, fqns):
        sites = {s.fqn: s for s in find_sites(region.graph_module, region.fqn)}
        full = [f"{region.fqn}.{s}".strip(".") if s else region.fqn for s in region.sites]
        for fqn in full:
            forms[fqn] = sites[fqn].form if fqn in sites else "call_function"
            where[fqn] = region.fqn
        kind = "whole model" if region.fqn == "" else "single linear" if full == [region.fqn] else "submodule"
        rows.append(RegionRow(region.fqn, type(region.module).__name__, full, kind))
    return forms, where, rows


def build_report(model: nn.Module, spec: Spec, name: str = "default") -> Report:
    """Plan and build ``apply(model, spec, name)`` off the model and describe every linear site.

    Raises the same :class:`lorafx.SpecError` as ``apply`` when the spec does not fit (a target that
    matches nothing names the closest linear names). ``model`` is not modified.

    Example:
        >>> report = lorafx.build_report(model, lorafx.Spec(lorafx.LoRA(r=8), targets=["q_proj", "v_proj"]))
        >>> report.totals()["trainable_params"]
    """
    linears = linear_modules(model)
    selected = select_sites(model, spec)
    prep = prepare(model, spec, name)
    all_forms, _, _ = _forms(model, [f for f in linears if f not in selected])
    forms, where, regions = _forms(model, list(selected))
    all_forms.update(forms)
    rows = []
    for fqn, module in linears.items():
        d_in, d_out, fan_in_fan_out = linear_shape(module)
        row = SiteRow(
            fqn,
            "Conv1D" if fan_in_fan_out else "Linear",
            all_forms.get(fqn, "call_module"),
            d_in,
            d_out,
            where.get(fqn),
        )
        if fqn in selected:
            row.rule = selected[fqn]
            row.override = spec.config_for(fqn)[1]
            _describe_adapter(row, prep.adapters[fqn], module.weight)
        rows.append(row)
    shared = [SharedRow(k, sum(p.numel() for p in m.parameters()), _state_bytes(m)) for k, m in prep.shared.items()]
    params = list(model.parameters())
    base_flops = sum(2 * r.in_features * r.out_features for r in rows)
    return Report(
        model=type(model).__name__,
        spec=spec,
        sites=rows,
        regions=regions,
        shared=shared,
        base_params=sum(p.numel() for p in params),
        base_bytes=sum(p.numel() * p.element_size() for p in params),
        base_flops_per_token=base_flops,
        graphs=dict(prep.new_regions),
    )
