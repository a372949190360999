"""Issue 15 item 6: the CLI at a 100-column terminal, ``--version``, ``export``'s documented default,
``--rank`` checks, bad paths and missing extras as one line (exit 2), and the LICENSE in the wheel.

Everything runs in-process (``lorafx.cli.main``): a subprocess costs 4-17 s each on this shared
machine. A missing optional module is simulated by putting ``None`` in ``sys.modules`` for it and
its submodules, which makes every later ``import`` of it raise ModuleNotFoundError exactly as when
it is not installed (the CLI imports its optional modules lazily, and ``test_import_lorafx_stays_lean``
keeps ``import lorafx`` free of them).
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import lorafx
from lorafx.cli import main
from lorafx.cli.inspect_cmd import _COLUMNS, _DROP_ORDER, fit_columns
from lorafx.cli.models import llama_config, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorafx {command}: error: "), err
    return lines[0]


# -- inspect at the terminal's width ---------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 100])
def test_inspect_table_fits_the_terminal(width, capsys, monkeypatch):
    argv = ["inspect", "demo:tiny-llama", "--variant", "capaboost", "--targets", "q_proj,up_proj"]
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│├└"]
    assert table and max(len(line) for line in table) <= width, "\n".join(table)
    assert max(len(line) for line in out.splitlines()) <= width  # the summary lines wrap too
    header = next(line for line in table if line.startswith("┃") and "site" in line)
    shown = [c.strip() for c in header.strip("┃").split("┃")]
    dropped = [name for name, _ in _COLUMNS if name not in shown]
    assert {"site", "variant", "R"} <= set(shown) and dropped
    assert f"columns left out to fit {width} columns: {', '.join(dropped)}" in " ".join(out.split())
    # the columns kept still show the report's numbers, which --format json has in full
    code, js, _ = run_main(capsys, *argv, "--format", "json")
    sites = {s["fqn"]: s for s in json.loads(js)["sites"] if s["matched"]}
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("│").split("│")] for line in table if line[0] == "│")}
    for fqn, s in sites.items():
        row = dict(zip(shown, rows[fqn], strict=True))
        assert row["R"] == str(s["rank"]) and row["variant"] == "capaboost"
        if "params" in row:
            assert row["params"] == f"{s['params']:,}"


def test_inspect_wide_terminal_keeps_every_column(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_main(capsys, "inspect", "demo:tiny-llama", "--targets", "q_proj")
    assert code == 0 and "columns left out" not in out
    header = next(line for line in out.splitlines() if line.startswith("┃") and "site" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")] == [name for name, _ in _COLUMNS]
    assert out.startswith("demo:tiny-llama (LlamaForCausalLM): 2 of 16 sites adapted")


def test_fit_columns_drops_in_order_and_keeps_site_variant_rank():
    widths = {name: 10 for name, _ in _COLUMNS}  # 12 columns x (10 + 3) + 1 = 157 wide
    assert fit_columns(widths, 157) == [name for name, _ in _COLUMNS]
    assert fit_columns(widths, 156) == [n for n, _ in _COLUMNS if n != _DROP_ORDER[0]]
    assert fit_columns(widths, 20) == ["site", "variant", "R"]  # never fewer; rich truncates the rest


def test_config_without_architectures_says_it_built_the_base_model(tmp_path, capsys):
    cfg = llama_config()
    cfg.architectures = None
    cfg.save_pretrained(tmp_path)
    code, out, err = run_main(capsys, "inspect", str(tmp_path), "--targets", "q_proj", "--format", "json")
    assert code == 0
    assert json.loads(out)["model"] == "LlamaModel"
    assert err.strip() == (
        f"lorafx: note: {tmp_path / 'config.json'} names no `architectures`: built the bare base model LlamaModel "
        "(no task head)"
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path)
    code, out, err = run_main(capsys, "inspect", str(tmp_path), "--targets", "q_proj", "--format", "json")
    assert json.loads(out)["model"] == "LlamaForCausalLM" and "note" not in err


# -- version, export defaults, --rank -------------------------------------------------------------


def test_version_matches_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    version = _pyproject()["project"]["version"]
    assert (
        e.value.code == 0 and capsys.readouterr().out.strip() == f"lorafx {version}" == f"lorafx {lorafx.__version__}"
    )


def test_export_without_spec_flags_uses_the_documented_default(tmp_path, capsys):
    code, out, err = run_main(capsys, "export", "demo:mlp", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "adding the default spec, lora on all-linear sites" in out
    manifest = json.loads((tmp_path / "o" / "lorafx_export.json").read_text())
    reference = lorafx.apply(tiny_mlp(), lorafx.Spec(lorafx.LoRA(), targets="all-linear"))
    assert {s["site"] for s in manifest["sites"]} == set(lorafx.iter_sites(reference)) == {"up", "mid", "head"}
    for s in manifest["sites"]:  # fresh LoRA at its default rank on each
        assert s["variant"] == "lora" and s["tensors"][f"{s['site']}.A"]["shape"][0] == lorafx.LoRA().r


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "2"], "site 'up': rank=2 is below the adapter's rank 4; pass rank >= 4"),
        (["--rank", "0"], "--rank 0: it must be at least 1"),
        (["--rank", "8", "--mode", "merged"], "--rank 8: a merged export has no adapter inputs"),
    ],
)
def test_export_rank_below_the_adapter_is_an_error(extra, message, tmp_path, capsys):
    argv = ["export", "demo:mlp", "--r", "4", "--targets", "up,mid", "--out", str(tmp_path / "o"), *extra]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and message in one_error_line(err, "export")
    assert not (tmp_path / "o").exists()


def test_to_onnx_rank_below_the_adapter_is_an_error(tmp_path):
    from lorafx.export import to_onnx

    model = lorafx.apply(tiny_mlp(), lorafx.Spec(lorafx.LoRA(r=4), targets=["mid"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorafx.ExportError, match=r"site 'mid': rank=3 is below the adapter's rank 4"):
        to_onnx(model, (torch.randn(2, 32),), tmp_path / "o", mode="unmerged", rank=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- bad paths: one line, exit 2 ------------------------------------------------------------------


def _paths(tmp: Path) -> None:
    (tmp / "afile").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "noconfig").mkdir()
    (tmp / "badconfig").mkdir()
    (tmp / "badconfig" / "config.json").write_text("{not json")


BAD_PATHS = [
    (
        ["export", "demo:mlp", "--out", "{tmp}/afile/sub/o"],
        "{tmp}/afile/sub: cannot create the directory ({tmp}/afile is a file",
    ),
    (["export", "demo:mlp", "--out", "{tmp}/afile"], "{tmp}/afile: exists and is not a directory"),
    (
        ["export", "demo:mlp", "--adapter", "{tmp}/missing", "--out", "{tmp}/o"],
        "{tmp}/missing/lorafx_adapter.json: no such file",
    ),
    (
        ["export", "demo:mlp", "--adapter", "{tmp}/empty", "--out", "{tmp}/o"],
        "{tmp}/empty/lorafx_adapter.json: no such file",
    ),
    (
        ["export", "demo:mlp", "--peft", "{tmp}/missing", "--out", "{tmp}/o"],
        "{tmp}/missing/adapter_config.json: no such file",
    ),
    (["inspect", "{tmp}/noconfig"], "{tmp}/noconfig: no config.json"),
    (["inspect", "{tmp}/badconfig"], "{tmp}/badconfig: transformers cannot load it"),
    (["inspect", "demo:mlp", "--dot", "{tmp}/afile/x.dot"], "{tmp}/afile/x.dot: cannot write (Not a directory)"),
]


@pytest.mark.parametrize("argv, message", BAD_PATHS, ids=[" ".join(a[:1] + a[2:4]) for a, _ in BAD_PATHS])
def test_bad_path_is_one_line(argv, message, tmp_path, capsys):
    _paths(tmp_path)
    code, _, err = run_main(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message.format(tmp=tmp_path) in one_error_line(err, argv[0])


def test_an_unforeseen_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    # e.g. a directory root may not read (as on /proc/1/root): whatever check missed it, no traceback
    def unreadable(source, seed=0):
        raise PermissionError(13, "Permission denied", source)

    monkeypatch.setattr("lorafx.cli.sources.load_model", unreadable)
    monkeypatch.setattr("lorafx.cli.export_cmd.load_model", unreadable)
    code, _, err = run_main(capsys, "inspect", str(tmp_path))
    assert code == 2 and one_error_line(err, "inspect") == f"lorafx inspect: error: {tmp_path}: Permission denied"
    code, _, err = run_main(capsys, "export", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and one_error_line(err, "export") == f"lorafx export: error: {tmp_path}: Permission denied"


# -- a missing optional dependency names its extra --------------------------------------------------


def _uninstall(monkeypatch, module: str) -> None:
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")] or [module]:
        monkeypatch.setitem(sys.modules, name, None)


MISSING = [
    ("onnx", ["export", "demo:mlp", "--out", "{tmp}/o"], "onnx"),
    ("onnxscript", ["export", "demo:mlp", "--out", "{tmp}/o"], "onnx"),
    ("transformers", ["inspect", "demo:tiny-llama"], "hf"),
    ("transformers", ["demo", "--steps", "1"], "hf"),
    ("onnxruntime", ["demo", "--steps", "1", "--variants", "lora"], "onnx"),
    ("rich", ["inspect", "demo:mlp"], "cli"),
]


@pytest.mark.parametrize("module, argv, extra", MISSING, ids=[f"{m}-{a[0]}" for m, a, _ in MISSING])
def test_missing_extra_says_what_to_install(module, argv, extra, tmp_path, capsys, monkeypatch):
    _uninstall(monkeypatch, module)
    code, out, err = run_main(capsys, *[a.format(tmp=tmp_path) for a in argv])
    line = one_error_line(err, argv[0])
    assert code == 2 and f"pip install 'lorafx[{extra}]'" in line and module in line
    assert not (tmp_path / "o").exists()  # refused before any work


def test_every_extra_named_exists_in_pyproject():
    from lorafx.cli.extras import EXTRA_OF

    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)
    for module, extra in EXTRA_OF.items():  # the extra really lists the distribution of that module
        dist = {"yaml": "pyyaml", "onnxruntime_genai": "onnxruntime-genai"}.get(module, module)
        assert any(req.lower().startswith(dist) for req in extras[extra]), (module, extra)


# -- packaging -------------------------------------------------------------------------------------


def test_wheel_ships_the_apache_license(tmp_path, monkeypatch):
    from setuptools import build_meta

    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside pyproject.toml
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lorafx", src / "lorafx", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(src)
    wheel = tmp_path / "dist" / build_meta.build_wheel(str(tmp_path / "dist"))
    with zipfile.ZipFile(wheel) as z:
        licenses = [n for n in z.namelist() if n.endswith("/LICENSE")]
        assert licenses == [f"lorafx-{lorafx.__version__}.dist-info/licenses/LICENSE"]
        assert z.read(licenses[0]).decode() == text
        metadata = z.read(f"lorafx-{lorafx.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
