"""``to_onnx``: export an adapted model merged, unmerged (adapters as graph inputs) or multi-adapter.

The exporter is ``torch.onnx.export(..., dynamo=True, optimize=False)`` (torch.export underneath):
measured here, the dynamo exporter handles transformers 5.x models (the TorchScript exporter stops at
``aten::diff`` in Llama's mask code), and ``optimize=False`` keeps parameter names and layouts as they
are (with ``optimize=True`` it renames or pre-transposes them). Unused initializers (the live
adapters' own parameters, which the fed graph does not read) are pruned, so a merged export has the
base model's operators and initializer shapes.

The live model is never left changed: merged mode merges in place with ``keep_original=True`` and
restores bit for bit in ``finally``; the other modes only reroute sites for the duration of the
trace (:mod:`lorafx.export.patch`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafx import state as adapter_state
from lorafx.adapter import Lowered, SiteAdapters
from lorafx.errors import ExportError, NotMergeableError, SpecError
from lorafx.export.layout import SiteLayout, build_layout, make_feed, model_feed_tensors, write_export_adapter
from lorafx.export.patch import eval_mode, fed_sites
from lorafx.export.tensors import SCALE, lower_from
from lorafx.merge import merge, unmerge
from lorafx.state import iter_sites, set_adapter

MODES = ("merged", "unmerged", "multi")
MANIFEST = "lorafx_export.json"
MODEL_FILE = "model.onnx"
IDS = "adapter_ids"


@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote: the directory, the ``.onnx`` file and the manifest (also on disk)."""

    directory: Path
    onnx_path: Path
    manifest: dict


def to_onnx(
    model: nn.Module,
    example_inputs,
    path,
    mode: str = "merged",
    *,
    adapters: list[str] | None = None,
    rank: int | None = None,
    dynamic: bool = True,
    opset: int | None = None,
) -> ExportResult:
    """Export ``model`` to ONNX in ``path`` (a directory: ``model.onnx`` + ``lorafx_export.json``).

    Args:
        model: a plain PyTorch or transformers model, adapted by :func:`lorafx.apply` or not.
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors (e.g.
            ``{"input_ids": ids, "attention_mask": mask}``); dict keys become input names. Use a
            batch of at least 2 so the batch axis stays dynamic.
        path: output directory (created).
        mode: ``"merged"`` — the active adapter folded into W, a plain graph any server runs (refuses
            gated variants such as MoR with :class:`~lorafx.errors.NotMergeableError`);
            ``"unmerged"`` — each site's adapter tensors are named graph inputs, each adapter in
            ``adapters`` is written to ``adapters/<name>/``; ``"multi"`` — K adapters stacked on a
            leading axis and an ``adapter_ids [batch]`` input choosing one per row (Gather + MatMul).
        adapters: adapter names to export (default: all; unmerged puts the active one first).
        rank: export width R of gate-free sites, at least the adapters' own ranks; a lower-rank
            adapter is zero-padded at serving time (exact).
        dynamic: batch (and, for token inputs, sequence) axes dynamic.
        opset: ONNX opset (default: the exporter's).

    While it runs, the live model's sites are rerouted to the fed tensors (merged mode: the weights
    are merged); do not run the model from another thread meanwhile. Everything is restored when
    ``to_onnx`` returns or raises.

    Example:
        >>> lorafx.export.to_onnx(model, {"input_ids": ids}, "out/llama", mode="unmerged")
    """
    if mode not in MODES:
        raise ExportError(f"mode must be one of {list(MODES)}, got {mode!r}")
    keys, values, as_kwargs = _normalise_inputs(example_inputs)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        if mode == "merged":
            manifest = _export_merged(model, keys, values, as_kwargs, directory, adapters, dynamic, opset)
        else:
            manifest = _export_fed(model, keys, values, as_kwargs, directory, mode, adapters, rank, dynamic, opset)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return ExportResult(directory, directory / MODEL_FILE, manifest)


