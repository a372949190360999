"""ONNX export of every variant in every mode that applies, onnxruntime (CPU) against eager PyTorch.

One tiny plain-PyTorch MLP (d_in 32, hidden 64) per case; each case exports once per mode. Missing
variants are skipped by ``example_configs()`` and covered once they are merged.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lorafx
from lorafx.cli.models import tiny_mlp
from lorafx.errors import NotMergeableError
from lorafx.export import AdapterSession, form_of, to_onnx
from tests.export_helpers import GatedForTests, close, eager, gated_registered, op_types, perturb
from tests.variant_cases import example_configs

CONFIGS = {**example_configs(), "gated_for_tests": GatedForTests(r=4)}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    with gated_registered():
        yield


def _two_adapters(config):
    torch.manual_seed(0)
    model = lorafx.apply(tiny_mlp(), lorafx.Spec(config, targets=["up", "mid"]))
    model = lorafx.apply(model, lorafx.Spec(config, targets=["up", "mid"]), name="other")
    perturb(model, "default", 1)
    perturb(model, "other", 2)
    lorafx.set_adapter(model, "default")
    return model.eval()


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_unmerged_and_multi_match_eager(variant, tmp_path):
    model = _two_adapters(CONFIGS[variant])
    x = torch.randn(4, 32)
    a, b = eager(model, x, "default"), eager(model, x, "other")
    assert np.abs(a - b).max() > 1e-2  # the two adapters really differ, so swapping is tested
    lorafx.set_adapter(model, "default")

    to_onnx(model, x, tmp_path / "u", mode="unmerged")
    sess = AdapterSession(tmp_path / "u")
    x2 = torch.randn(7, 32)  # another batch size: the batch axis is dynamic
    close(sess.run({"input": x}, adapter="default")["output"], a)
    close(sess.run({"input": x}, adapter="other")["output"], b)
    close(sess.run({"input": x2}, adapter="other")["output"], eager(model, x2, "other"))
    # lorafx's own adapter directory, read without the model, feeds the same graph
    lorafx.save_adapter(model, tmp_path / "saved", name="other")
    sess.load_adapter(tmp_path / "saved", name="reloaded")
    close(sess.run({"input": x}, adapter="reloaded")["output"], b)

    to_onnx(model, x, tmp_path / "m", mode="multi")
    multi = AdapterSession(tmp_path / "m")
    rows = ["other", "default", "default", "other"]
    got = multi.run({"input": x}, adapter=rows)["output"]
    for i, name in enumerate(rows):
        close(got[i : i + 1], {"default": a, "other": b}[name][i : i + 1])


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_merged_matches_eager_or_refuses(variant, tmp_path):
    base = tiny_mlp()
    torch.manual_seed(0)
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(CONFIGS[variant], targets=["up", "mid"]))
    perturb(model, "default", 1)
    model.eval()
    x = torch.randn(3, 32)
    if not CONFIGS[variant].mergeable():
        with pytest.raises(NotMergeableError, match="unmerged"):
            to_onnx(model, x, tmp_path / "merged", mode="merged")
        return
    res = to_onnx(model, x, tmp_path / "merged", mode="merged")
    close(AdapterSession(tmp_path / "merged").run({"input": x})["output"], eager(model, x, None))
    plain = to_onnx(base, x, tmp_path / "base", mode="merged")
    assert op_types(res.onnx_path) == op_types(plain.onnx_path)


def test_gated_sites_export_their_router_as_graph_inputs(tmp_path):
    model = _two_adapters(GatedForTests(r=4))
    res = to_onnx(model, torch.randn(2, 32), tmp_path, mode="unmerged")
    site = next(s for s in res.manifest["sites"] if s["site"] == "up")
    assert site["form"] == "params" and "up.router" in site["tensors"]
    assert "Softmax" in op_types(res.onnx_path)
    assert form_of(lorafx.iter_sites(model)["up"].adapters["default"]) == "params"


def test_size_one_example_axis_is_a_clear_error(tmp_path):
    from lorafx.errors import ExportError

    with pytest.raises(ExportError, match="batch and sequence >= 2"):
        to_onnx(tiny_mlp(), torch.randn(1, 32), tmp_path, mode="merged")
