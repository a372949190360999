"""``to_onnx``: export an adapted model merged, unmerged (adapters as graph inputs) or multi-adapter.

The exporter is ``torch.onnx.export(..., dynamo=True, optimize=False)`` (torch.export underneath):
measured here, the dynamo exporter handles transformers 5.x models (the TorchScript exporter stops at
``aten::diff`` in Llama's mask code), and ``optimize=False`` keeps parameter names and layouts as they
are (with ``optimize=True`` it renames or pre-transposes them). Unused initializers (the live
adapters' own parameters, which the fed graph does not read) are pruned, so a merged export has the
base model's operators and initializer shapes.

The live model is never left changed. What is traced is the model with each rewritten region
replaced, for the trace only, by a copy that the mode rewrote (:mod:`lorafx.export.modes`), swapped
in and out by :func:`lorafx.apply.swapped`; merged mode also merges in place with
``keep_original=True`` and restores bit for bit. No live module's ``forward`` is assigned.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from lorafx.apply import swapped
from lorafx.errors import ExportError
from lorafx.export.axes import check_axes_kept, named_constraint_errors
from lorafx.export.genai import write_genai_files
from lorafx.export.inputs import ExampleInputs, flatten_output, outputs_apart_from_inputs
from lorafx.export.kv_cache import KVCacheInputs, kv_cache_inputs
from lorafx.export.modes import IDS, MODE_CLASSES, MODEL_FILE, MODES, Mode
from lorafx.export.runtime import require_one_onnxruntime
from lorafx.export.seq2seq import GRAPH_FILES, is_seq2seq, seq2seq_graphs, seq2seq_manifest
from lorafx.export.target import MANIFEST, ExportTarget
from lorafx.regions import is_region
from lorafx.saved_modules import iter_saved
from lorafx.state import eval_mode, iter_sites

__all__ = ["IDS", "MANIFEST", "MODEL_FILE", "MODES", "ExportResult", "run_exporter", "to_onnx"]


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
    mode: str | type[Mode] = "merged",
    *,
    adapters: list[str] | None = None,
    rank: int | None = None,
    dynamic: bool = True,
    opset: int | None = None,
    dynamic_shapes: dict | None = None,
    kv_cache: bool = False,
) -> ExportResult:
    """Export ``model`` to ONNX in ``path`` (a directory: ``model.onnx`` + ``lorafx_export.json``).

    Args:
        model: a plain PyTorch or transformers model, adapted by :func:`lorafx.apply` or not.
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors (e.g.
            ``{"input_ids": ids, "attention_mask": mask}``); dict keys become input names. Use a
            batch of at least 2 so the batch axis stays dynamic.
        path: output directory (created; ``model.onnx``, ``lorafx_export.json``, ``adapters/``), or a
            path ending in ``.onnx``: that file, with the manifest and adapters beside it (as
            ``torch.onnx.export``); then only those names in its folder are replaced.
        mode: ``"merged"`` — the active adapter folded into W, a plain graph any server runs (refuses
            gated variants such as MoR with :class:`~lorafx.errors.NotMergeableError`);
            ``"unmerged"`` — each site's adapter tensors are named graph inputs, each adapter in
            ``adapters`` is written to ``adapters/<name>/``; ``"multi"`` — K adapters stacked on a
            leading axis and an ``adapter_ids [batch]`` input choosing one per row (Gather + MatMul).
            A :class:`~lorafx.export.modes.Mode` subclass is accepted too.
        adapters: adapter names to export (default: all; unmerged puts the active one first).
        rank: export width R of gate-free sites, at least the adapters' own ranks; a lower-rank
            adapter is zero-padded at serving time (exact).
        dynamic: each input's axes dynamic by its role (:mod:`lorafx.export.axes`): token ids and
            masks batch + ``seq``, decoder inputs batch + ``decoder_seq``, pixel values, audio
            features and anything else batch only.
        opset: ONNX opset (default: the exporter's).
        dynamic_shapes: per input name, ``{axis: dim name}`` (axes sharing a name share a size) or
            ``None`` (static), replacing the role table for that input, e.g.
            ``{"pixel_values": {0: "batch", 2: "height", 3: "width"}}``. An axis the model cannot
            keep dynamic is an :class:`~lorafx.errors.ExportError` naming the input and axis.
        kv_cache: export a decoder LM for generation with a KV cache (:mod:`lorafx.export.kv_cache`):
            ``example_inputs`` are token ids (a tensor or ``{"input_ids", "attention_mask"}``); the
            graph takes ``input_ids``, ``attention_mask``, ``position_ids`` (when the model takes
            them) and ``past_key_values.N.key/value`` and returns ``logits`` and
            ``present.N.key/value``, one graph for prefill (past length 0) and decode. An encoder-decoder
            model (``config.is_encoder_decoder``: T5, BART, Whisper) is written as ``encoder.onnx``,
            ``decoder.onnx`` and ``decoder_with_past.onnx`` (:mod:`lorafx.export.seq2seq`); ``path``
            must then be a directory.

    Whatever the sites call (after ``lorafx.compile(model, kernels=...)`` too), the trace runs region
    copies whose sites call the plain ``"functional"`` implementation. While it runs the copies are
    swapped into the live model (merged mode: the weights are merged); do not run the model from
    another thread meanwhile. Everything is restored when ``to_onnx`` returns or raises.

    Example:
        >>> lorafx.export.to_onnx(model, {"input_ids": ids}, "out/llama", mode="unmerged")
    """
    cls = MODE_CLASSES.get(mode) if isinstance(mode, str) else mode
    if cls not in MODE_CLASSES.values():
        raise ExportError(f"mode must be one of {list(MODES)}, got {mode!r}")
    experts = [sa.site for sa in iter_sites(model).values() if sa.kind == "expert"]
    if experts:  # measured on transformers 5.23: the base Mixtral/Qwen3-MoE do not export either
        raise ExportError(
            f"sites {experts[:3]}: MoE expert sites do not export to ONNX (lorafx::grouped_linear has no ONNX form; "
            "transformers' own experts fail too: grouped_mm in the ONNX conversion, the eager loop in torch.export); "
            "the model is unchanged"
        )
    saved = sorted(iter_saved(model))
    if saved and cls is not MODE_CLASSES["merged"]:  # a head is not a low-rank pair: it cannot be fed per adapter
        raise ExportError(
            f"modules_to_save {saved[:3]}: mode {cls.name!r} feeds adapters as low-rank tensors, and a saved "
            "module is a whole copy per adapter, so a served adapter swap would keep this adapter's copy; export "
            "mode='merged' (the active adapter's copy is in the graph); the model is unchanged"
        )
    inputs = ExampleInputs.of(example_inputs)
    require_one_onnxruntime()
    target = ExportTarget.of(path)
    seq2seq = kv_cache and is_seq2seq(model)
    if seq2seq and target.file_mode:
        raise ExportError(
            f"{path}: kv_cache=True on an encoder-decoder model writes three graphs ({', '.join(GRAPH_FILES.values())}); "
            "give a directory, not a .onnx path"
        )
    # Written into a temporary folder and renamed into place: a failed export leaves the previous
    # export (or nothing) in place, never a model.onnx beside another export's manifest.
    with target.staged() as directory, eval_mode(model):
        if seq2seq:
            graphs = seq2seq_graphs(model, example_inputs)
        else:
            graphs = [kv_cache_inputs(model, example_inputs) if kv_cache else inputs]
        chosen = cls(model, adapters, rank)
        dyns = [g.dynamic_shapes(dynamic, chosen.fed_batched, dynamic_shapes) for g in graphs]
        with chosen.folded(), region_copies(model, chosen.rewrite) as root:
            files = [g.file if seq2seq else target.model_file for g in graphs]
            written = [
                _export_graph(root, g, chosen, d, directory / f, opset, seq2seq)
                for g, d, f in zip(graphs, dyns, files, strict=True)
            ]
        chosen.write_adapters(directory)
        if seq2seq:
            manifest = seq2seq_manifest(chosen.manifest([], []), model, graphs, written)
        else:
            manifest = {**chosen.manifest(graphs[0].meta(dyns[0]), written[0]["outputs"]), "model": target.model_file}
        if isinstance(graphs[0], KVCacheInputs):
            manifest["kv_cache"] = graphs[0].manifest(model)
            write_genai_files(directory, model, manifest, getattr(chosen, "feeds", {}))
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return ExportResult(target.directory, target.onnx_path, manifest)


@contextlib.contextmanager
def region_copies(model: nn.Module, rewrite: Callable[[fx.GraphModule], fx.GraphModule]) -> Iterator[nn.Module]:
    """Every rewritten region of ``model`` replaced by ``rewrite(region)`` for the block; yields the
    root to call (the copy itself when the whole model is a region). Restored however it exits.

    Innermost regions first: a copy shares the submodules its original holds *when it is made*, so
    an outer region (the root above all) is copied after the regions inside it are swapped."""
    regions = [(fqn, m) for fqn, m in model.named_modules() if is_region(m)]
    root = model
    with contextlib.ExitStack() as stack:
        for fqn, gm in reversed(regions):
            root = stack.enter_context(swapped(model, [(fqn, rewrite(gm))]))
        yield root


class _Wrapper(nn.Module):
    """``forward(*model_inputs, *fed_tensors)`` -> flat tuple of output tensors; the fed tensors are
    put in the mode's ``feed`` (read by its site lowerings) for the duration of the call."""

    def __init__(self, model: nn.Module, inputs: ExampleInputs, mode: Mode):
        super().__init__()
        self.model, self.inputs, self.mode = model, inputs, mode
        self.output_names: list[str] = []

    def forward(self, *flat):
        n = len(self.inputs.names)
        self.mode.feed.update(zip(self.mode.fed_names, flat[n:], strict=True))
        try:
            out = self.inputs.call(self.model, flat[:n])
        finally:
            self.mode.feed.clear()
        names, tensors = flatten_output(out)
        self.output_names = outputs_apart_from_inputs(names, self.inputs.names)
        return tuple(tensors)


def run_exporter(
    wrapper: nn.Module,
    args: tuple,
    names: list[str],
    out_names: list[str],
    dyn,
    onnx_path: Path,
    opset: int | None,
    prune: list[str] | tuple = (),
) -> None:
    """``torch.onnx.export`` (dynamo, not optimised), drop unused initializers (and the graph inputs
    named in ``prune`` that nothing reads), save."""
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
    graph_inputs = prog.model.graph.inputs
    for value in [v for v in graph_inputs if v.name in set(prune) and not v.uses()]:
        graph_inputs.remove(value)
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


def _export_graph(root: nn.Module, inputs: ExampleInputs, mode: Mode, dyn, onnx_path: Path, opset, prune: bool) -> dict:
    """Trace ``root`` on ``inputs`` plus the mode's fed tensors into ``onnx_path``; returns the graph's
    ``inputs`` (manifest entries), ``outputs`` and ``adapter_inputs`` (the fed names it takes). With
    ``prune``, fed inputs that no node reads are dropped (a seq2seq graph takes only its own sites')."""
    wrapper = _Wrapper(root, inputs, mode)
    names = [*inputs.names, *mode.fed_names]
    args = inputs.tensors + tuple(mode.example(inputs.batch))
    with torch.no_grad():
        wrapper(*args)  # eager once: output names, and a clear error before the slow trace
    with named_constraint_errors(names, dyn):
        run_exporter(
            wrapper, args, names, wrapper.output_names, dyn, onnx_path, opset, prune=mode.fed_names if prune else ()
        )
    check_axes_kept(onnx_path, names, dyn)
    kept = set(_graph_inputs(onnx_path)) if prune else set(mode.fed_names)
    return {
        "inputs": inputs.meta(dyn),
        "outputs": wrapper.output_names,
        "adapter_inputs": [n for n in mode.fed_names if n in kept],
    }


def _graph_inputs(onnx_path: Path) -> list[str]:
    import onnx

    return [v.name for v in onnx.load(str(onnx_path), load_external_data=False).graph.input]
