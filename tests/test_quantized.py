"""Quantized bases (QLoRA): bitsandbytes 4-bit/8-bit and torchao int8 weight-only sites (issue: QLoRA
items 1 and 3). References are PEFT on identical weights, or computed by hand from ``dequant(Wq)``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import bnb_llama, fresh, save_tiny_llama, torchao_llama
from tolerances import MERGED_LOGITS_FP32, TORCHAO_INT8_REQUANT_LOGITS, assert_close
from torch import nn

import lorafx
from lorafx.errors import NotMergeableError, SpecError
from lorafx.quantized import dense_linear, dequantized_weight

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def nf4(llama_dir):
    return bnb_llama(llama_dir, "nf4-dq")


def adapt(base, targets="all-linear", **kw):
    return lorafx.apply(fresh(base), lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random", **kw), targets=targets))


def test_bnb_linears_are_quantized_sites_with_their_own_forward(nf4):
    assert type(nf4.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = adapt(nf4)
    sites = lorafx.iter_sites(model)
    assert len(sites) == 14 and {sa.quantized for sa in sites.values()} == {"bnb-nf4"}
    up = sites["model.layers.0.mlp.up_proj"]
    a = up.adapters["default"]
    assert (a.in_features, a.out_features, a.lora_A.dtype) == (64, 128, torch.float32)
    assert "quantized_lora_linear" in model.model.layers[0].mlp.code  # LlamaMLP region: child kept
    q = model.model.layers[0].self_attn.q_proj  # single-linear region made from the Linear4bit
    assert "quantized_lora_linear" in q.code and "self.weight" not in q.code
    assert type(q.weight).__name__ == "Params4bit"  # base keys and tensors unchanged
    assert set(nf4.state_dict()) <= set(model.state_dict()) | {
        k for k in nf4.state_dict() if "self_attn" in k and not k.endswith(("weight", "bias"))
    }
    report = lorafx.build_report(fresh(nf4), lorafx.Spec(lorafx.LoRA(r=4), targets="all-linear"))
    assert {r.fqn: r.quantized for r in report.sites}["model.layers.0.mlp.up_proj"] == "bnb-nf4"
    assert {r.fqn: r.quantized for r in report.sites}["lm_head"] is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lorafx." in n for n in trainable)


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8"])
def test_logits_and_adapter_grads_match_peft(llama_dir, kind):
    base = bnb_llama(llama_dir, kind)
    fx_model = adapt(base)
    peft_model = peft.get_peft_model(fresh(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for sa in lorafx.iter_sites(fx_model).values():
            layer = peft_model.base_model.model.get_submodule(sa.site)
            assert "bnb" in type(layer).__module__  # PEFT's own bitsandbytes layer
            layer.lora_A["default"].weight.copy_(sa.adapters["default"].lora_A)
            layer.lora_B["default"].weight.copy_(sa.adapters["default"].lora_B)
    out, ref = fx_model(IDS, labels=IDS), peft_model(IDS, labels=IDS)
    assert_close(out.logits, ref.logits)
    assert (out.logits - fresh(base)(IDS).logits).abs().max() > 1e-3  # the adapter really acts
    out.loss.backward()
    ref.loss.backward()
    for sa in lorafx.iter_sites(fx_model).values():
        layer = peft_model.base_model.model.get_submodule(sa.site)
        assert_close(sa.adapters["default"].lora_A.grad, layer.lora_A["default"].weight.grad)
        assert_close(sa.adapters["default"].lora_B.grad, layer.lora_B["default"].weight.grad)


def test_to_peft_and_from_peft_round_trip(nf4, tmp_path):
    model = adapt(nf4, ["q_proj", "v_proj", "down_proj"])
    lorafx.to_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(fresh(nf4), tmp_path / "peft").train()  # (it loads in eval)
    back = lorafx.from_peft(fresh(nf4), tmp_path / "peft")
    assert {sa.quantized for sa in lorafx.iter_sites(back).values()} == {"bnb-nf4"}
    with torch.no_grad():
        ref = model(IDS).logits
        assert_close(loaded(IDS).logits, ref)
        assert torch.equal(back(IDS).logits, ref)


def test_merge_is_refused_with_the_two_correct_paths(nf4):
    model = adapt(nf4, ["q_proj", "up_proj"])
    before = model(IDS).logits.detach()
    with pytest.raises(NotMergeableError, match=r"quantized base \(bnb-nf4\).*q_proj") as e:
        lorafx.merge(model)
    assert "merge_dequantized" in str(e.value) and "merge_requantized" in str(e.value)
    assert not lorafx.is_merged(model)
    assert torch.equal(model(IDS).logits, before)


def test_merge_dequantized_is_dequant_plus_delta_and_unmerge_restores(nf4):
    model = adapt(nf4, ["q_proj", "up_proj"])
    up = model.model.layers[0].mlp.up_proj
    sa = lorafx.iter_sites(model)["model.layers.0.mlp.up_proj"]
    expected = dequantized_weight(up) + sa.adapters["default"].delta_weight()
    unmerged = model(IDS).logits.detach()
    lorafx.merge_dequantized(model)
    merged_up = model.model.layers[0].mlp.up_proj
    assert type(merged_up) is nn.Linear and merged_up.weight.dtype == torch.float32
    assert torch.equal(merged_up.weight, expected)  # dequant(Wq) + ΔW, not the original W16
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float32 and q.weight.shape == (64, 64)
    assert_close(model(IDS).logits, unmerged, **MERGED_LOGITS_FP32)
    assert lorafx.is_merged(model)
    with pytest.raises(SpecError, match="already merged"):
        lorafx.merge_dequantized(model)
    lorafx.unmerge(model)
    assert model.model.layers[0].mlp.up_proj is up and type(q.weight).__name__ == "Params4bit"
    assert torch.equal(model(IDS).logits, unmerged)


def test_merge_and_unload_dequantize_returns_the_dense_model(nf4):
    """``merge_and_unload(model, dequantize=True)``: the base class back, every adapted 4-bit linear a
    plain ``nn.Linear`` holding ``dequant(Wq) + ΔW`` (not the original fp32 W + ΔW), outputs equal to the
    unmerged model, the dense model's state-dict keys. Without ``dequantize`` it refuses, unchanged."""
    from lorafx.cli.models import tiny_llama

    model = adapt(nf4)
    sites = lorafx.iter_sites(model)
    want = {f: dequantized_weight(sa.base) + sa.adapters["default"].delta_weight() for f, sa in sites.items()}
    unmerged = model(IDS).logits.detach()
    with pytest.raises(NotMergeableError, match=r"merge_and_unload\(model, dequantize=True\)"):
        lorafx.merge_and_unload(model)
    assert not lorafx.is_merged(model) and torch.equal(model(IDS).logits, unmerged)
    merged = lorafx.merge_and_unload(model, dequantize=True)
    w16 = tiny_llama(0)  # the weights nf4 was quantized from
    assert type(merged) is type(nf4) and set(merged.state_dict()) == set(w16.state_dict())
    assert not any("bitsandbytes" in type(m).__module__ or "lorafx" in type(m).__module__ for m in merged.modules())
    for fqn, w in want.items():
        layer = merged.get_submodule(fqn)
        assert type(layer) is nn.Linear and not layer.weight.requires_grad and torch.equal(layer.weight, w), fqn
        wrong = w16.get_submodule(fqn).weight + sites[fqn].adapters["default"].delta_weight()
        assert (layer.weight - wrong).abs().max() > 1e-3, fqn  # W16 + ΔW differs by the 4-bit rounding (~8e-3)
    assert_close(merged(IDS).logits, unmerged, **MERGED_LOGITS_FP32)


