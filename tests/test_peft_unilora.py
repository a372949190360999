"""Uni-LoRA checkpoints both ways with PEFT 0.21's own ``UniLoraConfig``: the same logits, indices and
scales (issue 15 item 5)."""

from __future__ import annotations

import json

import pytest
import torch

import lorafx
from lorafx.cli.models import tiny_llama
from tests.tolerances import assert_close

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' notices while PEFT wraps

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_unilora(save_indices: bool):
    from peft import UniLoraConfig, get_peft_model

    torch.manual_seed(0)
    # init_weights=False: θ ~ N(0, 1), so the adapter moves the logits far from the base model's
    config = UniLoraConfig(
        r=4, theta_d_length=500, proj_seed=3, target_modules=TARGETS, save_indices=save_indices, init_weights=False
    )
    return get_peft_model(tiny_llama(), config).eval()


@pytest.mark.parametrize("save_indices", [False, True])
def test_from_peft_unilora_equals_peft(save_indices, tmp_path):
    pm = peft_unilora(save_indices)
    pm.save_pretrained(tmp_path)
    model = lorafx.from_peft(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        want = pm(IDS).logits
        assert_close(model(IDS).logits, want)
        assert (want - tiny_llama()(IDS).logits).abs().max() > 0.1  # the adapter changes the output
    for fqn, sa in lorafx.iter_sites(model).items():
        layer = pm.base_model.model.get_submodule(fqn)
        a = sa.adapters["default"]
        assert torch.equal(a.idx_A, layer.unilora_indices_A["default"])
        assert torch.equal(a.idx_B, layer.unilora_indices_B["default"])
        assert_close(a.scale_B, layer.unilora_scales_B["default"])
        assert_close(a.delta_weight(), layer.get_delta_weight("default"))
    assert len(lorafx.iter_sites(model)) == 6
    assert lorafx.iter_sites(model)["model.layers.0.mlp.down_proj"].adapters["default"].config == lorafx.UniLoRA(
        r=4, vector_length=500, seed=3
    )


def test_to_peft_unilora_loads_in_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    spec = lorafx.Spec(lorafx.UniLoRA(r=2, vector_length=300, seed=5, init_bound=0.5), targets=["k_proj", "up_proj"])
    model = lorafx.apply(tiny_llama(), spec).eval()
    lorafx.to_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["theta_d_length"], cfg["proj_seed"]) == ("UNILORA", 2, 300, 5)
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        want = model(IDS).logits
        assert_close(pm(IDS).logits, want)
        assert (want - tiny_llama()(IDS).logits).abs().max() > 0.05
    # and back: lorafx reads what it wrote, through PEFT's format
    again = lorafx.from_peft(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, want)


def test_unsupported_unilora_config_is_refused_by_name(tmp_path):
    pm = peft_unilora(False)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "layers_to_transform": [0]}))
    base = tiny_llama()
    with pytest.raises(
        lorafx.AdapterFileError, match=r"adapter_config.json: layers_to_transform=\[0\] is not supported"
    ):
        lorafx.from_peft(base, tmp_path)
    assert not any(isinstance(m, lorafx.SiteAdapters) for m in base.modules())  # left unchanged
    path.write_text(json.dumps({**cfg, "theta_d_length": 501}))  # the vector in the file has 500 entries
    with pytest.raises(lorafx.AdapterFileError, match=r"lorafx_shared.unilora.theta.*shape \[500\].*\[501\]"):
        lorafx.from_peft(base, tmp_path)
    assert not any(isinstance(m, lorafx.SiteAdapters) for m in base.modules())


def test_cli_inspect_reads_a_peft_unilora_directory(tmp_path, capsys):
    from lorafx.cli import main

    pm = peft_unilora(False)
    pm.save_pretrained(tmp_path)
    assert main(["inspect", "demo:tiny-llama", "--peft", str(tmp_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["trainable_params"] == 500  # the one shared vector, theta_d_length
    matched = sorted(s["fqn"] for s in report["sites"] if s["matched"])
    assert matched == sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "unilora_indices_A"))
    assert {s["variant"] for s in report["sites"] if s["matched"]} == {"unilora"}
