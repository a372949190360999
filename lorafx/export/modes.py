"""The three export modes as data: what each feeds, how it rewrites regions, what it writes.

* :class:`Merged` — the active (or named) adapter folded into W for the trace; no fed tensors.
* :class:`Unmerged` — one adapter's tensors are graph inputs named ``<site>.<key>``.
* :class:`Multi` — K adapters stacked on a leading axis plus ``adapter_ids [batch]``; each row
  gathers its adapter (ONNX Gather) and the sites run per-row batched matmuls.

Every mode traces *copies* of the model's rewritten regions whose sites call the ``"functional"``
implementation (:mod:`lorafx.passes.retarget_sites`, :mod:`lorafx.passes.feed_adapters`), so what
the live sites call (composite, ``lorafx::`` ops) does not matter and the live regions are not
modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from torch import fx, nn

from lorafx import state
from lorafx.adapter import Lowered, SiteAdapters
from lorafx.errors import ExportError, NotMergeableError, SpecError
from lorafx.export.layout import SiteLayout, build_layout, make_feed, model_feed_tensors, write_export_adapter
from lorafx.export.tensors import SCALE, lower_from
from lorafx.merge import merge, merge_dequantized, unmerge
from lorafx.passes.dequantize_sites import dequantize_sites
from lorafx.passes.feed_adapters import feed_adapters
from lorafx.passes.retarget_sites import retarget_sites
from lorafx.state import iter_sites, set_adapter

IDS = "adapter_ids"
MODEL_FILE = "model.onnx"


class Mode:
    """One export mode of ``model``; subclasses say what is fed (:attr:`fed_names`, :meth:`example`),
    how a region copy is rewritten (:meth:`rewrite`) and what is written beside the graph."""

    name: ClassVar[str]

    def __init__(self, model: nn.Module):
        self.model = model
        self.fed_names: list[str] = []  # graph inputs after the model's own, in order
        self.fed_batched: list[bool] = []  # per fed input: is axis 0 the batch?
        self.layout: list[SiteLayout] = []
        self.feed: dict[str, torch.Tensor] = {}  # fed name -> tensor, filled by the wrapper while it runs

    def example(self, batch: int) -> list[torch.Tensor]:
        """Example tensors for :attr:`fed_names`."""
        return []

    def rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        """The copy of region ``gm`` that is traced in its place."""
        return retarget_sites(dequantize_sites(gm).graph_module, "functional").graph_module

    def folded(self) -> contextlib.AbstractContextManager:
        """What the model must be for the trace (merged mode: merged); restored on exit."""
        return contextlib.nullcontext()

    def write_adapters(self, directory: Path) -> None:
        """Files written beside the graph (unmerged and multi: each adapter's feed tensors)."""

    def extra(self) -> dict:
        """Mode-specific manifest entries."""
        return {}

    def manifest(self, inputs_meta: list[dict], outputs: list[str]) -> dict:
        """The ``lorafx_export.json`` manifest of this export."""
        return {
            "format": "lorafx.onnx",
            "format_version": 1,
            "mode": self.name,
            "model": MODEL_FILE,
            "inputs": inputs_meta,
            "outputs": outputs,
            "sites": [sl.to_dict() for sl in self.layout],
            **self.extra(),
        }


class Merged(Mode):
    """The adapter folded into the base weights: a plain graph any server runs."""

    name = "merged"

    def __init__(self, model: nn.Module, adapters: list[str] | None = None, rank: int | None = None):
        super().__init__(model)
        data = state.find(model)
        self.adapter = data.active if data is not None else None
        if adapters:
            if len(adapters) != 1:
                raise ExportError(f"merged mode folds one adapter, got {adapters}")
            self.adapter = adapters[0]

    @contextlib.contextmanager
    def folded(self) -> Iterator[None]:
        """Fold the adapter into W for the block; restore weights and activity exactly."""
        model, name = self.model, self.adapter
        if name is None or any(sa.merged for sa in iter_sites(model).values()):
            yield  # a plain model, or one the user merged already: export as it is
            return
        previous = state.get(model).active
        set_adapter(model, name)
        try:
            if any(sa.quantized for sa in iter_sites(model).values()):
                merge_dequantized(model)  # a quantized base is exported dense: dequant(Wq) + ΔW
            else:
                merge(model, keep_original=True)
            try:
                yield
            finally:
                unmerge(model)
        except NotMergeableError as e:
            raise NotMergeableError(
                f"cannot export adapter {name!r} merged: {e}. Use mode='unmerged' or 'multi'"
            ) from None
        finally:
            set_adapter(model, previous)

    def extra(self) -> dict:
        return {"merged_adapter": self.adapter}


class Fed(Mode):
    """Base of the modes whose adapters are graph inputs (the ``feed``), laid out by :attr:`layout`."""

    def __init__(self, model: nn.Module, adapters: list[str] | None = None, rank: int | None = None):
        super().__init__(model)
        data = state.get(model)
        if any(sa.merged for sa in iter_sites(model).values()):
            raise ExportError(f"mode {self.name!r} needs the adapters unmerged; call lorafx.unmerge(model) first")
        names = list(adapters) if adapters else _active_first(data)
        if not names:
            raise SpecError(f"mode {self.name!r} exports adapters, and this model has none")
        for n in names:
            state.require(model, n)
        self.adapters, self.specs = names, {n: data.specs[n] for n in names}
        self.layout = build_layout(model, names, rank)
        self.by_site = {sl.site: sl for sl in self.layout}
        self.fed_names = [sl.name(k) for sl in self.layout for k in sl.shapes]
        self.fed_batched = [False] * len(self.fed_names)
        self.feeds = {n: make_feed(self.layout, model_feed_tensors(model, n), f"adapter {n!r}") for n in names}

    def rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        return feed_adapters(dequantize_sites(gm).graph_module, self.lowered_for).graph_module

    def lowered_for(self, sa: SiteAdapters, x: torch.Tensor) -> Lowered | None:
        """Site ``sa``'s adapter computed from the fed tensors (None: a site no exported adapter has)."""
        sl = self.by_site.get(sa.site)
        return None if sl is None else self.lower(sl, x)

    def lower(self, sl: SiteLayout, x: torch.Tensor) -> Lowered:
        raise NotImplementedError

    def write_adapters(self, directory: Path) -> None:
        for n in self.adapters:
            tensors = model_feed_tensors(self.model, n)
            write_export_adapter(directory / "adapters" / n, n, tensors, {"spec": self.specs[n].to_dict()})

    def extra(self) -> dict:
        return {"adapters": {n: f"adapters/{n}" for n in self.adapters}}


class Unmerged(Fed):
    """One adapter's tensors as graph inputs; any adapter that fits the layout is fed at serving time."""

    name = "unmerged"

    def example(self, batch: int) -> list[torch.Tensor]:
        return [self.feeds[self.adapters[0]][f] for f in self.fed_names]

    def lower(self, sl: SiteLayout, x: torch.Tensor) -> Lowered:
        t = {k: self.feed[sl.name(k)] for k in sl.shapes}
        return lower_from(sl.template, x, t)._replace(scale=t.get(SCALE, 1.0))  # no scale: it is in B


class Multi(Fed):
    """K adapters stacked on a leading axis and ``adapter_ids`` choosing one per row."""

    name = "multi"

    def __init__(self, model: nn.Module, adapters: list[str] | None = None, rank: int | None = None):
        super().__init__(model, adapters, rank)
        self.fed_names.append(IDS)
        self.fed_batched.append(True)

    def example(self, batch: int) -> list[torch.Tensor]:
        stacked = [torch.stack([self.feeds[n][f] for n in self.adapters]) for f in self.fed_names[:-1]]
        return [*stacked, torch.arange(batch) % len(self.adapters)]

    def lower(self, sl: SiteLayout, x: torch.Tensor) -> Lowered:
        ids = self.feed[IDS]
        rows = {k: self.feed[sl.name(k)].index_select(0, ids) for k in sl.shapes}  # ONNX Gather: [b, ...]
        scale = rows.pop(SCALE).reshape(-1) if SCALE in rows else 1.0  # no scale: it is in B
        if sl.form == "canonical":
            return Lowered(x, rows["A"], rows["B"], scale)
        return _vmapped(sl, x, rows, scale)

    def extra(self) -> dict:
        multi = {"ids_input": IDS, "slots": len(self.adapters), "slot_adapters": self.adapters}
        return {**super().extra(), "multi": multi}


MODE_CLASSES: dict[str, type[Mode]] = {cls.name: cls for cls in (Merged, Unmerged, Multi)}
MODES = tuple(MODE_CLASSES)


def _active_first(data: state.AdapterState) -> list[str]:
    names = list(data.specs)
    if data.active in names:
        names.remove(data.active)
        names.insert(0, data.active)
    return names


def _vmapped(sl: SiteLayout, x: torch.Tensor, rows: dict[str, torch.Tensor], scale: torch.Tensor) -> Lowered:
    """Per-row lowering of a gated site: the variant's own ``lower`` vmapped over (tensors, x) rows."""
    fields: list[str] = []  # the tensor fields of the row's Lowered (A, B, and gate / h when present)

    def one(t, xr):
        low = lower_from(sl.template, xr, t)
        fields[:] = [f for f in ("A", "B", "gate", "h") if isinstance(getattr(low, f, None), torch.Tensor)]
        return tuple(getattr(low, f) for f in fields)

    per_row = torch.func.vmap(one)(rows, x.reshape(x.shape[0], -1, x.shape[-1]))
    out = dict(zip(fields, per_row, strict=True))
    low = Lowered(x, out["A"], out["B"], scale, out.get("gate"))
    return low._replace(h=out["h"]) if "h" in out else low