def test_merge_and_unload_dequantize_on_torchao_and_after_requantize():
    base = torchao_llama()
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear"))
    unmerged = model(IDS).logits.detach()
    merged = lorafx.merge_and_unload(model, dequantize=True)
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and type(q.weight) is nn.Parameter
    assert_close(merged(IDS).logits, unmerged, **MERGED_LOGITS_FP32)


def test_merge_and_unload_dequantize_refuses_a_requantized_merge(nf4):
    model = adapt(nf4, ["up_proj"])
    lorafx.merge_requantized(model)
    requantized = model.model.layers[0].mlp.up_proj
    with pytest.raises(SpecError, match=r"merged by merge_requantized.*unmerge"):
        lorafx.merge_and_unload(model, dequantize=True)
    assert lorafx.is_merged(model) and model.model.layers[0].mlp.up_proj is requantized
    out = lorafx.merge_and_unload(model)  # keeps the requantized modules
    assert out.model.layers[0].mlp.up_proj is requantized


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_state_dict_keeps_every_bitsandbytes_entry_and_loads_as_bitsandbytes_does(llama_dir, kind):
    """The attention projections are single-linear regions that hold the packed weight themselves; their
    ``state_dict`` used to drop bitsandbytes' extra entries (4-bit quant state, 8-bit ``SCB``). Now every
    base key is there with the same values, and a strict load reports what bitsandbytes reports unadapted
    (int8: nothing; nf4: its quant-state entries, which only transformers' loader reads)."""
    base = bnb_llama(llama_dir, kind)
    want = base.state_dict()
    model = adapt(base)
    got = model.state_dict()
    assert {k for k in got if ".lorafx." not in k} == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    plain = fresh(base).load_state_dict(want, strict=False)
    other = adapt(base)
    loaded = other.load_state_dict(got, strict=False)
    assert sorted(loaded.unexpected_keys) == sorted(plain.unexpected_keys) and not loaded.missing_keys
    assert torch.equal(other(IDS).logits, model(IDS).logits)


