"""MoE sites: LoRA on fused expert tensors (one pair per expert) and on the router, against PEFT 0.21.

References: PEFT's ``get_peft_model(..., target_modules="all-linear")`` on the same transformers 5.23
model (trainable parameters, logits, adapter gradients, its checkpoints both ways), the hand-written
merge formula ``W_e + s·B_e A_e``, the eager model for torch.compile, and a per-group loop for the
``lorafx::grouped_linear`` op.
"""

import copy

import pytest
import torch
from model_state import assert_unchanged, snapshot
from peft import LoraConfig, PeftModel, get_peft_model
from tolerances import MERGED_LOGITS_FP32, UNMERGED_WEIGHT_FP32, assert_close
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import lorafx
from lorafx.errors import ExportError, SpecError
from lorafx.export import to_onnx
from lorafx.kernels.grouped_linear import grouped_linear
from lorafx.moe_peft import peft_paths, to_peft_pair


def tiny_mixtral(layers=2):
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen3_moe(layers=2):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64, norm_topk_prob=True,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            for p in sa.adapters["default"].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _peft_pair_grads(peft_model, fx_model):
    """(lorafx grad, PEFT grad) of every A and B, PEFT's converted to lorafx's layout by to_peft_pair."""
    sites = lorafx.iter_sites(fx_model)
    paths = peft_paths({f: sa.kind for f, sa in sites.items()})
    peft = dict(peft_model.named_parameters())
    pairs = []
    for f, sa in sites.items():
        a = sa.adapters["default"]
        mine = (a.lora_A.grad, a.lora_B.grad)
        if sa.kind == "expert":
            mine = to_peft_pair(*mine)
        for which, g in zip(("lora_A", "lora_B"), mine, strict=True):
            pairs.append((f, g, peft[f"base_model.model.{paths[f]}.{which}.default.weight"].grad))
    return pairs


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS)
def test_all_linear_trains_as_many_parameters_as_peft(make):
    base = make()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear"))
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=8), targets="all-linear"))
    assert _trainable(model) == _trainable(peft_model) > 0
    kinds = {sa.kind for sa in lorafx.iter_sites(model).values()}
    assert kinds == {"linear", "router", "expert"}
    gate_up = lorafx.iter_sites(model)["model.layers.0.mlp.experts.gate_up_proj"].adapters["default"]
    assert gate_up.lora_A.shape[:2] == (8, 16)  # two fused projections: rank 2r, as PEFT's rank_pattern
    assert float(gate_up.scale) == 16 / 8  # and alpha 2α: each projection keeps the scale α/r


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS)
def test_from_peft_matches_peft_logits_and_gradients(make, tmp_path):
    base = make()
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    model = lorafx.from_peft(copy.deepcopy(base), tmp_path)
    ours, theirs = model(IDS).logits, peft_model(IDS).logits
    assert (theirs - base(IDS).logits).abs().max() > 1e-2  # the adapters do something
    assert_close(ours, theirs)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    pairs = _peft_pair_grads(peft_model, model)
    assert {f.rpartition(".")[2] for f, _, _ in pairs} >= {"gate", "gate_up_proj", "down_proj", "q_proj"}
    for fqn, mine, peft_grad in pairs:
        assert peft_grad.abs().max() > 0, fqn
        assert_close(mine, peft_grad, msg=fqn)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS)
def test_to_peft_loads_in_peft_with_the_same_logits(make, tmp_path):
    base = make()
    model = _randomize(lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=8), targets="all-linear")))
    lorafx.to_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_close(peft_model(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)
    back = lorafx.from_peft(copy.deepcopy(base), tmp_path)  # and lorafx reads its own PEFT files back
    assert_close(back(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS)
def test_merge_folds_each_experts_delta_and_unmerge_restores(make):
    base = make(layers=1)
    spec = lorafx.Spec(lorafx.LoRA(r=4, alpha=8), targets=["gate", "gate_up_proj", "down_proj"])
    model = _randomize(lorafx.apply(copy.deepcopy(base), spec))
    unmerged = model(IDS).logits
    W = base.model.layers[0].mlp.experts.down_proj.detach().clone()
    a = lorafx.iter_sites(model)["model.layers.0.mlp.experts.down_proj"].adapters["default"]
    lorafx.merge(model)
    merged_w = model.get_parameter("model.layers.0.mlp.experts.down_proj")
    for e in range(W.shape[0]):  # W_e + s·B_e A_e, per expert, by hand
        expected = W[e] + 2.0 * a.lora_B[e].detach() @ a.lora_A[e].detach()
        assert_close(merged_w[e], expected, **UNMERGED_WEIGHT_FP32)
    assert_close(model(IDS).logits, unmerged, **MERGED_LOGITS_FP32)
    lorafx.unmerge(model)
    assert_close(model.get_parameter("model.layers.0.mlp.experts.down_proj"), W, **UNMERGED_WEIGHT_FP32)
    plain = lorafx.merge_and_unload(model)
    assert type(plain.model.layers[0].mlp.experts).__name__ == type(base.model.layers[0].mlp.experts).__name__
    assert not list(lorafx.iter_sites(plain))
    assert_close(plain(IDS).logits, unmerged, **MERGED_LOGITS_FP32)


def test_compile_fullgraph_matches_eager_forward_and_backward():
    model = _randomize(lorafx.apply(tiny_mixtral(layers=1), lorafx.Spec(lorafx.LoRA(r=4), targets="all-linear")))
    eager = model(IDS).logits
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(IDS).logits
    compiled.square().mean().backward()
    assert_close(compiled, eager)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads[n], msg=n)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    model = _randomize(lorafx.apply(tiny_mixtral(layers=1), lorafx.Spec(lorafx.LoRA(r=4), targets="all-linear")))
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close(torch.compile(model, fullgraph=True)(IDS).logits, model(IDS).logits)
    torch._dynamo.reset()


def test_adapter_files_round_trip_and_second_adapter_on_the_experts(tmp_path):
    base = tiny_mixtral(layers=1)
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4), targets=["down_proj"]), "a")
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets=["gate_up_proj", "gate"]), "b")
    _randomize_named(model, "a", 1), _randomize_named(model, "b", 2)
    gate_up = lorafx.iter_sites(model)["model.layers.0.mlp.experts.gate_up_proj"].adapters["b"]
    assert gate_up.lora_A.shape == (8, 2, 32)  # an explicit target keeps the spec's r (no fused doubling)
    lorafx.save_adapter(model, tmp_path, name="b")
    fresh = lorafx.load_adapter(copy.deepcopy(base), tmp_path)
    lorafx.set_adapter(model, "b")
    assert_close(fresh(IDS).logits, model(IDS).logits)
    lorafx.set_adapter(model, "a")
    assert (fresh(IDS).logits - model(IDS).logits).abs().max() > 1e-3


