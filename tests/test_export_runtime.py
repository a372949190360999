"""Two onnxruntime distributions in one environment are refused by name (the metadata lookup faked)."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from lorafx.cli.models import tiny_mlp
from lorafx.errors import ExportError
from lorafx.export import runtime, to_onnx


def _fake(versions: dict[str, str]):
    def version(name: str) -> str:
        if name in versions:
            return versions[name]
        raise metadata.PackageNotFoundError(name)

    return version


def test_both_onnxruntime_packages_are_refused_before_export(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.metadata, "version", _fake({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}))
    with pytest.raises(
        ExportError,
        match=r"onnxruntime==1\.32\.0 and onnxruntime-gpu==1\.32\.0.*pip uninstall -y onnxruntime onnxruntime-gpu",
    ):
        to_onnx(tiny_mlp(), torch.randn(2, 32), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "versions",
    [{"onnxruntime": "1.32.0", "onnxruntime-genai": "0.18.0"}, {"onnxruntime-gpu": "1.32.0"}, {}],
)
def test_one_of_each_is_accepted(versions, monkeypatch):
    monkeypatch.setattr(runtime.metadata, "version", _fake(versions))
    runtime.require_one_onnxruntime()  # no error


def test_genai_pair_is_refused(monkeypatch):
    monkeypatch.setattr(
        runtime.metadata, "version", _fake({"onnxruntime-genai": "0.18", "onnxruntime-genai-cuda": "0.18"})
    )
    with pytest.raises(ExportError, match="onnxruntime-genai==0.18 and onnxruntime-genai-cuda==0.18"):
        runtime.require_one_onnxruntime()


def test_this_environment_has_one():
    assert runtime.installed("onnxruntime") is not None
    runtime.require_one_onnxruntime()