def test_merge_requantized_reports_what_rounding_loses(nf4):
    model = adapt(nf4, ["q_proj", "up_proj"])
    unmerged = model(IDS).logits.detach()
    lost = lorafx.merge_requantized(model)
    assert len(lost) == 4 and all(0 < v < 1 for v in lost.values())
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.quant_type == "nf4"
    lorafx.unmerge(model)
    assert torch.equal(model(IDS).logits, unmerged)
    report = lorafx.verify_merge(model, IDS, quantized="requantize")
    # verify_merge runs in eval mode: on AVX512-BF16 CPUs bitsandbytes then repacks the weights with a
    # bf16 absmax (quant_helpers), which moves dequant(Wq) by up to 2^-9 relative: same ratio to ~1%
    assert report["dtype"] == "bnb-nf4" and report["delta_lost"] == pytest.approx(max(lost.values()), rel=1e-2)
    dq = lorafx.verify_merge(model, IDS, quantized="dequantize")
    assert dq["max_abs_diff"] < report["max_abs_diff"]
    assert not lorafx.is_merged(model)


def test_dequantize_reads_the_weight_bitsandbytes_repacked_for_its_cpu_kernel(nf4):
    layer = fresh(nf4).model.layers[0].mlp.down_proj
    before = dequantized_weight(layer)
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer.eval()(x)  # on AVX512-BF16 CPUs: repacked in place, absmax rounded to bf16
    after = dequantized_weight(layer)
    # bf16 absmax: relative rounding at most 2^-9 of each block's scale
    torch.testing.assert_close(after, before, atol=float(before.abs().max()) * 2**-8, rtol=0)
    assert torch.equal(dense_linear(layer).weight, after)


def test_the_hidden_base_follows_train_and_eval(nf4):
    model = lorafx.apply(copy.deepcopy(nf4).eval(), lorafx.Spec(lorafx.LoRA(r=4), targets=["q_proj"]))
    base = lorafx.iter_sites(model)["model.layers.0.self_attn.q_proj"].base
    assert type(base).__name__ == "Linear4bit" and not base.training
    model.train()
    assert base.training
    model.eval()
    assert not base.training


def test_celora_is_refused_on_a_quantized_base(nf4):
    with pytest.raises(SpecError, match="CE-LoRA needs the dense base weight.*bnb-nf4"):
        lorafx.apply(fresh(nf4), lorafx.Spec(lorafx.CELoRA(r=4), targets=["q_proj"]))


def test_adapted_bnb_model_pickles_and_deep_copies(nf4):
    model = adapt(nf4, ["q_proj", "up_proj"])
    ref = model(IDS).logits.detach()
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert torch.equal(other(IDS).logits, ref)
        assert lorafx.iter_sites(other)["model.layers.0.mlp.up_proj"].base is other.model.layers[0].mlp.up_proj


