"""ONNX export of adapted models, and serving on onnxruntime.

``import lorafx`` does not import this package; this package imports onnx and onnxruntime only inside
the functions that need them (install ``lorafx[onnx]``).

* :func:`to_onnx` — ``merged`` (plain graph), ``unmerged`` (adapter tensors as named graph inputs,
  adapter files beside the model) or ``multi`` (K stacked adapters + per-row ``adapter_ids``).
* ``to_onnx(..., kv_cache=True)`` — decoder LMs with past/present tensors (:mod:`lorafx.export.kv_cache`);
  encoder-decoder models as encoder + decoder + decoder-with-past graphs (:mod:`lorafx.export.seq2seq`).
* :class:`AdapterSession` — one onnxruntime session, many adapters, per-row adapters in a batch,
  ``generate`` over a KV-cache export.
* :func:`build_with_builder` — ORT GenAI's model builder graph (fused attention, shared KV buffer) with
  lorafx's gate-free adapters as swappable ``.onnx_adapter`` files for onnxruntime-genai.
* :func:`check_onnx` — export, run onnxruntime, return the max abs difference against eager.

Export traces copies of the rewritten regions (:mod:`lorafx.passes.feed_adapters`) swapped in for
the trace only, so it works whatever the live sites call (e.g. after ``lorafx.compile``).
"""

from lorafx.export.check import check_onnx, compare_export
from lorafx.export.exporter import MODES, ExportResult, to_onnx
from lorafx.export.genai_builder import build_with_builder
from lorafx.export.inputs import ExampleInputs
from lorafx.export.modes import Merged, Mode, Multi, Unmerged
from lorafx.export.session import AdapterSession
from lorafx.export.tensors import form_of, lower_from, site_tensors

__all__ = [
    "MODES",
    "AdapterSession",
    "ExampleInputs",
    "ExportResult",
    "Merged",
    "Mode",
    "Multi",
    "Unmerged",
    "build_with_builder",
    "check_onnx",
    "compare_export",
    "form_of",
    "lower_from",
    "site_tensors",
    "to_onnx",
]