def _normalise_inputs(example_inputs) -> tuple[list[str], list[torch.Tensor], bool]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        keys, values, kw = list(example_inputs), list(example_inputs.values()), True
    elif isinstance(example_inputs, (tuple, list)):
        values, kw = list(example_inputs), False
        keys = ["input"] if len(values) == 1 else [f"input_{i}" for i in range(len(values))]
    else:
        raise ExportError(
            f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_inputs).__name__}"
        )
    bad = [k for k, v in zip(keys, values, strict=False) if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(f"example inputs {bad} are not tensors")
    return keys, values, kw


class _Wrapper(nn.Module):
    """``forward(*model_inputs, *adapter_tensors)`` -> flat tuple of output tensors."""

    def __init__(self, model: nn.Module, keys: list[str], as_kwargs: bool, fed: list[str], state: dict):
        super().__init__()
        self.model, self.keys, self.as_kwargs, self.fed, self.state = model, keys, as_kwargs, fed, state
        self.output_names: list[str] = []

    def forward(self, *flat):
        n = len(self.keys)
        self.state["feed"] = dict(zip(self.fed, flat[n:], strict=False))
        try:
            inputs = flat[:n]
            out = self.model(**dict(zip(self.keys, inputs, strict=False))) if self.as_kwargs else self.model(*inputs)
        finally:
            self.state.pop("feed", None)
        names, tensors = _flatten_output(out)
        self.output_names = names
        return tuple(tensors)


def _flatten_output(out) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if hasattr(out, "items"):  # dict or transformers ModelOutput
        pairs = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in pairs], [v for _, v in pairs]
    if isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        return [f"output_{i}" for i in range(len(tensors))], tensors
    raise ExportError(f"model output of type {type(out).__name__} has no tensors to export")


def _dynamic_shapes(values: list[torch.Tensor], dynamic: bool, extra: int, ids: bool):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    specs = []
    for v in values:
        dims = {}
        if dynamic and v.dim() >= 1:
            dims[0] = batch
            if v.dim() >= 3 or (v.dim() == 2 and not v.is_floating_point()):
                dims[1] = seq  # token ids / masks [b, T], activations [b, T, d]
        small = [i for i in dims if v.shape[i] < 2]
        if small:
            raise ExportError(
                f"example input {len(specs)} has size {v.shape[small[0]]} on dynamic axis {small[0]}: torch.export fixes "
                "axes of size 0 or 1, so use an example with batch and sequence >= 2 (or dynamic=False)"
            )
        specs.append(dims or None)
    specs += [None] * extra
    if ids:
        specs.append({0: batch} if dynamic else None)
    return tuple(specs)