def _randomize_named(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            if name in sa.adapters:
                for p in sa.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_other_variants_are_refused_on_expert_tensors_by_name():
    model = tiny_mixtral(layers=1)
    before = snapshot(model)
    cfg = lorafx.MoR(r=2, alpha=4, experts=2)
    with pytest.raises(SpecError, match=r"model.layers.0.mlp.experts.gate_up_proj.*variant 'mor'"):
        lorafx.apply(model, lorafx.Spec(cfg, targets=["gate_up_proj"]))
    assert_unchanged(before, model)
    p = lorafx.plan.plan(model, lorafx.Spec(cfg, targets="all-linear"))  # all-linear skips them, inspect lists them
    assert not p.sites["model.layers.0.mlp.experts.down_proj"].selected
    assert "variant 'mor'" in p.refused["model.layers.0.mlp.experts.down_proj"]
    assert p.sites["model.layers.0.mlp.gate"].selected


def test_an_experts_layout_lorafx_does_not_reimplement_is_refused():
    model = tiny_mixtral(layers=1)
    model.model.layers[0].mlp.experts.has_bias = True
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"experts.gate_up_proj.*expert biases"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4), targets=["gate_up_proj"]))
    assert_unchanged(before, model)


def test_an_experts_forward_that_differs_from_the_grouped_form_is_refused():
    model = tiny_mixtral(layers=1)
    experts = model.model.layers[0].mlp.experts

    class ScaledExperts(type(experts)):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    experts.__class__ = ScaledExperts
    with pytest.raises(SpecError, match=r"down_proj.*grouped form differs from ScaledExperts.forward"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4), targets=["down_proj"]))


@pytest.mark.parametrize("d_in, d_out", [(5, 3), (8, 12)], ids=["odd-loop", "aligned-grouped_mm"])
def test_grouped_linear_matches_a_loop_over_groups_with_an_empty_group(d_in, d_out):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, d_in, generator=g, requires_grad=True)
    W = torch.randn(4, d_out, d_in, generator=g, requires_grad=True)
    counts = torch.tensor([2, 0, 6, 1])
    y = grouped_linear(x, W, counts)
    groups = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([x[t] @ W[groups[t]].t() for t in range(9)])
    assert_close(y, ref)
    dy = torch.randn(9, d_out, generator=g)
    got = torch.autograd.grad(y, (x, W), dy)
    want = torch.autograd.grad(ref, (x, W), dy)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    torch.library.opcheck(torch.ops.lorafx.grouped_linear.default, (x, W, counts))


def test_onnx_export_refuses_expert_sites_by_name(tmp_path):
    model = lorafx.apply(tiny_mixtral(layers=1), lorafx.Spec(lorafx.LoRA(r=4), targets=["down_proj"]))
    before = snapshot(model)
    with pytest.raises(ExportError, match=r"model.layers.0.mlp.experts.down_proj.*do not export"):
        to_onnx(model, (IDS,), tmp_path / "out", mode="unmerged")
    assert_unchanged(before, model)
    assert not (tmp_path / "out").exists()


def test_to_peft_refuses_dropout_on_expert_sites_which_peft_cannot_load(tmp_path):
    model = lorafx.apply(tiny_mixtral(layers=1), lorafx.Spec(lorafx.LoRA(r=4, dropout=0.1), targets=["down_proj"]))
    model.train()
    assert model(IDS).logits.isfinite().all()  # dropout of each routed token's adapter input works here
    with pytest.raises(SpecError, match=r"target_parameters .*experts.down_proj.* do not support lora_dropout"):
        lorafx.to_peft(model, tmp_path)
