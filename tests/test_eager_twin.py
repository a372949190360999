"""The eager-inference twin of adapted regions (lorafx.adapted_region, lorafx.passes.eager_sites).

A region called eagerly without autograd runs a twin graph whose plain-LoRA sites are three ops
(``lorafx.canonical.eager_lora_linear``). References: the canonical path of the same model (forced
with a no-op global module hook, which the twin refuses by design), the grad-enabled forward,
hand-written LoRA, and a count of the site containers' module calls (the twin makes none for a
plain-LoRA site and one per site whenever it hands over to the canonical pair).
"""

import copy
import pickle
from contextlib import contextmanager

import pytest
import torch
from tolerances import assert_close
from torch import fx

import lorafx
from lorafx.adapted_region import AdaptedRegion
from lorafx.adapter import SiteAdapters
from lorafx.canonical import eager_lora_linear, lora_linear
from lorafx.cli.models import tiny_llama
from lorafx.regions import is_region

SPEC = dict(targets="all-linear")


def _model(variant=None, second=True):
    model = tiny_llama(0)
    model = lorafx.apply(model, lorafx.Spec(variant or lorafx.LoRA(r=4, alpha=8, init="random"), **SPEC))
    if second:
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, alpha=3, init="random"), **SPEC), name="b", activate=False)
    return model.eval()


