"""A site is a use of a weight: every use is adapted, or the site is refused by name (issue 12).

Every expected output here is computed by hand from the base module's weights and the adapter's A, B
and scale (``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``), never by lorafx.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot
from tolerances import MERGED_LOGITS_FP32, assert_close
from torch import nn

import lorafx
from lorafx.errors import SpecError

SPEC = dict(config=lorafx.LoRA(r=2, alpha=4, init="random"))


def spec(targets, **kw):
    return lorafx.Spec(**{**SPEC, "targets": targets, **kw})


def adapted_linear(x, linear: nn.Linear, adapter) -> torch.Tensor:
    """The hand-written reference for one adapted use of ``linear``."""
    return F.linear(x, linear.weight, linear.bias) + adapter.scale * (x @ adapter.lora_A.T) @ adapter.lora_B.T


def adapter_of(model, fqn):
    return lorafx.iter_sites(model)[fqn].adapters["default"]


# -- repeated calls ----------------------------------------------------------------------------------


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4)

    def forward(self, a, b):
        return self.enc(a), self.enc(b)


def test_a_module_called_twice_gets_the_adapter_on_every_call():
    torch.manual_seed(0)
    base = Siamese()
    model = lorafx.apply(copy.deepcopy(base), spec(["enc"]))
    x = torch.randn(3, 6)
    ya, yb = model(x, x)
    assert torch.equal(ya, yb)  # same input, same code (was cosine 0.75 with the adapter on one call)
    want = adapted_linear(x, base.enc, adapter_of(model, "enc"))
    assert_close(ya, want)
    lorafx.merge(model)
    assert_close(model(x, x)[1], want, **MERGED_LOGITS_FP32)


# -- shared and tied weights --------------------------------------------------------------------------


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight  # one tensor, two modules

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_every_user_of_a_shared_weight_shares_one_adapter():
    torch.manual_seed(0)
    base = Shared()
    model = lorafx.apply(copy.deepcopy(base), spec(["a", "b"]))
    assert list(lorafx.iter_sites(model)) == ["a"]  # one adapter for the one weight
    ad = adapter_of(model, "a")
    x = torch.randn(3, 6)
    h = torch.relu(adapted_linear(x, base.a, ad))
    want = F.linear(h, base.a.weight, base.b.bias) + ad.scale * (h @ ad.lora_A.T) @ ad.lora_B.T
    assert_close(model(x), want)
    w0 = model.a.weight.detach().clone()
    lorafx.merge(model)
    assert_close(model(x), want, **MERGED_LOGITS_FP32)
    lorafx.unmerge(model)
    assert (model.a.weight - w0).abs().max() < 1e-6


def test_adapting_one_user_of_a_shared_weight_is_refused_with_the_fix():
    model = Shared()
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"'a'.*shared with \['b.weight'\].*lorafx.untie\(model, \['a'\]\)"):
        lorafx.apply(model, spec(["a"]))
    assert_unchanged(before, model)
    assert lorafx.untie(model, ["a"]) == ["a"]
    torch.manual_seed(0)
    model = lorafx.apply(model, spec(["a"]))
    w_b = model.b.weight.detach().clone()
    lorafx.merge(model)
    assert torch.equal(model.b.weight, w_b)  # merging into a no longer changes b


def test_tied_lm_head_is_refused_and_not_offered(tiny_llama_tied):
    model = tiny_llama_tied
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"lm_head.*model.embed_tokens.weight.*untie"):
        lorafx.apply(model, spec(["lm_head", "q_proj"]))
    assert_unchanged(before, model)
    report = lorafx.build_report(model, spec(r".*(lm_head|q_proj)"[:0] or "all-linear"))
    assert "lm_head" not in {s.fqn for s in report.matched}


@pytest.fixture
def tiny_llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


# -- weights read without a call, module behaviour ----------------------------------------------------


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_mha_out_proj_is_refused_and_not_offered_by_all_linear():
    model = WithMHA()
    with pytest.raises(SpecError, match=r"attn.out_proj.*MultiheadAttention 'attn' reads this weight directly"):
        lorafx.apply(model, spec(["out_proj"]))
    model = lorafx.apply(model, spec("all-linear"))
    assert list(lorafx.iter_sites(model)) == ["proj"]
    report = lorafx.build_report(WithMHA(), spec("all-linear"))
    assert "attn.out_proj" in {s.fqn for s in report.sites if s.refused}


def test_transformer_encoder_layer_fast_path_is_turned_off():
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0).eval()
    model = lorafx.apply(copy.deepcopy(base), spec(["linear1", "linear2"])).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # eval + no_grad is where PyTorch takes the fast path
        got = model(x)
        a1, a2 = adapter_of(model, "linear1"), adapter_of(model, "linear2")
        h = base.norm1(x + base.self_attn(x, x, x, need_weights=False)[0])
        ff = adapted_linear(torch.relu(adapted_linear(h, base.linear1, a1)), base.linear2, a2)
        want = base.norm2(h + ff)
    assert_close(got, want)


class Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_linear_subclass_with_its_own_forward_is_refused():
    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 4))
    with pytest.raises(SpecError, match=r"'0'.*Scaled has its own forward"):
        lorafx.apply(model, spec(["0"]))
    model = lorafx.apply(model, spec("all-linear"))
    assert list(lorafx.iter_sites(model)) == ["1"]


def test_parametrized_weight_is_refused():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 4))
    with pytest.raises(SpecError, match=r"parametrized.*remove_parametrizations"):
        lorafx.apply(model, spec(["0"]))


def test_hooks_on_an_adapted_linear_still_fire_in_order():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model = copy.deepcopy(base)
    calls = []
    model[0].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    handle = model[0].register_forward_hook(lambda m, args, out: calls.append(("post", out.detach().clone())))
    model = lorafx.apply(model, spec(["0", "2"]))
    x = torch.randn(3, 4)
    model(x)
    assert [c if isinstance(c, str) else c[0] for c in calls] == ["pre", "post"]
    assert_close(calls[1][1], adapted_linear(x, base[0], adapter_of(model, "0")))  # the adapted output
    handle.remove()  # the user's handle still works on the rewritten module
    calls.clear()
    model(x)
    assert calls == ["pre"]


# -- lifecycle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["whole-model region", "transformers model"])
def test_torch_save_round_trips_an_adapted_model(which, tmp_path):
    from lorafx.cli.models import TinyMLP, tiny_llama

    torch.manual_seed(0)
    if which == "whole-model region":
        model, targets, x = TinyMLP(), ["up", "mid"], (torch.randn(3, 32),)
    else:
        model, targets, x = tiny_llama(), ["q_proj", "up_proj"], (torch.randint(0, 256, (2, 5)),)
    model = lorafx.apply(model, spec(targets))

    def out(m):
        with torch.no_grad():
            y = m(*x)
        return getattr(y, "logits", y)

    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(out(loaded), out(model))
    lorafx.set_adapter(loaded, None)  # the lorafx state came along
    lorafx.set_adapter(model, None)
    assert torch.equal(out(loaded), out(model))


def test_wrapped_models_are_refused_with_the_fix():
    from lorafx.cli.models import TinyMLP

    for wrapped, inner in ((torch.compile(TinyMLP()), "_orig_mod"), (nn.DataParallel(TinyMLP()), "module")):
        with pytest.raises(SpecError, match=rf"wrapped in {type(wrapped).__name__}.*model\.{inner}"):
            lorafx.apply(wrapped, spec(["up"]))


def test_resize_token_embeddings_of_an_adapted_head_is_refused_before_anything_changes():
    from lorafx.cli.models import tiny_llama

    model = lorafx.apply(tiny_llama(), spec(["lm_head", "q_proj"]))
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"resize_token_embeddings: the output head 'lm_head' carries"):
        model.resize_token_embeddings(300)
    assert_unchanged(before, model)
    plain = tiny_llama()
    lorafx.apply(plain, spec(["q_proj"])).resize_token_embeddings(300)  # an unadapted head resizes
    assert plain.lm_head.weight.shape[0] == 300


class ReadsChildWeight(nn.Module):
    """A parent that computes with a child's weight without calling the child (and only looks at
    another child's dtype, which is not a use)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x, scale=None):  # an optional argument: not traced, so its source is read
        if self.other.weight.dtype != x.dtype:
            x = x.to(self.other.weight.dtype)
        return F.linear(x, self.proj.weight) + self.other(x)


def test_a_parent_computing_with_a_child_weight_is_refused():
    with pytest.raises(SpecError, match=r"'proj'.*ReadsChildWeight.forward computes with its weight.*F.linear"):
        lorafx.apply(ReadsChildWeight(), spec(["proj"]))
    model = lorafx.apply(ReadsChildWeight(), spec("all-linear"))
    assert list(lorafx.iter_sites(model)) == ["other"]  # a dtype look is not a use


class TracedInlineRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):  # traces: the matmul with proj's weight is inlined in the graph
        w = self.proj.weight  # (a line the source check cannot judge; the traced graph can)
        return self.proj(x) + torch.matmul(x, w.T)


def test_a_traced_use_of_a_weight_outside_a_linear_call_is_refused():
    model = TracedInlineRead()
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"'proj'.*uses its weight outside a linear call"):
        lorafx.apply(model, spec(["proj"]))
    assert_unchanged(before, model)
