"""torch.compile on adapted models: fullgraph, matches eager, and no recompiles on switch/load/scale.

Reference: the same model run eagerly. Recompiles are counted by Dynamo itself
(``error_on_recompile`` raises on the first one; ``unique_graphs`` counts compiled graphs).
"""

import pytest
import torch
import torch._dynamo
from tolerances import assert_close
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck
from variant_cases import example_configs

import lorafx
from lorafx.cli.models import tiny_llama

CONFIGS = example_configs()


def _adapted(cfg, names=("a", "b")):
    model = tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model = lorafx.apply(model, lorafx.Spec(cfg, targets="all-linear"), name)
    lorafx.set_adapter(model, names[0])
    return model


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            for p in sa.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_switch_load_and_scale_never_recompile(variant, tmp_path):
    model = _adapted(CONFIGS[variant])
    lorafx.save_adapter(model, tmp_path / "a", name="a")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    compiled = lorafx.compile(model)
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits)
        assert counters["stats"]["unique_graphs"] == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            model = lorafx.load_adapter(model, tmp_path / "a", name="loaded", activate=False)
            names = ["b", "a", "loaded"]
            for i in range(10):
                name = names[i % 3]
                lorafx.set_adapter(model, name)
                if i % 2:
                    _randomize(model, name, seed=i)  # new weights copied into the parameters
                if i % 3 == 2:
                    lorafx.set_scale(model, 0.5 + i)
                assert_close(compiled(ids).logits, model(ids).logits, msg=f"step {i}, adapter {name}")
    assert counters["stats"]["unique_graphs"] == 1


def test_switches_change_the_output():
    """The no-recompile test above must not pass because the compiled model ignores the switch."""
    model = _adapted(CONFIGS["lora"])
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    compiled = lorafx.compile(model)
    with torch.no_grad():
        ya = compiled(ids).logits.clone()
        lorafx.set_adapter(model, "b")
        yb = compiled(ids).logits.clone()
        lorafx.set_scale(model, 0.0)
        y0 = compiled(ids).logits.clone()
        lorafx.set_adapter(model, None)
        base = compiled(ids).logits
    assert (ya - yb).abs().max() > 1e-3
    assert_close(y0, base)  # scale 0 == adapters off
    lorafx.set_adapter(model, "a")
    assert 0.0 <= lorafx.compile_check(model, (ids,)) < 1e-4  # same code object: a cache hit, not a compile


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_compiled_training_matches_eager_in_one_graph(variant):
    """Four train steps (grads, then lorafx.step) compiled with fullgraph=True vs an eager twin.

    CE-LoRA (recompute_every=2) chooses its kept channels at steps 1 and 3: its one extra graph is the
    switch from the exact first backward to the approximate one, after which re-selection is free.
    Dropout masks (DropLoRA's rank mask) use eager's RNG in the compiled graph (``fallback_random``).
    """
    import copy
    import dataclasses

    cfg = CONFIGS[variant]
    if variant == "celora":
        cfg = dataclasses.replace(cfg, recompute_every=2)
    model = _adapted(cfg, names=("a",)).train()
    twin = copy.deepcopy(model)
    compiled = lorafx.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    expected_graphs = 2 if variant == "celora" else 1
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(4):
            ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(step))
            torch.manual_seed(step)
            got = torch.autograd.grad(compiled(ids).logits.square().mean(), params)
            torch.manual_seed(step)
            want = torch.autograd.grad(twin(ids).logits.square().mean(), twin_params)
            for g, w in zip(got, want, strict=True):
                assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"step {step}")
            lorafx.step(model)
            lorafx.step(twin)
            assert counters["stats"]["unique_graphs"] == min(step + 1, expected_graphs)
    if variant == "celora":
        ce = [m for m in model.modules() if isinstance(m, lorafx.variants.celora.CELoRAAdapter)]
        ce_twin = [m for m in twin.modules() if isinstance(m, lorafx.variants.celora.CELoRAAdapter)]
        chosen = [a.index for a in ce if a.index.numel()]
        assert chosen, "no CE-LoRA site chose channels: the approximate path was never compiled"
        for a, b in zip(ce, ce_twin, strict=True):
            assert torch.equal(a.index, b.index)