@contextmanager
def _canonical():
    """Every region takes its canonical graph: the twin does not run under a global module hook."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def container_calls(monkeypatch):
    calls = []
    forward = SiteAdapters.forward

    def counted(self, x):
        calls.append(self.site)
        return forward(self, x)

    monkeypatch.setattr(SiteAdapters, "forward", counted)
    return calls


IDS = torch.tensor([[3, 17, 5, 9], [8, 1, 2, 40]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _canonical_logits(model, ids=IDS):
    with _canonical():
        return _logits(model, ids)


def test_no_grad_eval_runs_the_twin_and_equals_the_canonical_path(container_calls):
    model = _model()
    regions = [m for m in model.modules() if is_region(m)]
    assert regions and all(isinstance(r, AdaptedRegion) for r in regions)
    y = _logits(model)
    assert container_calls == []  # every site of the tiny Llama is a plain-LoRA linear: none was called
    ref = _canonical_logits(model)
    assert len(container_calls) == len(lorafx.iter_sites(model))
    assert torch.equal(y, ref)  # the same three aten ops on the same tensors
    assert_close(model(IDS).logits.detach(), y)  # grad enabled: the canonical lowering, the parameter B


def test_the_twin_follows_every_state_change(container_calls):
    model = _model()
    sites = lorafx.iter_sites(model)
    changes = {
        "other adapter": lambda: lorafx.set_adapter(model, "b"),
        "disabled": lambda: lorafx.set_adapter(model, None),
        "back, new scale": lambda: (lorafx.set_adapter(model, "default"), lorafx.set_scale(model, 0.5)),
        "B written in place": lambda: [sa.adapters["default"].lora_B.data.mul_(3.0) for sa in sites.values()],
        "state dict load": lambda: model.load_state_dict(
            {k: v * 2 if "lora_B" in k else v for k, v in model.state_dict().items()}
        ),
        "B replaced in the parameter dict": lambda: [
            sa.adapters["default"]._parameters.__setitem__(
                "lora_B", torch.nn.Parameter(sa.adapters["default"].lora_B.detach() + 0.5)
            )
            for sa in sites.values()
        ],
        "several active": lambda: lorafx.set_adapter(model, ["default", "b"]),
        "merged": lambda: (lorafx.set_adapter(model, "default"), lorafx.merge(model)),
        "unmerged": lambda: lorafx.unmerge(model),
    }
    before = _logits(model)
    for what, change in changes.items():
        with torch.no_grad():
            change()
        if what == "B written in place":  # through .data: no version bump; model.eval() refreshes the copy
            model.eval()
        y = _logits(model)
        assert torch.equal(y, _canonical_logits(model)), what
        assert not torch.equal(y, before) or what == "unmerged", what
        before = y


def test_merged_and_disabled_sites_run_the_base_linear_alone(container_calls):
    model, base = _model(second=False), tiny_llama(0).eval()
    lorafx.set_adapter(model, None)
    assert torch.equal(_logits(model), _logits(base))  # disabled: the base model's own ops
    lorafx.set_adapter(model, "default")
    lorafx.merge(model)
    y = _logits(model)
    assert container_calls == []  # no site container was called: the twin ran the base linear itself
    assert torch.equal(y, _canonical_logits(model))
    assert len(container_calls) == len(lorafx.iter_sites(model))


def test_training_mode_and_autograd_take_the_canonical_pair(container_calls):
    model = _model(lorafx.LoRA(r=4, alpha=8, dropout=0.5, init="random"), second=False)
    n = len(lorafx.iter_sites(model))
    model.train()
    with torch.no_grad():
        model(IDS)  # dropout acts: the seeded canonical path
    assert len(container_calls) == n
    model.eval()
    model(IDS)  # autograd on
    assert len(container_calls) == 2 * n


@pytest.mark.parametrize(
    "variant",
    [
        lorafx.MoR(r=4, alpha=8, init="random"),
        lorafx.CapaBoost(r=4, alpha=8, init="random"),
        lorafx.DropLoRA(r=4, alpha=8, rank_dropout=0.5, init="random"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_other_variants_go_the_canonical_way_and_droplora_evaluates_as_lora(variant, container_calls):
    model = _model(variant, second=False)
    y = _logits(model)
    plain = type(variant).__name__ == "DropLoRA"  # no gate out of training: LoRA's own three ops
    assert (container_calls == []) == plain
    assert torch.equal(y, _canonical_logits(model))


def test_hooks_on_a_site_container_still_fire():
    model = _model(second=False)
    sa, other = list(lorafx.iter_sites(model).values())[:2]
    seen = []
    handle = sa.register_forward_hook(lambda m, i, o: seen.append(o))
    forward = other.forward  # as accelerate's add_hook_to_module does: a forward set on the instance
    other.forward = lambda x: (seen.append("instance forward"), forward(x))[1]
    y = _logits(model)
    handle.remove()
    del other.forward
    assert len(seen) == 2 and seen[0] is not None and seen[1] == "instance forward"
    assert torch.equal(y, _canonical_logits(model))


def test_inference_mode_and_autocast_equal_the_canonical_path(container_calls):
    model = _model(second=False)
    with torch.inference_mode():
        y = model(IDS).logits
    assert torch.equal(y, _canonical_logits(model))  # inference tensors keep no version: no cached Bᵀ
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb = model(IDS).logits
        with _canonical():
            ref = model(IDS).logits
    assert yb.dtype == ref.dtype and torch.equal(yb, ref)


def test_tracing_and_compiling_see_the_canonical_graph():
    model = _model(second=False)
    region = next(m for m in model.modules() if is_region(m))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        traced = fx.symbolic_trace(region)
        targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
        assert lora_linear in targets and eager_lora_linear not in targets
        exported = torch.export.export(region, (x,))
        names = {str(n.target) for n in exported.graph.nodes}
        assert not any("eager" in t for t in names), names
        compiled = torch.compile(region, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), region(x))


def test_deepcopy_keeps_the_twin_and_a_pickled_model_stays_exact(container_calls):
    model = _model(second=False)
    y = _logits(model)
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(twin), y) and container_calls == []
    assert all(isinstance(r, AdaptedRegion) for r in twin.modules() if is_region(r))
    loaded = pickle.loads(pickle.dumps(model))
    assert torch.equal(_logits(loaded), y)  # a plain GraphModule again: the canonical path


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)

    def forward(self, x, shift=None):
        y = self.down(torch.relu(self.up(x)))
        return y if shift is None else y + shift


class _Keyword(torch.nn.Module):
    """Traces whole: the model is one region, called below with keyword arguments only."""

    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x, shift):
        return self.block(shift=shift, x=x)


def test_a_region_called_with_keywords_runs_the_twin_exactly(container_calls):
    torch.manual_seed(0)
    plain = _Keyword().eval()
    model = lorafx.apply(
        copy.deepcopy(plain), lorafx.Spec(lorafx.LoRA(r=2, alpha=4, init="random"), targets=["up", "down"])
    )
    model.eval()
    assert isinstance(model, AdaptedRegion)
    x, other = torch.randn(3, 8), torch.randn(3, 6)

    def run(m):
        return m(shift=other, x=x)  # the twin's guard reads its first parameter, x, by name

    with torch.no_grad():
        got = run(model)
    assert container_calls == []  # the twin ran: the site container was not called
    up, down = (lorafx.iter_sites(model)[f"block.{k}"]._slot for k in ("up", "down"))
    with torch.no_grad():
        h = plain.block.up(x) + up.scale * (x @ up.lora_A.t()) @ up.lora_B.t()
        h = torch.relu(h)
        ref = plain.block.down(h) + down.scale * (h @ down.lora_A.t()) @ down.lora_B.t() + other
        assert torch.equal(got, _canonical_run(model, run))
    assert_close(got, ref)


def _canonical_run(model, run):
    with _canonical():
        return run(model)


def test_a_region_is_called_as_a_plain_module():
    """No fx call wrapper: hooks on a region run, an error keeps its traceback through the twin's
    generated lines, and fx's tracer (which patches nn.Module.__call__) still traces through."""
    model = _model(second=False)
    region = next(m for m in model.modules() if is_region(m) and m.graph.find_nodes(op="placeholder"))
    for r in (region, copy.deepcopy(region)):
        assert "__call__" not in type(r).__dict__ and type(r).__call__ is torch.nn.Module.__call__
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        plain = region(x)
        handle = region.register_forward_hook(lambda m, i, o: o * 2)
        pre = region.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
        assert torch.equal(region(x), 2 * region.forward(x + 1))
        handle.remove(), pre.remove()
        with pytest.raises(RuntimeError) as err:
            region(torch.randn(2, 3, 65))  # wrong width: the base matmul refuses it inside the twin
    frames = [f for f in err.traceback if str(f.path).startswith("<lorafx eager twin")]
    assert frames and "eager_lora_linear" in str(frames[-1].statement)
    outer = torch.nn.Sequential(region)
    traced = fx.symbolic_trace(outer)
    assert lora_linear in {n.target for n in traced.graph.nodes}
    assert torch.equal(traced(x), plain)
