"""QLoRA end to end on a bitsandbytes nf4 tiny Llama: training with gradient checkpointing,
torch.compile, and ONNX export of the unmerged and merged model (issue: QLoRA items 2 and 3)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from quant_helpers import bnb_llama, fresh, save_tiny_llama
from tolerances import ONNX_FP32, assert_close

import lorafx

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    return bnb_llama(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")), "nf4-dq")


def qlora(base):
    return lorafx.apply(fresh(base), lorafx.Spec(lorafx.LoRA(r=8, alpha=16), targets="all-linear"))


def test_qlora_training_with_gradient_checkpointing_lowers_the_loss(nf4):
    model = qlora(nf4)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():  # the quantized base never moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.slow  # ~90 s on the 2-core CPU machine (inductor compiles the bitsandbytes ops too)
def test_torch_compile_matches_eager(nf4):
    model = qlora(nf4)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            sa.adapters["default"].lora_B.normal_(std=0.05)
    compiled = torch.compile(model)
    loss = compiled(IDS, labels=IDS).loss
    loss.backward()
    assert_close(loss, model(IDS, labels=IDS).loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_onnx_export_with_dequantized_base(nf4, tmp_path, mode):
    ort = pytest.importorskip("onnxruntime")
    from lorafx.export import to_onnx
    from lorafx.export.session import AdapterSession

    model = qlora(nf4)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            sa.adapters["default"].lora_B.normal_(std=0.05)
    want = model(IDS).logits.detach().numpy()  # train mode, grad on: bitsandbytes' fp32 dequant path
    before = copy.deepcopy(model.state_dict())
    to_onnx(model, {"input_ids": IDS}, tmp_path, mode=mode)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the live model is unchanged
    assert not lorafx.is_merged(model)
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "model.onnx").graph.node}
    assert "MatMulNBits" not in ops  # the base is dequantized fp32 weights (see README)
    got = AdapterSession(tmp_path).run({"input_ids": IDS.numpy()}, adapter="default")["logits"]
    assert ort is not None
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), torch.from_numpy(want), **ONNX_FP32)
