"""save_adapter / load_adapter: exact round trip, strict validation, model untouched on error."""

import copy
import json

import pytest
import torch
from model_state import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file

import lorafx
from lorafx.adapter_files import CONFIG, WEIGHTS
from lorafx.cli.models import tiny_llama

SPEC = lorafx.Spec(
    lorafx.LoRA(r=4, alpha=8, init="random"), targets=["q_proj", "up_proj"], overrides={"up_proj": {"r": 2}}
)


@pytest.fixture
def saved(tmp_path):
    model = lorafx.apply(tiny_llama(0), SPEC)
    lorafx.save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def test_round_trip_reproduces_outputs_exactly(saved):
    model, path = saved
    meta = json.loads((path / CONFIG).read_text())
    assert meta["spec"]["config"]["variant"] == "lora" and meta["name"] == "default"
    assert set(load_file(path / WEIGHTS)) == {
        f"model.layers.{i}.{s}.{p}"
        for i in (0, 1)
        for s in ("self_attn.q_proj", "mlp.up_proj")
        for p in ("lora_A", "lora_B")
    }
    fresh = lorafx.load_adapter(tiny_llama(0), path)
    ids = torch.randint(0, 256, (2, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


def test_load_as_second_named_adapter(saved):
    model, path = saved
    other = lorafx.apply(tiny_llama(0), lorafx.Spec(lorafx.LoRA(r=2), targets=["v_proj"]), name="mine")
    other = lorafx.load_adapter(other, path, name="loaded")
    assert lorafx.adapter_names(other) == ["mine", "loaded"]
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(other(ids).logits, model(ids).logits)  # "mine" has B = 0


def _rewrite(path, edit):
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.lora_B"), ["missing keys", "model.layers.1.mlp.up_proj.lora_B"]),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.lora_C": torch.zeros(1)}), ["unexpected keys", "lora_C"]),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(3, 64)}),
            ["model.layers.0.self_attn.q_proj.lora_A", "shape [3, 64]", "[4, 64]"],
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 64, dtype=torch.int32)}),
            ["dtype torch.int32"],
        ),
    ],
)
def test_bad_files_name_the_key_and_leave_the_model_unchanged(saved, edit, words):
    _, path = saved
    _rewrite(path, edit)
    target = tiny_llama(0)
    before = snapshot(target)
    with pytest.raises(lorafx.AdapterFileError) as info:
        lorafx.load_adapter(target, path)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert_unchanged(before, target)
    assert "_lorafx" not in target.__dict__


def test_adapter_for_another_base_model_is_refused(saved):
    _, path = saved
    wider = tiny_llama(0, hidden=32, intermediate=64)
    with pytest.raises(lorafx.AdapterFileError, match="different base model|shape"):
        lorafx.load_adapter(wider, path)


def test_truncated_file_and_missing_files(saved, tmp_path):
    _, path = saved
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(lorafx.AdapterFileError, match="cannot read safetensors"):
        lorafx.load_adapter(tiny_llama(0), path)
    with pytest.raises(lorafx.AdapterFileError, match="no such file"):
        lorafx.load_adapter(tiny_llama(0), tmp_path / "nowhere")


def test_save_is_independent_of_the_live_model(saved):
    model, path = saved
    copy_before = copy.deepcopy(load_file(path / WEIGHTS))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    assert all(torch.equal(copy_before[k], v) for k, v in load_file(path / WEIGHTS).items())
