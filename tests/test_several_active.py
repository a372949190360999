"""Several active adapters (issue 15 item 4, first half): ``lorafx.set_adapter(model, ["a", "b"])``.

References: the formula ``W + ΔA + ΔB`` (a plain copy of the base with the summed ΔW folded in),
per-site sums of the single adapters' deltas (MoR, which has no ΔW), and PEFT's own
``base_model.set_adapter([...])`` on the same LoRA weights.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from variant_cases import example_configs

import lorafx
from lorafx.canonical import lora_linear
from lorafx.cli.models import TinyMLP, tiny_llama
from tests.tolerances import assert_close

MERGEABLE = ("lora", "unilora", "celora", "capaboost", "droplora")


@pytest.fixture(scope="module")
def pair():
    """(base, adapted): a tiny Llama with one adapter per variant (random init); MoR on q/v only."""
    configs = example_configs()
    base = tiny_llama(seed=4)
    model = copy.deepcopy(base)
    for name in MERGEABLE:
        model = lorafx.apply(model, lorafx.Spec(configs[name], targets="all-linear"), name=name)
    model = lorafx.apply(model, lorafx.Spec(configs["mor"], targets=["q_proj", "v_proj"]), name="mor")
    with torch.no_grad():  # Uni-LoRA's init (|θ| <= 0.02) barely moves the output: make it count
        for m in lorafx.state.shared_modules(model, "unilora").values():
            for p in m.parameters():
                p.mul_(50)
    return base, model.eval()


def _formula(base, model, names):
    """A copy of ``base`` with W + Σ ΔW of ``names`` at every site that has them (fp32 sums)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            w = ref.get_submodule(sa.site).weight
            for n in names:
                if n in sa.adapters:
                    w += sa.adapters[n].delta_weight().to(w.dtype)
    return ref


@pytest.mark.parametrize("names", [("lora", "capaboost"), ("unilora", "celora", "droplora")])
@torch.no_grad()
def test_several_active_equal_the_summed_weights_and_merge_folds_the_sum(pair, names):
    base, model = pair
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    lorafx.set_adapter(model, list(names))
    assert lorafx.active_adapter(model) == list(names)
    got = model(ids).logits
    assert_close(got, _formula(base, model, names)(ids).logits, atol=1e-5, rtol=1e-4)
    for n in names:  # not just one of them
        lorafx.set_adapter(model, n)
        assert (model(ids).logits - got).abs().max() > 1e-3
    lorafx.set_adapter(model, list(names))
    lorafx.merge(model, keep_original=True)
    assert_close(model(ids).logits, got, atol=1e-5, rtol=1e-4)
    lorafx.unmerge(model)
    assert_close(model(ids).logits, got)
    lorafx.set_adapter(model, "lora")


@torch.no_grad()
def test_mor_sums_per_site_and_is_refused_by_merge(pair):
    _, model = pair
    lorafx.set_adapter(model, ["mor", "lora"])
    for sa in lorafx.iter_sites(model).values():
        if "mor" not in sa.adapters:
            continue
        w = model.get_submodule(sa.site).weight
        x = torch.randn(2, 5, w.shape[1], generator=torch.Generator().manual_seed(1))
        base = x @ w.t()
        want = base + sum(lora_linear(x, w, None, sa.adapters[n].lower(x)) - base for n in ("mor", "lora"))
        assert_close(lora_linear(x, w, None, sa(x)), want)
    with pytest.raises(lorafx.NotMergeableError, match="'mor'"):
        lorafx.merge(model)
    assert not lorafx.is_merged(model)
    lorafx.set_adapter(model, "lora")


def test_peft_set_adapter_list_parity_outputs_and_gradients(tmp_path):
    base = tiny_llama(seed=5)
    model = copy.deepcopy(base)
    for i, name in enumerate(("a", "b")):
        cfg = lorafx.LoRA(r=4 + 2 * i, alpha=8 + i, init="random")
        model = lorafx.apply(model, lorafx.Spec(cfg, targets=["q_proj", "v_proj", "down_proj"][: 2 + i]), name=name)
        lorafx.to_peft(model, tmp_path / name, name=name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a", is_trainable=True)
    pm.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=True)
    pm.base_model.set_adapter(["a", "b"])
    lorafx.set_adapter(model, ["a", "b"])
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    ours, theirs = model(ids, labels=ids), pm(input_ids=ids, labels=ids)
    assert_close(ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    for name in ("a", "b"):
        for sa in lorafx.iter_sites(model).values():
            if name not in sa.adapters:
                continue
            layer = pm.base_model.model.get_submodule(sa.site)
            for ab in ("lora_A", "lora_B"):
                assert_close(getattr(sa.adapters[name], ab).grad, getattr(layer, ab)[name].weight.grad)


def test_what_cannot_combine_is_refused(tmp_path):
    model = TinyMLP()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, dropout=0.1), targets=["up"]), name="a")
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, dropout=0.1), targets=["up", "mid"]), name="b")
    model = lorafx.apply(model, lorafx.Spec(lorafx.CELoRA(r=2), targets=["up"]), name="c")
    x = torch.randn(3, 32)
    with pytest.raises(lorafx.SpecError, match="no adapter named 'zz'"):
        lorafx.set_adapter(model, ["a", "zz"])
    assert lorafx.active_adapter(model) == "c"  # unchanged
    lorafx.set_adapter(model, ["a", "b"])
    model.train()
    with pytest.raises(lorafx.SpecError, match=r"site 'up': adapters \['a', 'b'\] read different adapter-path inputs"):
        model(x)
    model.eval()
    model(x)  # at eval dropout is the identity: they combine
    model.train()
    lorafx.set_adapter(model, ["c", "a"])
    with pytest.raises(lorafx.SpecError, match="adapter 'c' replaces the frozen matmul's backward"):
        model(x)
    model.eval()
    for fn in (lambda: lorafx.save_adapter(model, tmp_path / "x"), lambda: lorafx.set_scale(model, 2.0)):
        with pytest.raises(lorafx.SpecError, match=r"adapters \['c', 'a'\] are active together"):
            fn()
    lorafx.delete_adapter(model, "a")  # the others stay active
    assert lorafx.active_adapter(model) == "c"
