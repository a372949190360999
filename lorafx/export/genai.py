"""onnxruntime-genai files for a KV-cache export: ``genai_config.json`` and ``.onnx_adapter`` adapters.

With them, the export directory of a decoder LM is an onnxruntime-genai model directory:
``og.Model(dir)`` loads it, ``og.Adapters(model).load("adapters/<name>.onnx_adapter", name)`` and
``generator.set_active_adapter(adapters, name)`` switch adapters. What is written:

* ``genai_config.json``: the graph's input/output names (``past_key_values.%d.key``, ...), the
  model's sizes and special tokens, greedy search defaults, and ``past_present_share_buffer: false``:
  the graph concatenates the past with the new keys (``present`` is past + seq long), so it cannot
  write into a preallocated max-length buffer as the builder's GroupQueryAttention graphs do.
* unmerged mode: every adapter as ``adapters/<name>.onnx_adapter`` (``onnxruntime.AdapterFormat``:
  tensors named as the graph inputs, zero-padded to the exported rank; a canonical site's ``B``
  is already ``s·B``, as the graph takes it), and a zero initializer
  behind every adapter input, so a run without an active adapter is the base model (zero B) rather
  than a missing-input error; an active adapter overrides them.

Multi mode is not written for onnxruntime-genai: its ``adapter_ids [batch]`` input is not one genai
feeds (use :meth:`lorafx.export.AdapterSession.generate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

GENAI_CONFIG = "genai_config.json"
# Every KV-cache export has the same interface whatever the family (the attention math is inside the
# graph), which is what genai's plain decoder-only pipeline, type "llama", drives by the names in the
# config. A family's own type can select another pipeline: with "gpt2", genai 0.18 fails with "Model
# input was not found" on this graph, and as "llama" it decodes eager's tokens.
GENAI_TYPE = "llama"


def genai_config(model: nn.Module, manifest: dict) -> dict:
    """The ``genai_config.json`` of a KV-cache export of ``model`` described by ``manifest``."""
    cfg = model.config
    kv = manifest["kv_cache"]
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if kv["position_ids"]:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    eos = kv.get("eos_token_id") or [getattr(cfg, "eos_token_id", None) or 0]
    pad = kv.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": getattr(cfg, "bos_token_id", None) or 0,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest["model"],
                "head_size": kv["kv_shapes"][0][1],
                "hidden_size": cfg.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": kv["layers"],
                "num_key_value_heads": kv["kv_shapes"][0][0],
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad if pad is not None else eos[0],
            "type": GENAI_TYPE,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_files(directory: Path, model: nn.Module, manifest: dict, feeds: dict[str, dict]) -> None:
    """Write ``genai_config.json`` and, unmerged, each adapter of ``feeds`` (name -> input name ->
    tensor at the exported shape) as ``.onnx_adapter`` plus zero defaults; adds ``onnx_adapters``
    to ``manifest``."""
    if manifest["mode"] == "multi":
        return
    (directory / GENAI_CONFIG).write_text(json.dumps(genai_config(model, manifest), indent=2))
    if manifest["mode"] != "unmerged":
        return
    manifest["onnx_adapters"] = {}
    for name, rel in manifest["adapters"].items():
        arrays = {k: v.detach().float().numpy() for k, v in feeds[name].items()}
        write_onnx_adapter(directory / f"{rel}.onnx_adapter", arrays)
        manifest["onnx_adapters"][name] = f"{rel}.onnx_adapter"
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in next(iter(feeds.values())).items()}
    _add_default_inputs(directory / manifest["model"], zeros)


def write_onnx_adapter(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One adapter in onnxruntime's adapter format (``onnxruntime.AdapterFormat``)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def _add_default_inputs(onnx_path: Path, defaults: dict[str, np.ndarray]) -> None:
    """Give graph inputs a default value: an initializer of the same name (ONNX IR >= 4), which a
    fed input or an active onnxruntime adapter overrides."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=False)
    have = {t.name for t in proto.graph.initializer}
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in defaults.items() if k not in have)
    onnx.save(proto, str(onnx_path))
