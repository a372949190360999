"""What ``apply(model, spec)`` would do, site by site, without touching the model.

:func:`build_report` is the library side of ``lorafx inspect``: it describes the one
:class:`~lorafx.plan.Plan` that ``apply`` would build and commit (``prepare``: plan, then build),
and never plans or traces again, so the numbers are those of the real rewrite, for every variant,
with no per-variant code here. Variant-specific numbers come from the adapters ``prepare`` built:

* **rank** is ``R``, the row count of the lowered ``Aᵉ`` (``r`` for LoRA, ``N·r`` for MoR, ``d·r``
  for CapaBoost);
* **params** are the adapter's parameters (shared modules such as Uni-LoRA's vector are listed
  separately and counted once in the totals, exactly as ``apply`` makes them trainable);
* **bytes** are the adapter's ``state_dict`` (parameters and buffers), what an adapter file holds;
* **FLOPs per token** are the matmul FLOPs of lowering one site and evaluating it with the one
  canonical evaluator the graph calls (:func:`lorafx.canonical.adapter_flops`), counted by
  ``torch.utils.flop_counter`` at 1 and 2 tokens: the difference is the per-token cost, the rest is a
  per-call cost (``flops_fixed``). Elementwise work (gate, scale) is not counted, as FLOP counters
  usually do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lorafx import site_kinds
from lorafx.adapter import Adapter
from lorafx.apply import prepare
from lorafx.canonical import adapter_flops
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
    refused: str | None = None  # why lorafx cannot adapt this site ("all-linear" skips it)
    tied_to: str | None = None  # the site whose adapter this one shares (one weight, several users)
    quantized: str | None = None  # kind of quantized base ("bnb-nf4", ...; lorafx.quantized), None = dense

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


def _describe_adapter(row: SiteRow, adapter: Adapter, weight: torch.Tensor) -> None:
    """Fill the variant columns of ``row`` from the built adapter (generic over variants)."""
    was_training = adapter.training
    adapter.eval()  # inference form: no dropout masks; gates that remain are input-dependent
    lower = adapter.lower
    try:
        with torch.no_grad():
            low = lower(torch.zeros(1, adapter.in_features, dtype=adapter_dtype(adapter), device=weight.device))
            if low.A.dim() == 3:  # an expert tensor (lorafx.moe): one expert's pair, per routed (token, expert)

                def lower(x, own=adapter.lower):
                    full = own(x)
                    return full._replace(A=full.A[0], B=full.B[0])

                low = lower(low.x)
        # only the base weight's shape matters (its FLOPs are subtracted): a stride-0 stand-in, no copy
        w = low.x.new_zeros((), dtype=low.A.dtype).expand(adapter.out_features, adapter.in_features)
        one, two = (adapter_flops(lower, low.x.new_zeros(n, adapter.in_features), w) for n in (1, 2))
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
    row.fusable = row.fusable and lower is adapter.lower  # expert tensors run lorafx::grouped_linear, not the fused op


def adapter_dtype(adapter: Adapter) -> torch.dtype:
    p = next(adapter.parameters(), None)
    return p.dtype if p is not None else torch.float32


def build_report(model: nn.Module, spec: Spec, name: str = "default") -> Report:
    """Plan and build ``apply(model, spec, name)`` off the model and describe every linear site.

    Raises the same :class:`lorafx.SpecError` as ``apply`` when the spec does not fit (a target that
    matches nothing names the closest linear names). ``model`` is not modified.

    Example:
        >>> report = lorafx.build_report(model, lorafx.Spec(lorafx.LoRA(r=8), targets=["q_proj", "v_proj"]))
        >>> report.totals()["trainable_params"]
    """
    prep = prepare(model, spec, name)
    plan = prep.plan
    rows = []
    for fqn, site in plan.sites.items():
        row = SiteRow(fqn, site.module_type, site.form, site.in_features, site.out_features, site.region)
        row.refused, row.tied_to, row.quantized = site.refused, site.tied_to, site.quantized
        if site.selected:
            row.rule, row.override = site.rule, site.override
            _describe_adapter(row, prep.adapters[site.tied_to or fqn], site.weight)
            if site.tied_to is not None:  # runs its leader's adapter (FLOPs); params counted once, there
                row.params = row.bytes = 0
            if site.kind == site_kinds.EMBEDDING:  # the shrink is a lookup (x Aᵀ of one-hot x): no matmul
                row.flops_per_token -= 2 * row.rank * site.in_features
        rows.append(row)
    regions = []
    for region in plan.regions:
        full = [f"{region.fqn}.{s}".strip(".") if s else region.fqn for s in region.sites]
        kind = "whole model" if region.fqn == "" else "single linear" if full == [region.fqn] else "submodule"
        regions.append(RegionRow(region.fqn, type(region.module).__name__, full, kind))
    shared = [SharedRow(k, sum(p.numel() for p in m.parameters()), _state_bytes(m)) for k, m in prep.shared.items()]
    params = list(model.parameters())
    # a convolution counts per output position (d_in = C_in·∏k); an embedding lookup has no matmul
    lookups = {fqn for fqn, site in plan.sites.items() if site.kind == site_kinds.EMBEDDING}
    base_flops = sum(2 * r.in_features * r.out_features for r in rows if r.fqn not in lookups)
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