def _input_meta(keys, values, dyn) -> list[dict]:
    out = []
    for k, v, d in zip(keys, values, dyn, strict=False):
        shape = [(d or {}).get(i).__name__ if (d or {}).get(i) is not None else int(s) for i, s in enumerate(v.shape)]
        out.append({"name": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": shape})
    return out


def run_exporter(
    wrapper: nn.Module, args: tuple, names: list[str], out_names: list[str], dyn, onnx_path: Path, opset: int | None
) -> None:
    """``torch.onnx.export`` (dynamo, not optimised), drop unused initializers, save."""
    from onnx_ir.passes.common.unused_removal import RemoveUnusedNodesPass

    kw = {} if opset is None else {"opset_version": opset}
    wrapper.eval()
    with _quiet():
        prog = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            optimize=False,
            input_names=names,
            output_names=out_names,
            dynamic_shapes=(dyn,),
            verbose=False,
            **kw,
        )
    RemoveUnusedNodesPass()(prog.model)
    prog.save(str(onnx_path))


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, per-op registration logs and deprecation warnings."""
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        noisy.setLevel(level)


def _export(wrapper: _Wrapper, args: tuple, names: list[str], dyn, directory: Path, opset) -> list[str]:
    with torch.no_grad():
        wrapper(*args)  # eager once: output names, and a clear error before the slow trace
    run_exporter(wrapper, args, names, wrapper.output_names, dyn, directory / MODEL_FILE, opset)
    return wrapper.output_names


def _export_merged(model, keys, values, as_kwargs, directory, adapters, dynamic, opset) -> dict:
    data = adapter_state.find(model)
    name = data.active if data is not None else None
    if adapters:
        if len(adapters) != 1:
            raise ExportError(f"merged mode folds one adapter, got {adapters}")
        name = adapters[0]
    dyn = _dynamic_shapes(values, dynamic, 0, False)
    wrapper = _Wrapper(model, keys, as_kwargs, [], {})
    with _merged(model, name):
        outs = _export(wrapper, tuple(values), keys, dyn, directory, opset)
    return _manifest("merged", keys, values, dyn, outs, [], {"merged_adapter": name})


@contextlib.contextmanager
def _merged(model: nn.Module, name: str | None):
    """Fold ``name`` into the base weights for the ``with`` body; restore weights and activity exactly."""
    if name is None or any(sa.merged for sa in iter_sites(model).values()):
        yield  # a plain model, or one the user merged already: export as it is
        return
    previous = adapter_state.get(model).active
    set_adapter(model, name)
    try:
        merge(model, keep_original=True)
        try:
            yield
        finally:
            unmerge(model)
    except NotMergeableError as e:
        raise NotMergeableError(f"cannot export adapter {name!r} merged: {e}. Use mode='unmerged' or 'multi'") from None
    finally:
        set_adapter(model, previous)


def _export_fed(model, keys, values, as_kwargs, directory, mode, adapters, rank, dynamic, opset) -> dict:
    data = adapter_state.get(model)
    if any(sa.merged for sa in iter_sites(model).values()):
        raise ExportError(f"mode {mode!r} needs the adapters unmerged; call lorafx.unmerge(model) first")
    names = list(adapters) if adapters else _default_names(data)
    unknown = [n for n in names if n not in data.specs]
    if unknown or not names:
        raise SpecError(f"no adapter named {unknown or names}; adapters on this model: {sorted(data.specs)}")
    layout = build_layout(model, names, rank)
    feeds = {n: make_feed(layout, model_feed_tensors(model, n), f"adapter {n!r}") for n in names}
    fed = [sl.name(k) for sl in layout for k in sl.shapes]
    if mode == "unmerged":
        example = [feeds[names[0]][f] for f in fed]
    else:
        example = [torch.stack([feeds[n][f] for n in names]) for f in fed]
        example.append(torch.arange(values[0].shape[0]) % len(names))
    state: dict = {}
    wrapper = _Wrapper(model, keys, as_kwargs, fed + ([IDS] if mode == "multi" else []), state)
    by_site = {sl.site: sl for sl in layout}
    lowered_for = _unmerged_lowering(by_site, state) if mode == "unmerged" else _multi_lowering(by_site, state)
    dyn = _dynamic_shapes(values, dynamic, len(fed), mode == "multi")
    with fed_sites(model, lowered_for):
        outs = _export(wrapper, tuple(values) + tuple(example), keys + wrapper.fed, dyn, directory, opset)
    for n in names:
        spec = data.specs[n].to_dict()
        write_export_adapter(directory / "adapters" / n, n, model_feed_tensors(model, n), {"spec": spec})
    extra = {"adapters": {n: f"adapters/{n}" for n in names}}
    if mode == "multi":
        extra["multi"] = {"ids_input": IDS, "slots": len(names), "slot_adapters": names}
    return _manifest(mode, keys, values, dyn, outs, layout, extra)


def _default_names(data) -> list[str]:
    names = list(data.specs)
    if data.active in names:
        names.remove(data.active)
        names.insert(0, data.active)
    return names


def _manifest(mode, keys, values, dyn, outs, layout: list[SiteLayout], extra: dict) -> dict:
    return {
        "format": "lorafx.onnx",
        "format_version": 1,
        "mode": mode,
        "model": MODEL_FILE,
        "inputs": _input_meta(keys, values, dyn),
        "outputs": outs,
        "sites": [sl.to_dict() for sl in layout],
        **extra,
    }


def _unmerged_lowering(by_site: dict[str, SiteLayout], state: dict):
    def lowered_for(sa: SiteAdapters, x: torch.Tensor) -> Lowered | None:
        sl = by_site.get(sa.site)
        if sl is None:
            return None
        t = {k: state["feed"][sl.name(k)] for k in sl.shapes}
        low = lower_from(sl.template, x, t)
        return low._replace(scale=t[SCALE])

    return lowered_for


def _multi_lowering(by_site: dict[str, SiteLayout], state: dict):
    def lowered_for(sa: SiteAdapters, x: torch.Tensor) -> Lowered | None:
        sl = by_site.get(sa.site)
        if sl is None:
            return None
        ids = state["feed"][IDS]
        rows = {k: state["feed"][sl.name(k)].index_select(0, ids) for k in sl.shapes}  # ONNX Gather: [b, ...]
        scale = rows.pop(SCALE).reshape(-1)
        if sl.form == "canonical":
            return Lowered(x, rows["A"], rows["B"], scale)
        return _vmapped(sl, x, rows, scale)

    return lowered_for


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
