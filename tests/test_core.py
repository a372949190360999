"""Core behaviour of lorafx.apply: sites in all three IR forms, regions, init, merge, named adapters."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot
from tolerances import assert_close
from torch import fx, nn

import lorafx
from lorafx.cli.models import TinyMLP, tiny_llama
from lorafx.passes import find_sites

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FunctionalLinear(nn.Module):
    """Calls F.linear on its own weight (a call_function site with get_attr operands)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.weight = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return F.linear(self.proj(x), self.weight)


# -- front-ends: three IR forms -------------------------------------------------------------------


def test_find_sites_symbolic_trace_forms():
    gm = fx.symbolic_trace(FunctionalLinear())
    sites = {s.fqn: (s.form, s.in_features, s.out_features) for s in find_sites(gm, prefix="m")}
    assert sites == {"m.proj": ("call_module", 6, 5), "m": ("call_function", 5, 3)}


def test_find_sites_dynamo_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = TinyMLP()
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 32))
    sites = find_sites(graphs[0])
    assert [(s.fqn, s.form, s.in_features, s.out_features) for s in sites] == [
        ("up", "call_function", 32, 64),
        ("mid", "call_function", 64, 64),
        ("head", "call_function", 64, 10),
    ]


def test_find_sites_torch_export_aten_form():
    ep = torch.export.export(TinyMLP(), (torch.randn(2, 32),))
    gm = ep.graph_module
    sites = find_sites(gm)
    assert [(s.fqn, s.form, s.in_features, s.out_features) for s in sites] == [
        ("up", "aten", 32, 64),
        ("mid", "aten", 64, 64),
        ("head", "aten", 64, 10),
    ]


# -- regions --------------------------------------------------------------------------------------


def test_regions_on_llama_keep_the_model_usable(tiny_llama):
    model = lorafx.apply(tiny_llama, lorafx.Spec(lorafx.LoRA(r=2), targets="all-linear"))
    layer = model.model.layers[0]
    assert type(layer).__name__ == "LlamaDecoderLayer"  # untraceable: kept as is
    assert isinstance(layer.mlp, fx.GraphModule) and type(layer.mlp).__name__ == "LlamaMLP"  # whole-MLP region
    assert isinstance(layer.self_attn.q_proj, fx.GraphModule)  # single-linear region
    assert "lora_linear" in layer.mlp.code and layer.mlp.code.count("lora_linear(") == 3
    assert sorted(lorafx.iter_sites(model)) == sorted(
        f"model.layers.{i}.{p}.{n}"
        for i in range(2)
        for p, names in (("self_attn", LLAMA_LINEARS[:4]), ("mlp", LLAMA_LINEARS[4:]))
        for n in names
    )
    assert "lm_head" not in lorafx.iter_sites(model)  # all-linear skips the output head, as PEFT does


def test_base_state_dict_keys_are_preserved(tiny_llama):
    before = set(tiny_llama.state_dict())
    model = lorafx.apply(tiny_llama, lorafx.Spec(lorafx.LoRA(r=2), targets="all-linear"))
    after = set(model.state_dict())
    assert before <= after
    assert all(".lorafx." in k for k in after - before)
    assert len(after - before) == 3 * 14  # lora_A, lora_B and scale_t per site (the scale is state: issue 13)


def test_unsafe_modules_are_not_traced_as_regions():
    class Optional(nn.Module):  # an optional argument would be baked into one branch by tracing
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale=None):
            y = self.lin(x)
            return y if scale is None else y * scale

    class TrainingBranch(nn.Module):  # self.training would be baked at trace time
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, training=self.training)

    for cls in (Optional, TrainingBranch):
        out = lorafx.apply(nn.ModuleDict({"m": cls()}), lorafx.Spec(lorafx.LoRA(r=2), targets=["lin"]))
        assert type(out.m) is cls  # not replaced by a graph
        assert isinstance(out.m.lin, fx.GraphModule)  # the linear is its own region
    m = lorafx.apply(nn.ModuleDict({"m": Optional()}), lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["lin"]))
    x = torch.randn(2, 4)
    assert torch.equal(m.m(x, scale=2.0), 2.0 * m.m(x))


def test_whole_model_trace_returns_graph_module_sharing_weights():
    model = TinyMLP()
    adapted = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4), targets=["up", "mid"]))
    assert isinstance(adapted, fx.GraphModule)
    assert adapted.up.weight is model.up.weight and not model.up.weight.requires_grad
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == [
        "lorafx.up.adapters.default.lora_A",
        "lorafx.up.adapters.default.lora_B",
        "lorafx.mid.adapters.default.lora_A",
        "lorafx.mid.adapters.default.lora_B",
    ]


