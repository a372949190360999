"""``AdapterSession.run`` without ``adapter=``: the export's only adapter, never the base model silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorafx
from lorafx.cli.models import TinyMLP
from lorafx.export import AdapterSession, to_onnx


def test_run_without_adapter_uses_the_only_adapter_and_refuses_to_guess(tmp_path):
    torch.manual_seed(0)
    model = lorafx.apply(TinyMLP(8, 8, 4), lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["up", "mid"]))
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x).numpy()
    to_onnx(model, x, tmp_path / "one", mode="unmerged")
    sess = AdapterSession(tmp_path / "one")
    np.testing.assert_allclose(sess.run({"input": x})["output"], want, atol=1e-5)  # was the base model
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["up"]), name="b")
    to_onnx(model, x, tmp_path / "two", mode="unmerged")
    with pytest.raises(lorafx.ExportError, match=r"holds adapters \['b', 'default'\].*adapter=None"):
        AdapterSession(tmp_path / "two").run({"input": x})