def test_torchao_int8_weight_only_sites():
    base = torchao_llama()
    model = lorafx.apply(
        copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets="all-linear")
    )
    sa = lorafx.iter_sites(model)["model.layers.0.self_attn.q_proj"]
    assert sa.quantized == "torchao-Int8Tensor" and sa.base is None  # F.linear dispatches through the subclass
    q, a = model.model.layers[0].self_attn.q_proj, sa.adapters["default"]
    x = torch.randn(3, 64)
    hand = F.linear(x, q.weight) + a.scale * (x @ a.lora_A.T) @ a.lora_B.T
    assert_close(q(x), hand)
    unmerged = model(IDS).logits.detach()
    with pytest.raises(NotMergeableError, match="torchao-Int8Tensor"):
        lorafx.merge(model)
    aqt = q.weight
    lost = lorafx.merge_requantized(model)  # Q(dequant(Wq) + ΔW) with Int8WeightOnlyConfig() again
    assert len(lost) == 14 and all(0 < v < 1 for v in lost.values())
    requant = q.weight
    assert type(requant).__name__ == "Int8Tensor" and requant is not aqt
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    by_hand = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        by_hand.weight.copy_(dequantized_weight_of(aqt) + a.delta_weight())
    quantize_(by_hand, Int8WeightOnlyConfig(set_inductor_config=False))
    assert torch.equal(dequantized_weight_of(requant), dequantized_weight_of(by_hand.weight))
    assert_close(model(IDS).logits, unmerged, **TORCHAO_INT8_REQUANT_LOGITS)
    lorafx.unmerge(model)
    assert q.weight is aqt
    lorafx.merge_dequantized(model)
    assert type(q.weight) is nn.Parameter and torch.equal(q.weight, dequantized_weight_of(aqt) + a.delta_weight())
    assert_close(model(IDS).logits, unmerged, **MERGED_LOGITS_FP32)
    lorafx.unmerge(model)
    assert q.weight is aqt and torch.equal(model(IDS).logits, unmerged)


def dequantized_weight_of(weight):
    return weight.dequantize().float()


def test_biased_bnb_linears_in_a_traced_model():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    q4 = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q8 = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    q4.load_state_dict(dense[0].state_dict())
    q8.load_state_dict(dense[2].state_dict())
    base = nn.Sequential(q4.to("cpu"), nn.ReLU(), q8.to("cpu"))
    model = lorafx.apply(base, lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets=["0", "2"]))
    assert {sa.quantized for sa in lorafx.iter_sites(model).values()} == {"bnb-nf4", "bnb-int8"}
    x = torch.randn(5, 64)
    a0, a2 = (lorafx.iter_sites(model)[k].adapters["default"] for k in ("0", "2"))
    h = torch.relu(q4(x) + a0.scale * (x @ a0.lora_A.T) @ a0.lora_B.T)
    hand = q8(h) + a2.scale * (h @ a2.lora_A.T) @ a2.lora_B.T
    out = model(x)
    assert_close(out, hand)
    lorafx.merge_dequantized(model)
    first, last = model.get_submodule("0"), model.get_submodule("2")
    assert type(first) is nn.Linear and torch.equal(first.bias, q4.bias) and torch.equal(last.bias, q8.bias.float())
    assert_close(model(x), out, **MERGED_LOGITS_FP32)
    lorafx.unmerge(model)
    assert model.get_submodule("0") is q4 and model.get_submodule("2") is q8
    assert torch.equal(model(x), out)


def test_adapter_files_and_a_second_adapter_on_a_quantized_base(nf4, tmp_path):
    model = adapt(nf4, ["q_proj", "up_proj"])
    lorafx.save_adapter(model, tmp_path / "a")
    again = lorafx.load_adapter(fresh(nf4), tmp_path / "a")
    assert torch.equal(again(IDS).logits, model(IDS).logits)
    lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["q_proj"]), name="b")
    lorafx.set_adapter(model, "b")
    assert lorafx.iter_sites(model)["model.layers.0.self_attn.q_proj"].quantized == "bnb-nf4"
    b_out = model(IDS).logits
    lorafx.delete_adapter(model, "default")
    assert torch.equal(model(IDS).logits, b_out)