def test_compile_takes_the_celora_svd_that_apply_skipped():
    """A model adapted in eval mode (as from_pretrained returns it) and then trained: apply skips the SVD,
    lorafx.compile takes it; plain torch.compile names the site and the fix."""
    model = tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64).eval()
    model = lorafx.apply(model, lorafx.Spec(CONFIGS["celora"], targets=["up_proj", "down_proj"])).train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match=r"site 'model.layers.0.mlp.(up|down)_proj': CE-LoRA has no SVD"):
        torch.compile(model, fullgraph=True)(ids).logits.sum().backward()
    torch._dynamo.reset()
    lorafx.compile(model)(ids).logits.sum().backward()
    assert all(not sa.adapters["default"].needs_attach for sa in lorafx.iter_sites(model).values())


def test_scale_is_a_tensor_buffer_in_state_dict():
    model = _adapted(CONFIGS["lora"], names=("a",))
    sa = next(iter(lorafx.iter_sites(model).values()))
    adapter = sa.adapters["a"]
    assert isinstance(adapter.scale, torch.Tensor) and float(adapter.scale) == CONFIGS["lora"].scale
    # issue 13: the scale is state (set_scale survives state_dict round trips), one fp32 scalar per adapter
    assert sum(k.endswith(".scale_t") for k in model.state_dict()) == len(lorafx.iter_sites(model))
    adapter.to(torch.bfloat16)
    assert adapter.scale.dtype == torch.float32  # not rounded to bf16


def test_compile_rejects_bad_input():
    with pytest.raises(lorafx.SpecError, match="no lorafx sites"):
        lorafx.compile(torch.nn.Linear(2, 2))
    with pytest.raises(lorafx.SpecError, match="kernels must be one of"):
        lorafx.compile(_adapted(CONFIGS["lora"], names=("a",)), kernels="cuda")


def test_op_path_compiles_with_inductor_and_switches_without_recompiling():
    """kernels="triton" (the old name of "ops") lowers every site to torch.ops.lorafx.lora_linear (the
    composite on CPU)."""
    model = _adapted(CONFIGS["lora"])
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    compiled = lorafx.compile(model, kernels="triton", fuse_shrinks=True)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
        assert_close(out.logits, model(ids).logits)
        # inductor's output code calls the op once per site: q/k/v and gate/up share fused shrinks
        FileCheck().check_count("torch.ops.lorafx.lora_expand.default(", 5, exactly=True).run("\n".join(code))
        FileCheck().check_count("torch.ops.lorafx.lora_linear.default(", 2, exactly=True).run("\n".join(code))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "a", "b"):
                lorafx.set_adapter(model, name)
                assert_close(compiled(ids).logits, model(ids).logits)
    lorafx.use_kernels(model, "reference")  # and back: same numbers (the old names are aliases)
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits)


