"""nn.MultiheadAttention as a site: in_proj_weight and out_proj.weight adapted inside the module's own
computation (its eval fast path included), checked against hand-written weights, PEFT 0.21, merge,
compile and ONNX."""

import copy

import pytest
import torch
from tolerances import ONNX_FP32, assert_close
from torch import nn

import lorafx
from lorafx.errors import SpecError

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dropout=dropout)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.attn(x, x, x, need_weights=False)[0])


def _x(seed=0):
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed))


def _adapted(base, targets=("attn",)):
    return lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=2, alpha=4.0, init="random"), list(targets)))


def _by_hand(base, fx_model, out_factor=1.0):
    """The base module with W_in + s·BA and W_out + out_factor·s·BA written into its weights."""
    sites = lorafx.iter_sites(fx_model)
    a_in, a_out = sites["attn"].adapters["default"], sites["attn.out_proj"].adapters["default"]
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.attn.in_proj_weight += 2.0 * a_in.lora_B @ a_in.lora_A
        ref.attn.out_proj.weight += out_factor * 2.0 * a_out.lora_B @ a_out.lora_A
    return ref


def test_targeting_the_module_adapts_in_proj_and_out_proj_as_written_by_hand():
    torch.manual_seed(0)
    base = Block()
    fx_model = _adapted(base)
    sites = lorafx.iter_sites(fx_model)
    assert set(sites) == {"attn", "attn.out_proj"}
    assert sites["attn"].adapters["default"].lora_B.shape == (24, 2)  # in_proj_weight [3E, E]
    x = _x()
    out = fx_model(x)
    assert (out - base(x)).abs().max() > 1e-2
    assert_close(out, _by_hand(base, fx_model)(x))
    fx_model.eval()  # nn.MultiheadAttention's eval fast path (no grad) runs on the adapted weights
    with torch.no_grad():
        assert_close(fx_model(x), _by_hand(base, fx_model).eval()(x))
        lorafx.merge(fx_model)
        assert_close(fx_model(x), out)
        lorafx.unmerge(fx_model)


def test_peft_checkpoints_round_trip_and_in_proj_matches_peft(tmp_path):
    torch.manual_seed(0)
    base = Block()
    fx_model = _adapted(base)
    x = _x()
    lorafx.to_peft(fx_model, tmp_path)
    back = lorafx.from_peft(copy.deepcopy(base), tmp_path)
    assert_close(back(x), fx_model(x))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    # PEFT 0.21's unmerged MultiheadAttention forward adds out_proj's ΔW twice (its merge writes W + ΔW,
    # then calls out_proj.merge, which adds ΔW again): measured here against the hand-written weights.
    assert_close(peft_model(x), _by_hand(base, fx_model, out_factor=2.0)(x))
    with torch.no_grad():  # with out_proj's adapter at zero the two agree, gradients included
        lorafx.iter_sites(fx_model)["attn.out_proj"].adapters["default"].lora_B.zero_()
        peft_model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    assert_close(fx_model(x), peft_model(x))
    fx_model(x).square().sum().backward()
    peft_model(x).square().sum().backward()
    a_in = lorafx.iter_sites(fx_model)["attn"].adapters["default"]
    layer = peft_model.base_model.model.attn
    assert_close(a_in.lora_A.grad, layer.lora_A["default"].weight.grad)
    assert_close(a_in.lora_B.grad, layer.lora_B["default"].weight.grad)


def test_transformer_encoder_layer_fast_path_does_not_bypass_the_adapter():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    fx_model = lorafx.apply(copy.deepcopy(layer), lorafx.Spec(lorafx.LoRA(r=2, init="random"), ["self_attn"]))
    sa = lorafx.iter_sites(fx_model)
    a_in, a_out = sa["self_attn"].adapters["default"], sa["self_attn.out_proj"].adapters["default"]
    ref = copy.deepcopy(layer)
    s = a_in.scale
    with torch.no_grad():
        ref.self_attn.in_proj_weight += s * a_in.lora_B @ a_in.lora_A
        ref.self_attn.out_proj.weight += s * a_out.lora_B @ a_out.lora_A
        x = _x()
        assert (fx_model(x) - layer(x)).abs().max() > 1e-2
        assert_close(fx_model(x), ref(x))  # the reference takes PyTorch's fast path; lorafx's layer does not


@pytest.mark.slow  # ~35 s on 2 shared cores: one Dynamo compile and two ONNX exports
def test_compile_and_onnx():
    pytest.importorskip("onnxruntime")
    from lorafx.export import check_onnx

    torch.manual_seed(0)
    fx_model = _adapted(Block()).eval()
    x = _x()
    compiled = torch.compile(fx_model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), fx_model(x))
    for mode in ("merged", "unmerged"):
        assert check_onnx(fx_model, x, mode) < ONNX_FP32["atol"]


@pytest.mark.parametrize(
    "module, targets, why",
    [
        (nn.MultiheadAttention(8, 2, kdim=4, vdim=4), ["attn"], "separate q/k/v weights"),
        (nn.MultiheadAttention(8, 2), ["attn.out_proj"], "reads this weight directly"),
    ],
    ids=["kdim", "out_proj-alone"],
)
def test_unsupported_mha_uses_are_refused_by_name(module, targets, why):
    model = nn.Module()
    model.attn = module
    with pytest.raises(SpecError, match=rf"'attn.*{why}"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets))


def test_mor_is_refused_at_mha_sites():
    with pytest.raises(SpecError, match=r"'attn'.*variant 'mor' does not carry over to mha sites"):
        lorafx.apply(Block(), lorafx.Spec(lorafx.MoR(r=2, experts=2), ["attn"]))


def test_pickle_second_adapter_and_unload():
    torch.manual_seed(0)
    base = Block()
    fx_model = _adapted(base)
    x = _x()
    out = fx_model(x)
    keys = set(base.state_dict())
    assert keys <= set(fx_model.state_dict())  # the module's own names are kept
    import io

    buf = io.BytesIO()
    torch.save(fx_model, buf)
    buf.seek(0)
    assert_close(torch.load(buf, weights_only=False)(x), out)
    lorafx.apply(fx_model, lorafx.Spec(lorafx.LoRA(r=3, init="random"), ["attn"]), name="two")
    assert (fx_model(x) - out).abs().max() > 1e-2
    lorafx.set_adapter(fx_model, "default")
    assert_close(fx_model(x), out)
    plain = lorafx.merge_and_unload(fx_model)
    assert type(plain.attn) is nn.MultiheadAttention and set(plain.state_dict()) == keys
    with torch.no_grad():
        assert_close(plain(x), out)
