"""lorafx adapters on ORT GenAI's model builder graph: the builder's fast base, swappable lorafx adapters.

``to_onnx(..., kv_cache=True)`` exports the model's own attention code, decomposed into standard ONNX
ops. onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``) instead emits
fused contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding) with a
shared past/present buffer, for the families it knows; it bakes one PEFT LoRA adapter into the graph.
:func:`build_with_builder` gets both: the builder's graph, with every LoRA site's two matrices turned
into graph inputs, and each lorafx adapter written as an ``.onnx_adapter`` under those input names.

How, step by step:

1. the model's base weights (an unloaded copy) and ``tokenizer`` are saved as a Hugging Face directory;
2. a *template* PEFT LoRA adapter of rank R on exactly the exported sites is written, every tensor of
   site number j filled with the value j + 1 (``lora_alpha = r``: the builder's scale is 1);
3. the builder builds the graph from them (a subprocess, fp32);
4. each ``*.lora_A.*`` / ``*.lora_B.*`` initializer is matched to its site by that value (not by
   names, which the builder renames per family), its shape is checked (``[d_in, R]``, ``[R, d_out]``:
   the builder stores ``Aᵀ`` and ``(s·B)ᵀ``), and it becomes a graph input whose default is zeros:
   no active adapter is the base model, exactly;
5. each adapter is written as ``adapters/<name>.onnx_adapter``: ``Aᵉᵀ`` and ``(s·Bᵉ)ᵀ`` zero-padded
   to rank R. The scale lives in B (the builder's own convention): a ``set_scale``'d adapter is
   exported with its current scale, as every lorafx export is.

Refused, with an :class:`~lorafx.errors.ExportError` naming the site: a gated variant (MoR: not the
canonical ``s·(x Aᵀ) Bᵀ``), a non-linear site (conv, embedding, attention in-projections, experts),
a quantized base, merged adapters, a family the builder does not take (its error is quoted), and any
site the builder dropped or shared (no one-to-one initializer). Nothing is ever written half: the
graph is built in a temporary folder and moved into ``directory`` once everything checked.

Measured here (onnxruntime-genai, greedy, 32 new tokens, 7-9 interleaved generate calls, shared
2-core machine): on a Llama of hidden 256, 2 layers, r 16 on all 7 projections, this graph with the
adapter active takes 1.02-1.04x the time of the builder's graph with the same adapter baked in
(batch 1: 23.0 vs 22.6 ms; batch 8: 46.5 vs 45.1 ms). Not the zero defaults (removing them
changes nothing), and not the graph in onnxruntime itself (one decode step, batch 8, past 32: 1807
µs with adapter inputs vs 1865 µs baked): what genai adds per run for adapter inputs is unprofiled.
lorafx's own unmerged KV export takes 1.43x. On the benchmark Llama (hidden 1024, 4 layers) the two
builder graphs are within noise (16 tokens; batch 8: 1171 vs 1150 / 1158 ms).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorafx import state
from lorafx.errors import ExportError
from lorafx.export.genai import write_onnx_adapter
from lorafx.export.layout import SiteLayout, build_layout, make_feed, model_feed_tensors
from lorafx.export.tensors import SCALE, form_of

BUILDER_MANIFEST = "lorafx_genai.json"
MODEL_FILE = "model.onnx"


def build_with_builder(
    model: nn.Module,
    directory,
    tokenizer,
    *,
    adapters: list[str] | None = None,
    rank: int | None = None,
    execution_provider: str = "cpu",
) -> dict:
    """Build ``model``'s base graph with ORT GenAI's model builder, with lorafx's adapters swappable.

    Args:
        model: a transformers decoder LM of a family the builder supports (Llama, Qwen, Mistral, ...)
            adapted by :func:`lorafx.apply` with gate-free variants (LoRA, DropLoRA, CE-LoRA,
            CapaBoost, Uni-LoRA) on linear sites.
        directory: output folder (created, or replaced if it holds an earlier build): the builder's ``model.onnx`` (+ data),
            ``genai_config.json`` and tokenizer files, ``adapters/<name>.onnx_adapter``, and
            ``lorafx_genai.json`` (site -> graph input names, rank, adapter files).
        tokenizer: the model's tokenizer (anything with ``save_pretrained``, or a directory holding
            one); the builder needs it and copies it beside the graph for ``og.Tokenizer``.
        adapters: adapter names to write (default: all).
        rank: graph rank R (default: the largest adapter rank); a lower-rank adapter is zero-padded.
        execution_provider: the builder's ``-e`` (``"cpu"``, ``"cuda"``, ...); fp32 weights.

    Returns the ``lorafx_genai.json`` manifest. The base weights are saved from a copy of ``model``
    with lorafx taken off (:func:`lorafx.unload`), so peak memory holds the model twice; the live
    model is not changed.

    Example:
        >>> build_with_builder(model, "out/genai", tokenizer)
        >>> m = og.Model("out/genai"); ads = og.Adapters(m); ads.load("out/genai/adapters/a.onnx_adapter", "a")
    """
    names = _adapter_names(model, adapters)
    widest = max(sl.shapes["A"][0] for sl in _checked_layout(model, names, None))
    R = max(widest, rank or 0)
    if rank is not None and rank < widest:
        raise ExportError(f"rank={rank} is below the adapters' rank {widest}; pass rank >= {widest}")
    layout = _checked_layout(model, names, R)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / BUILDER_MANIFEST).is_file():
        raise ExportError(f"{directory} exists and is not an earlier build_with_builder output: not replacing it")
    with tempfile.TemporaryDirectory(prefix="lorafx-builder-") as tmp, state.eval_mode(model):
        tmp = Path(tmp)
        _save_base(model, tokenizer, tmp / "hf")
        write_template_peft(layout, R, tmp / "peft")
        _run_builder(tmp / "hf", tmp / "peft", tmp / "out", execution_provider)
        inputs = adapter_inputs(tmp / "out" / MODEL_FILE, layout, R)
        files = {}
        (tmp / "out" / "adapters").mkdir()
        for n in names:
            feed = make_feed(layout, model_feed_tensors(model, n), f"adapter {n!r}")
            write_onnx_adapter(tmp / "out" / "adapters" / f"{n}.onnx_adapter", builder_tensors(layout, inputs, feed))
            files[n] = f"adapters/{n}.onnx_adapter"
        manifest = {"format": "lorafx.genai_builder", "format_version": 1, "rank": R, "sites": inputs}
        manifest |= {"adapters": files, "specs": {n: state.get(model).specs[n].to_dict() for n in names}}
        (tmp / "out" / BUILDER_MANIFEST).write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        shutil.move(str(tmp / "out"), str(directory))
    return manifest


def _adapter_names(model: nn.Module, adapters: list[str] | None) -> list[str]:
    data = state.find(model)
    if data is None or not data.specs:
        raise ExportError("build_with_builder writes lorafx adapters, and this model has none (lorafx.apply first)")
    names = list(adapters) if adapters else list(data.specs)
    for n in names:
        state.require(model, n)
    merged = sorted(sa.site for sa in state.iter_sites(model).values() if sa.merged)
    if merged:
        raise ExportError(
            f"sites {merged[:3]} are merged; call lorafx.unmerge(model) first (the builder needs the base)"
        )
    return names


def _checked_layout(model: nn.Module, names: list[str], rank: int | None) -> list[SiteLayout]:
    """The canonical layout of ``names``; a site the builder's LoRA graph cannot hold is refused."""
    for site, sa in state.iter_sites(model).items():
        for n in names:
            if n not in sa.adapters:
                continue
            a = sa.adapters[n]
            if sa.kind != "linear" or sa.quantized:
                what = f"quantized ({sa.quantized})" if sa.quantized else f"a {sa.kind} site"
                raise ExportError(
                    f"site {site!r} is {what}: the builder's LoRA graph holds adapters on plain linear layers only"
                )
            if form_of(a) != "canonical":
                raise ExportError(
                    f"site {site!r}: adapter {n!r} ({a.config.name}) is gated, not the canonical s·(x Aᵀ)Bᵀ that "
                    "the builder's LoRA graph computes; use to_onnx(..., kv_cache=True, mode='unmerged')"
                )
    return build_layout(model, names, rank)


