"""``to_onnx`` given a ``.onnx`` path: that file, the manifest and adapters beside it, nothing else touched."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

import lorafx
from lorafx.cli.models import tiny_mlp
from lorafx.errors import ExportError
from lorafx.export import AdapterSession, to_onnx
from tests.export_helpers import close, eager


def _model():
    torch.manual_seed(0)
    return lorafx.apply(tiny_mlp(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["up", "mid"])).eval()


def test_onnx_path_writes_that_file_beside_other_files(tmp_path):
    model, x = _model(), torch.randn(3, 32)
    (tmp_path / "notes.txt").write_text("mine")
    res = to_onnx(model, x, tmp_path / "mlp.onnx", mode="merged")
    assert res.onnx_path == tmp_path / "mlp.onnx" and res.directory == tmp_path
    x2 = torch.randn(5, 32)
    got = ort.InferenceSession(str(tmp_path / "mlp.onnx")).run(None, {"input": x2.numpy()})[0]
    close(got, eager(model, x2, None))
    assert json.loads((tmp_path / "lorafx_export.json").read_text())["model"] == "mlp.onnx"
    # re-export unmerged to the same file: replaces its own names, adds adapters/, keeps notes.txt
    to_onnx(model, x, tmp_path / "mlp.onnx", mode="unmerged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "lorafx_export.json", "mlp.onnx", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    close(AdapterSession(tmp_path).run({"input": x2})["output"], eager(model, x2, "default"))
    # the session opens from the file path too (the folder holds the manifest beside it)
    close(AdapterSession(tmp_path / "mlp.onnx").run({"input": x2})["output"], eager(model, x2, "default"))
    # back to merged: the stale adapters/ of the earlier export to this file goes
    to_onnx(model, x, tmp_path / "mlp.onnx", mode="merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lorafx_export.json", "mlp.onnx", "notes.txt"]


def test_onnx_path_never_replaces_what_is_not_its_own(tmp_path):
    model, x = _model(), torch.randn(3, 32)
    to_onnx(model, x, tmp_path / "a.onnx", mode="merged")
    before = (tmp_path / "a.onnx").read_bytes()
    with pytest.raises(ExportError, match=r"lorafx_export\.json: belongs to another export \(not of b\.onnx\)"):
        to_onnx(model, x, tmp_path / "b.onnx", mode="merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "lorafx_export.json"]
    assert (tmp_path / "a.onnx").read_bytes() == before
    mine = tmp_path / "other"
    (mine / "adapters" / "my_lora").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"adapters: exists and is not an earlier export's adapters"):
        to_onnx(model, x, mine / "m.onnx", mode="unmerged")
    assert [p.name for p in mine.iterdir()] == ["adapters"]


def test_onnx_path_failed_export_leaves_folder_untouched(tmp_path, monkeypatch):
    model, x = _model(), torch.randn(3, 32)
    to_onnx(model, x, tmp_path / "m.onnx", mode="merged")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr("lorafx.export.exporter.run_exporter", boom)
    with pytest.raises(RuntimeError, match="exporter failed"):
        to_onnx(model, x, tmp_path / "m.onnx", mode="unmerged")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
