"""Canonical sites are exported with the scale folded into the fed ``B`` (``s·B``): no scale input and
no Mul per site, the manifest says so, ``set_scale`` and adapter files with another scale stay exact,
and a layout written before the change (a ``scale`` input) is still fed as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorafx
from lorafx.cli.models import TinyMLP
from lorafx.export import AdapterSession, to_onnx
from lorafx.export.layout import SiteLayout, make_feed
from tests.export_helpers import close, eager, op_types, perturb

pytest.importorskip("onnxruntime")


def adapted():
    torch.manual_seed(0)
    model = lorafx.apply(TinyMLP().eval(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["up", "mid"]))
    perturb(model, "default", seed=1)
    lorafx.set_scale(model, 2.5)
    return model


def test_no_scale_input_or_mul_and_set_scale_is_exact(tmp_path):
    model = adapted()
    x = torch.randn(3, 32)
    to_onnx(model, x, tmp_path / "merged", mode="merged")
    to_onnx(model, x, tmp_path / "unmerged", mode="unmerged")
    manifest = json.loads((tmp_path / "unmerged" / "lorafx_export.json").read_text())
    assert all(s["B_includes_scale"] for s in manifest["sites"])
    import onnx

    inputs = [i.name for i in onnx.load(str(tmp_path / "unmerged" / "model.onnx")).graph.input]
    assert not any(n.endswith(".scale") for n in inputs) and sum(n.endswith((".A", ".B")) for n in inputs) == 4
    ops, merged_ops = op_types(tmp_path / "unmerged" / "model.onnx"), op_types(tmp_path / "merged" / "model.onnx")
    assert ops.count("Mul") == merged_ops.count("Mul")  # the scale is in B: no Mul added per site
    sess = AdapterSession(tmp_path / "unmerged")
    with torch.no_grad():
        close(sess.run({"input": x})[sess.output_names[0]], eager(model, x, None))


def test_adapter_file_with_another_scale(tmp_path):
    """A saved adapter with its own set_scale fed to an export made at another scale: exact."""
    model = adapted()
    x = torch.randn(3, 32)
    to_onnx(model, x, tmp_path / "unmerged", mode="unmerged")
    lorafx.set_scale(model, -0.75)
    lorafx.save_adapter(model, tmp_path / "other")
    sess = AdapterSession(tmp_path / "unmerged")
    sess.load_adapter(tmp_path / "other", name="other")
    with torch.no_grad():
        close(sess.run({"input": x}, adapter="other")[sess.output_names[0]], eager(model, x, None))
        assert (
            np.abs(sess.run({"input": x}, adapter="default")[sess.output_names[0]] - eager(model, x, None)).max() > 1e-3
        )


def test_old_layout_with_a_scale_input_is_fed_as_before():
    """A manifest written before this change lists ``<site>.scale``: B stays unscaled, s is fed apart."""
    old = SiteLayout("up", "canonical", "lora", 3, 2, {"A": [2, 3], "B": [2, 2], "scale": [1]})
    new = SiteLayout("up", "canonical", "lora", 3, 2, {"A": [2, 3], "B": [2, 2]})
    assert not old.scale_in_b and new.scale_in_b and "B_includes_scale" not in old.to_dict()
    t = {"up.A": torch.ones(1, 3), "up.B": torch.full((2, 1), 2.0), "up.scale": torch.tensor([3.0])}
    fed_old, fed_new = make_feed([old], t, "test"), make_feed([new], t, "test")
    np.testing.assert_array_equal(fed_old["up.B"], [[2.0, 0.0], [2.0, 0.0]])
    np.testing.assert_array_equal(fed_old["up.scale"], [3.0])
    np.testing.assert_array_equal(fed_new["up.B"], [[6.0, 0.0], [6.0, 0.0]])
    assert set(fed_new) == {"up.A", "up.B"}