# -- numerics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, TinyMLP], ids=["llama", "mlp"])
def test_init_output_equals_base_exactly(make):
    torch.manual_seed(0)
    base = make().eval()
    x = torch.randint(0, 256, (2, 7)) if make is tiny_llama else torch.randn(3, 32)
    ref = base(x)
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4, dropout=0.1), targets="all-linear"))
    out = model(x)
    ref, out = (ref.logits, out.logits) if make is tiny_llama else (ref, out)
    assert torch.equal(out, ref)


def test_merge_conv1d_weights_gpt2():
    from helpers import tiny_gpt2

    model = lorafx.apply(tiny_gpt2(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["c_attn", "c_fc"]))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        lorafx.merge(model)
        assert_close(model(ids).logits, ref)
        lorafx.unmerge(model)
        assert_close(model(ids).logits, ref)


def test_merge_equals_unmerged_and_unmerge_restores(tiny_llama):
    w0 = tiny_llama.model.layers[0].mlp.up_proj.weight.detach().clone()
    model = lorafx.apply(tiny_llama, lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear"))
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        lorafx.merge(model)
        assert lorafx.is_merged(model)
        assert_close(model(ids).logits, ref)
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)
        lorafx.unmerge(model)
        assert_close(model(ids).logits, ref)
        assert_close(model.model.layers[0].mlp.up_proj.weight, w0, atol=1e-6, rtol=0)


def test_merge_keep_original_restores_bit_for_bit(tiny_llama):
    model = lorafx.apply(
        tiny_llama.to(torch.bfloat16), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["up_proj"])
    )
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lorafx.merge(model, keep_original=True)
    lorafx.unmerge(model)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)


def test_gradient_checkpointing_gives_the_same_grads(tiny_llama):
    ids = torch.randint(0, 256, (2, 7))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = lorafx.apply(
            copy.deepcopy(tiny_llama), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear")
        )
        if ckpt:
            model.activation_checkpointing_enable()
        model.train()
        calls = []  # the adapter of one site runs again in backward when the layer is recomputed
        sa = next(iter(lorafx.iter_sites(model).values()))
        hook = sa.register_forward_hook(lambda *_, calls=calls: calls.append(torch.is_grad_enabled()))
        model(ids, labels=ids).loss.backward()
        hook.remove()
        assert len(calls) == (2 if ckpt else 1), calls
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert_close(a, b)


# -- named adapters -------------------------------------------------------------------------------


def test_named_adapters_switch_without_retracing(tiny_llama):
    ids = torch.randint(0, 256, (2, 7))
    singles = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        singles[name] = lorafx.apply(
            copy.deepcopy(tiny_llama),
            lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["q_proj", "up_proj"]),
            name=name,
        )
    model = copy.deepcopy(tiny_llama)
    torch.manual_seed(1)
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["q_proj", "up_proj"]), name="a")
    torch.manual_seed(2)
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["q_proj", "up_proj"]), name="b")
    regions = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    assert lorafx.adapter_names(model) == ["a", "b"] and lorafx.active_adapter(model) == "b"
    with torch.no_grad():
        for name in ("a", "b", "a"):
            lorafx.set_adapter(model, name)
            assert torch.equal(model(ids).logits, singles[name](ids).logits)
            trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {name}
        lorafx.set_adapter(model, None)
        assert torch.equal(model(ids).logits, tiny_llama(ids).logits)
    assert regions == [m for m in model.modules() if isinstance(m, fx.GraphModule)]  # same objects: no re-trace


def test_second_adapter_on_new_and_shared_sites(tiny_llama):
    model = lorafx.apply(tiny_llama, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["down_proj"]), name="a")
    model = lorafx.apply(
        model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["down_proj", "gate_proj", "q_proj"]), name="b"
    )
    sites = lorafx.iter_sites(model)
    assert sorted(sites["model.layers.0.mlp.down_proj"].adapters) == ["a", "b"]
    assert sorted(sites["model.layers.0.mlp.gate_proj"].adapters) == ["b"]
    ids = torch.randint(0, 256, (1, 5))
    lorafx.set_adapter(model, "a")
    out_a = model(ids).logits
    lorafx.delete_adapter(model, "b")
    assert torch.equal(model(ids).logits, out_a)
    assert not any(".b." in n for n in model.state_dict())


