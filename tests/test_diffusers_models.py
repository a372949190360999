"""Real model code beyond transformers: a tiny diffusers UNet2DConditionModel trained with conv LoRA
against PEFT 0.21 on identical weights (outputs, gradients, optimizer steps, merge)."""

import copy

import pytest
import torch
from helpers import tiny_unet
from tolerances import ONNX_FP32, assert_close

import lorafx

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

# Every Conv2d of the UNet (ResNet convs, shortcuts, down/upsamplers, conv_in/conv_out: 33) and the
# linears proj_in/proj_out/to_q/to_v of its transformer blocks (16): 49 sites on tests/helpers.tiny_unet.
UNET_TARGETS = ["conv1", "conv2", "conv_in", "conv_out", "conv_shortcut", "conv", "proj_in", "proj_out", "to_q", "to_v"]


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 8, generator=g)


def _loss(model, seed):
    x, t, enc = _batch(seed)
    return model(x, t, enc).sample.square().mean()


def test_unet_conv_lora_trains_like_peft(tmp_path):
    unet = tiny_unet()
    fx_model = lorafx.apply(copy.deepcopy(unet), lorafx.Spec(lorafx.LoRA(r=2, alpha=4.0, init="random"), UNET_TARGETS))
    sites = lorafx.iter_sites(fx_model)
    assert sum(sa.kind == "conv" for sa in sites.values()) == 33
    lorafx.to_peft(fx_model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path, is_trainable=True)
    assert sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A")) == len(sites)
    fx_params = [p for p in fx_model.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in fx_params) == sum(p.numel() for p in peft_params)
    opts = [torch.optim.AdamW(fx_params, lr=1e-2), torch.optim.AdamW(peft_params, lr=1e-2)]
    for step in range(2):  # one step compares gradients, the second the losses after an AdamW update
        losses = []
        for model, opt in zip((fx_model, peft_model), opts, strict=True):
            opt.zero_grad()
            loss = _loss(model, step)
            loss.backward()
            opt.step()
            losses.append(loss)
        assert_close(losses[0], losses[1])
        if step == 0:  # gradients of every adapter tensor, with identical weights
            for sa in sites.values():
                layer = peft_model.base_model.model.get_submodule(sa.site)
                a = sa.adapters["default"]
                assert_close(a.lora_A.grad, layer.lora_A["default"].weight.grad.reshape(a.lora_A.shape))
                assert_close(a.lora_B.grad, layer.lora_B["default"].weight.grad.reshape(a.lora_B.shape))
    x = _batch(7)
    with torch.no_grad():
        trained = fx_model(*x).sample
        assert_close(trained, peft_model(*x).sample)
        assert (trained - unet(*x).sample).abs().max() > 1e-3
        lorafx.merge(fx_model)  # merged conv kernels give the unmerged outputs, and PEFT's merge agrees
        assert_close(fx_model(*x).sample, trained)
        assert_close(peft_model.merge_and_unload()(*x).sample, trained)


# The patch embedding's Conv2d (pos_embed.proj), the feed-forward and attention linears: 15 sites.
DIT_TARGETS = ["proj", "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out"]


def tiny_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
    )


def _dit_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 8, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
    }


def _adapted_dit(base):
    return lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=2, alpha=4.0, init="random"), DIT_TARGETS))


def test_dit_matches_peft_outputs_grads_and_merge(tmp_path):
    base = tiny_dit()
    fx_model = _adapted_dit(base)
    sites = lorafx.iter_sites(fx_model)
    assert sorted({sa.kind for sa in sites.values()}) == ["conv", "linear"] and len(sites) == 15
    lorafx.to_peft(fx_model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    x = _dit_inputs()
    out = fx_model(**x).sample
    assert (out - base(**x).sample).abs().max() > 1e-3
    assert_close(out, peft_model(**x).sample)
    fx_model(**x).sample.square().mean().backward()
    peft_model(**x).sample.square().mean().backward()
    for sa in sites.values():
        layer = peft_model.base_model.model.get_submodule(sa.site)
        a = sa.adapters["default"]
        assert_close(a.lora_A.grad, layer.lora_A["default"].weight.grad.reshape(a.lora_A.shape))
        assert_close(a.lora_B.grad, layer.lora_B["default"].weight.grad.reshape(a.lora_B.shape))
    with torch.no_grad():
        lorafx.merge(fx_model)
        assert_close(fx_model(**x).sample, out)


@pytest.mark.slow  # ~45 s: Dynamo traces the whole DiT on 2 shared cores
def test_dit_compile_fullgraph_matches_eager():
    fx_model = _adapted_dit(tiny_dit())
    x = _dit_inputs()
    compiled = torch.compile(fx_model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(**x).sample, fx_model(**x).sample)


@pytest.mark.slow  # ~80 s per mode: torch.onnx's dynamo exporter on 2 shared cores
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_dit_onnx_export_matches_eager(mode):
    pytest.importorskip("onnxruntime")
    from lorafx.export import check_onnx

    fx_model = _adapted_dit(tiny_dit()).eval()
    assert check_onnx(fx_model, _dit_inputs(), mode) < ONNX_FP32["atol"]
