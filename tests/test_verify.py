"""``lorafx.verify_merge``: reports the merged-vs-unmerged logit difference and restores the model."""

from __future__ import annotations

import copy

import pytest
import torch
from model_state import assert_unchanged, snapshot
from tolerances import VERIFY_REPORT
from variant_cases import example_configs

import lorafx
from lorafx.cli.models import tiny_llama
from lorafx.errors import NotMergeableError, SpecError

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def base(dtype=torch.float32):
    return tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64).to(dtype)


def independent_merge(model: torch.nn.Module, adapted: torch.nn.Module) -> torch.nn.Module:
    """``model`` with W ← round(W + s·B·A) computed here in fp64 from the adapted model's tensors."""
    merged = copy.deepcopy(model)
    for sa in lorafx.iter_sites(adapted).values():
        a = sa.adapters[lorafx.active_adapter(adapted)]
        w = merged.get_submodule(sa.site).weight
        with torch.no_grad():
            w.copy_((w.double() + a.scale * a.lora_B.double() @ a.lora_A.double()).to(w.dtype))
    return merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reports_the_independent_merge_difference_and_restores(dtype):
    plain = base(dtype)
    model = lorafx.apply(
        copy.deepcopy(plain), lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets="all-linear")
    )
    model.train()
    model.model.layers[0].mlp.eval()  # mixed flags must come back as they were, not as the root's
    before = snapshot(model)
    report = lorafx.verify_merge(model, IDS)
    assert_unchanged(before, model)  # weights bit-identical, still in train mode
    with torch.no_grad():
        unmerged = model.eval()(IDS).logits.float()
        expected = (independent_merge(plain, model)(IDS).logits.float() - unmerged).abs()
    assert report["adapter"] == "default" and report["sites"] == 7
    assert report["dtype"] == str(dtype).removeprefix("torch.")
    # fp32: the fp64-vs-fp32 sum differs by an ulp of W (~1e-8), far below the logits' own rounding;
    # bf16: one bf16 ulp of a logit of magnitude 0.25-0.5 is 2e-3 (measured: both 3.9e-3).
    torch.testing.assert_close(report["max_abs_diff"], expected.max().item(), **VERIFY_REPORT[dtype])
    # merged x(W+ΔW)ᵀ and unmerged xWᵀ + s(xAᵀ)Bᵀ round differently: a zero would mean nothing merged
    assert 0 < report["max_abs_diff"] < (1e-5 if dtype == torch.float32 else 0.05)
    assert report["max_abs_output"] == pytest.approx(unmerged.abs().max().item())


def test_accepts_kwargs_and_tuple_inputs():
    model = lorafx.apply(base(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["q_proj"]))
    a = lorafx.verify_merge(model, {"input_ids": IDS})
    b = lorafx.verify_merge(model, (IDS,))
    assert a["max_abs_diff"] == b["max_abs_diff"] and a["sites"] == 1


def test_errors_leave_model_unchanged():
    with pytest.raises(SpecError, match="no lorafx adapters"):
        lorafx.verify_merge(base(), IDS)
    model = lorafx.apply(base(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["q_proj"]))
    lorafx.merge(model)
    before = snapshot(model)
    with pytest.raises(SpecError, match="already merged"):
        lorafx.verify_merge(model, IDS)
    assert_unchanged(before, model)
    lorafx.unmerge(model)
    lorafx.set_adapter(model, None)
    with pytest.raises(SpecError, match="no active adapter"):
        lorafx.verify_merge(model, IDS)


@pytest.mark.skipif("mor" not in example_configs(), reason="MoR not in this build")
def test_not_mergeable_variant():
    model = lorafx.apply(base(), lorafx.Spec(example_configs()["mor"], targets=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(NotMergeableError):
        lorafx.verify_merge(model, IDS)
    assert_unchanged(before, model)