# -- spec -----------------------------------------------------------------------------------------


def test_spec_targets_forms(tiny_llama):
    from lorafx.plan import plan

    def sel(**kw):
        return sorted(plan(tiny_llama, lorafx.Spec(lorafx.LoRA(), **kw)).selected)

    assert sel(targets=["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert sel(targets=r"model\.layers\.1\..*_proj") == sorted(
        f"model.layers.1.{p}.{n}"
        for p, ns in (("self_attn", LLAMA_LINEARS[:4]), ("mlp", LLAMA_LINEARS[4:]))
        for n in ns
    )
    assert len(sel(targets="all-linear")) == 14
    assert len(sel(targets="all-linear", exclude=r".*mlp.*")) == 8
    assert sel(targets=["lm_head"]) == ["lm_head"]  # named explicitly, the head is adaptable


def test_spec_overrides_and_json_round_trip(tiny_llama):
    spec = lorafx.Spec(
        lorafx.LoRA(r=8, alpha=16),
        targets=["q_proj", "down_proj"],
        exclude=["layers.1.self_attn.q_proj"],
        overrides={"down_proj": {"r": 2}},
    )
    text = json.dumps(spec.to_dict())
    back = lorafx.Spec.from_dict(json.loads(text))
    assert back.to_dict() == spec.to_dict() and json.loads(text)["config"]["variant"] == "lora"
    model = lorafx.apply(tiny_llama, back)
    ranks = {f: sa.adapters["default"].config.r for f, sa in lorafx.iter_sites(model).items()}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 8,
        "model.layers.0.mlp.down_proj": 2,
        "model.layers.1.mlp.down_proj": 2,
    }


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_spec, error, words",
    [
        (lambda: lorafx.Spec(lorafx.LoRA(), targets=["q_prj"]), lorafx.SpecError, ["match no linear site", "q_proj"]),
        (lambda: lorafx.Spec(lorafx.LoRA(), targets=["q_proj", "c_attn"]), lorafx.SpecError, ["'c_attn'", "match no"]),
        (
            lambda: lorafx.Spec(lorafx.LoRA(), targets=["q_proj"], overrides={"qq": {"r": 2}}),
            lorafx.SpecError,
            ["'qq'"],
        ),
        (lambda: lorafx.Spec(lorafx.LoRA(r=0)), ValueError, ["r must be a positive int", "0"]),
        (
            lambda: lorafx.Spec(lorafx.LoRA(), overrides={"q_proj": {"r": -1}}),
            ValueError,
            ["overrides['q_proj']", "r must be"],
        ),
        (lambda: lorafx.Spec(lorafx.LoRA(), overrides={"q_proj": {"rank": 2}}), lorafx.SpecError, ["rank"]),
        (
            lambda: lorafx.Spec.from_dict({"config": {"variant": "lorra", "r": 2}}),
            lorafx.SpecError,
            ["unknown variant 'lorra'", "lora"],
        ),
        (lambda: lorafx.Spec.from_dict({"config": {"variant": "lora", "version": 9}}), lorafx.SpecError, ["version 9"]),
        (lambda: lorafx.Spec(lorafx.LoRA(), targets="[unclosed"), lorafx.SpecError, ["does not compile"]),
        (lambda: lorafx.Spec({"variant": "lora"}), lorafx.SpecError, ["adapter config"]),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_unchanged(tiny_llama, make_spec, error, words):
    before = snapshot(tiny_llama)
    with pytest.raises(error) as info:
        lorafx.apply(tiny_llama, make_spec())
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert_unchanged(before, tiny_llama)


def test_duplicate_adapter_name_is_refused(tiny_llama):
    model = lorafx.apply(tiny_llama, lorafx.Spec(lorafx.LoRA(), targets=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(lorafx.SpecError, match="already exists"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(), targets=["v_proj"]))
    assert_unchanged(before, model)


def test_adapters_follow_to_and_deepcopy(tiny_llama):
    model = lorafx.apply(tiny_llama, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["q_proj"]))
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 4))
    assert torch.equal(twin(ids).logits, model(ids).logits)
    next(p for p in twin.parameters() if p.requires_grad).data.add_(1.0)
    assert not torch.equal(twin(ids).logits, model(ids).logits)  # independent copies
    model.to(torch.float64)
    assert lorafx.iter_sites(model)["model.layers.0.self_attn.q_proj"].adapters["default"].lora_A.dtype == torch.float64
    assert model(ids).logits.dtype == torch.float64