def _save_base(model: nn.Module, tokenizer, hf: Path) -> None:
    """The base model (lorafx taken off a copy) and the tokenizer as a Hugging Face directory."""
    from lorafx.unload import unload

    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise ExportError(
            f"build_with_builder needs a transformers model (save_pretrained, config); got {type(model).__name__}"
        )
    base = unload(copy.deepcopy(model))
    base.save_pretrained(hf)
    del base
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ExportError(f"tokenizer must have save_pretrained or be a directory; got {type(tokenizer).__name__}")
    tokenizer.save_pretrained(hf)


def write_template_peft(layout: list[SiteLayout], rank: int, directory: Path) -> None:
    """A PEFT LoRA directory of rank ``rank`` on the layout's sites, site j's tensors all j + 1, scale 1."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tensors = {}
    for j, sl in enumerate(layout):
        prefix = f"base_model.model.{sl.site}"
        tensors[f"{prefix}.lora_A.weight"] = torch.full((rank, sl.d_in), float(j + 1))
        tensors[f"{prefix}.lora_B.weight"] = torch.full((sl.d_out, rank), float(j + 1))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scale alpha/r = 1: the builder multiplies B by it
        "target_modules": [sl.site for sl in layout],  # full FQNs: PEFT matches them exactly
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _run_builder(hf: Path, peft: Path, out: Path, execution_provider: str) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "fp32"]
    cmd += ["-e", execution_provider, "-c", str(out.parent / "cache"), "--extra_options", f"adapter_path={peft}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise ExportError("ORT GenAI's model builder failed on this model; its last lines:\n  " + "\n  ".join(tail))


def adapter_inputs(onnx_path: Path, layout: list[SiteLayout], rank: int) -> dict[str, dict[str, str]]:
    """Turn the builder's LoRA initializers into graph inputs with zero defaults; returns site ->
    ``{"A": input name, "B": input name}``. Each initializer is matched to its site by the template's
    fill value j + 1; a site without exactly one A and one B of the right shape is an ExportError."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    proto = onnx.load(str(onnx_path), load_external_data=False)
    found: dict[tuple[int, str], list[str]] = {}
    for t in proto.graph.initializer:
        key = "A" if ".lora_A." in t.name else "B" if ".lora_B." in t.name else None
        if key is None:
            continue
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(onnx_path.parent))
        arr = numpy_helper.to_array(t)
        j = int(round(float(arr.flat[0]))) - 1
        if arr.size == 0 or arr.min() != arr.max() or not 0 <= j < len(layout):
            raise ExportError(f"builder initializer {t.name!r} is not one of the template's LoRA tensors")
        sl = layout[j]
        want = [sl.d_in, rank] if key == "A" else [rank, sl.d_out]
        if list(arr.shape) != want:
            raise ExportError(
                f"site {sl.site!r}: builder tensor {t.name!r} has shape {list(arr.shape)}, expected {want}"
            )
        found.setdefault((j, key), []).append(t.name)
        t.CopyFrom(numpy_helper.from_array(np.zeros_like(arr), t.name))  # inline zeros: the no-adapter default
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, want))
    sites = {}
    for j, sl in enumerate(layout):
        a, b = found.get((j, "A"), []), found.get((j, "B"), [])
        if len(a) != 1 or len(b) != 1:
            raise ExportError(
                f"site {sl.site!r}: the builder's graph holds {len(a)} A and {len(b)} B tensors for it (expected one "
                "each: the builder dropped, merged or shared this site's LoRA); the model is not exportable this way"
            )
        sites[sl.site] = {"A": a[0], "B": b[0]}
    onnx.save(proto, str(onnx_path))  # the base weights stay in the builder's external data file
    return sites


def builder_tensors(
    layout: list[SiteLayout], inputs: dict[str, dict[str, str]], feed: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """One adapter's feed (``<site>.A [R, d_in]``, ``.B [d_out, R]`` already ``s·B``) as the builder's
    inputs: ``Aᵀ [d_in, R]`` and ``(s·B)ᵀ [R, d_out]``."""
    out = {}
    for sl in layout:
        A, B = feed[sl.name("A")], feed[sl.name("B")]
        if not sl.scale_in_b:  # a layout of an older manifest, with the scale apart
            B = B * feed[sl.name(SCALE)]
        out[inputs[sl.site]["A"]] = A.t().contiguous().numpy()
        out[inputs[sl.site]["B"]] = B.t().contiguous().numpy()
    return out
