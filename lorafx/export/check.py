"""``check_onnx``: export to a temporary directory, run onnxruntime, compare with eager PyTorch."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import nn

from lorafx import state
from lorafx.export.exporter import to_onnx
from lorafx.export.inputs import ExampleInputs, flatten_output, outputs_apart_from_inputs
from lorafx.export.runtime import require_one_onnxruntime
from lorafx.state import eval_mode, iter_sites, set_adapter


def check_onnx(model: nn.Module, example_inputs, mode: str = "merged", adapters: list[str] | None = None) -> float:
    """Max abs difference between onnxruntime (CPU) and eager PyTorch over every output.

    ``merged`` compares the active adapter; ``unmerged`` every exported adapter in turn through one
    session; ``multi`` a batch whose rows cycle through the exported adapters, each row against
    eager with that row's adapter.

    Example:
        >>> lorafx.export.check_onnx(model, {"input_ids": ids}, "unmerged")  # e.g. 2.4e-07
    """
    with tempfile.TemporaryDirectory() as tmp:
        to_onnx(model, example_inputs, tmp, mode=mode, adapters=adapters)
        return compare_export(model, example_inputs, tmp)


def compare_export(model: nn.Module, example_inputs, directory) -> float:
    """Max abs difference between the export in ``directory`` (run by onnxruntime) and eager ``model``."""
    from lorafx.export.session import AdapterSession

    inputs = ExampleInputs.of(example_inputs)
    require_one_onnxruntime()
    sess = AdapterSession(directory)
    feed = inputs.feed()
    if sess.mode == "merged":
        return _diff(sess.run(feed), _eager(model, inputs, None, keep=True))
    names = list(sess.manifest["adapters"])
    if sess.mode == "unmerged":
        return max(_diff(sess.run(feed, adapter=n), _eager(model, inputs, n)) for n in names)
    rows = [names[i % len(names)] for i in range(inputs.batch)]
    got = sess.run(feed, adapter=rows)
    worst = 0.0
    for n in names:
        idx = [i for i, r in enumerate(rows) if r == n]
        if not idx:
            continue  # more slots than rows
        want = _eager(model, inputs, n)
        worst = max(worst, _diff({k: v[idx] for k, v in got.items()}, {k: v[idx] for k, v in want.items()}))
    return worst


@torch.no_grad()
def _eager(model: nn.Module, inputs: ExampleInputs, name, keep: bool = False) -> dict[str, np.ndarray]:
    """Eager outputs with adapter ``name`` active (``keep``: as the model is now); activity restored."""
    data = state.find(model)
    previous = data.active if data is not None else None
    if not keep and data is not None:
        set_adapter(model, name)
    try:
        with eval_mode(model):
            out = inputs.call(model)
    finally:
        if not keep and data is not None and not any(sa.merged for sa in iter_sites(model).values()):
            set_adapter(model, previous)
    names, tensors = flatten_output(out)
    names = outputs_apart_from_inputs(names, inputs.names)  # as the graph names them
    return {n: t.numpy() for n, t in zip(names, tensors, strict=False)}


def _diff(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k] - want[k]).max()) for k in want)
