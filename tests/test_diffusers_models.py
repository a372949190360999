"""Real model code beyond transformers: a tiny diffusers UNet2DConditionModel trained with conv LoRA
against PEFT 0.21 on identical weights (outputs, gradients, optimizer steps, merge)."""

import copy

import pytest
import torch
from tolerances import assert_close

import lorafx

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

# Every Conv2d of the UNet (ResNet convs, shortcuts, down/upsamplers, conv_in/conv_out: 33) and the
# linears proj_in/proj_out/to_q/to_v of its transformer blocks (16): 49 sites on the config below.
UNET_TARGETS = ["conv1", "conv2", "conv_in", "conv_out", "conv_shortcut", "conv", "proj_in", "proj_out", "to_q", "to_v"]


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


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