def test_slot_follows_active_merge_delete_and_deepcopy():
    """The core change behind zero recompiles: SiteAdapters.forward reads ``_slot`` only."""
    import copy

    model = _adapted(CONFIGS["lora"])
    sa = next(iter(lorafx.iter_sites(model).values()))
    assert sa._slot is sa.adapters["a"]
    lorafx.set_adapter(model, "b")
    assert sa._slot is sa.adapters["b"] and sa.active == "b"
    lorafx.merge(model)
    assert sa._slot is None and sa(torch.randn(1, sa.in_features)) is None
    lorafx.unmerge(model)
    assert sa._slot is sa.adapters["b"]
    twin = copy.deepcopy(model)
    tsa = next(iter(lorafx.iter_sites(twin).values()))
    assert tsa._slot is tsa.adapters["b"] and tsa._slot is not sa._slot
    lorafx.delete_adapter(model, "b")
    assert sa._slot is None and sa.active is None
    assert "_slot" not in str(list(model.state_dict()))


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_torch_export_keeps_one_lorafx_op_per_site(variant):
    """torch.export (the front-end of torch.compile's AOT path and of the ONNX exporter) on the op path:
    every site is one ``lorafx::lora_linear`` node, and the exported program equals eager."""
    model = _adapted(CONFIGS[variant], names=("a",)).eval()
    lorafx.use_kernels(model, "ops")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    ep = torch.export.export(model, (ids,))
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.lorafx.lora_linear.default]
    assert len(calls) == len(lorafx.iter_sites(model)) == 7
    with torch.no_grad():
        assert_close(ep.module()(ids).logits, model(ids).logits)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_dynamic_sequence_lengths_compile_once(variant):
    """``dynamic=True``: four sequence lengths, one graph (nothing in a site specialises on the length)."""
    model = _adapted(CONFIGS[variant], names=("a",)).eval()
    compiled = lorafx.compile(model, dynamic=True)
    with torch.no_grad():
        for length in (5, 7, 11, 3):
            ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
            assert_close(compiled(ids).logits, model(ids).logits, msg=f"length {length}")
    assert counters["stats"]["unique_graphs"] == 1


def _region_codes(model):
    from lorafx.regions import is_region

    return {name: (m, m.code) for name, m in model.named_modules() if is_region(m)}


def _root_region_model():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return lorafx.apply(mlp, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets="all-linear"))


@pytest.mark.parametrize("kind", ["regions", "whole-model region"])
def test_use_kernels_composite_undoes_ops_exactly(kind):
    """compile(kernels="ops") swaps lowered copies in (or, for a whole-model region, retargets its nodes
    through a recorded undo); use_kernels(model, "composite") puts back the same objects and code."""
    from lorafx.canonical import lora_linear
    from lorafx.kernels.site import op_lora_linear

    model = _adapted(CONFIGS["lora"]) if kind == "regions" else _root_region_model()
    x = torch.randint(0, 64, (2, 5)) if kind == "regions" else torch.randn(3, 8)
    before = _region_codes(model)
    assert (kind == "whole-model region") == ("" in before)
    with torch.no_grad():
        want = _tensor_out(model(x))
        compiled = lorafx.compile(model, kernels="ops")
        assert_close(_tensor_out(compiled(x)), want)
    during = _region_codes(model)
    targets = [n.target for m, _ in during.values() for n in m.graph.nodes if n.op == "call_function"]
    assert op_lora_linear in targets and lora_linear not in targets
    for name, (m, code) in before.items():
        if name:  # swapped out, never edited: the original objects keep their code
            assert m.code == code and during[name][0] is not m
    assert lorafx.use_kernels(model, "composite") == len(lorafx.iter_sites(model))
    after = _region_codes(model)
    assert sorted(after) == sorted(before)
    for name, (m, code) in before.items():
        assert after[name][0] is m and after[name][1] == code, name
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    with torch.no_grad():
        assert_close(_tensor_out(model(x)), want)


def test_use_kernels_is_idempotent_and_deepcopy_keeps_its_own_undo():
    import copy

    model = _adapted(CONFIGS["lora"], names=("a",))
    before = _region_codes(model)
    lorafx.use_kernels(model, "ops")
    lowered = _region_codes(model)
    lorafx.use_kernels(model, "triton")  # an alias of the current choice: nothing is swapped again
    assert all(_region_codes(model)[k][0] is m for k, (m, _) in lowered.items())
    twin = copy.deepcopy(model)
    lorafx.use_kernels(twin, "composite")  # undoes the twin's own swaps, not the model's
    assert all(_region_codes(model)[k][0] is m for k, (m, _) in lowered.items())
    assert all(_region_codes(twin)[k][1] == code for k, (_, code) in before.items())
    assert lorafx.compiler.resolve("auto", model) == "composite"  # CPU model: no Triton
    lorafx.use_kernels(model, "auto")
    assert all(_region_codes(model)[k][0] is m for k, (m, _) in before.items())


def _tensor_out(out):
    return out if isinstance(out, torch.Tensor) else out.logits
