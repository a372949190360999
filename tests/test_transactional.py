"""apply / merge / unmerge / load_adapter / from_peft complete, or leave the model bit for bit as it was.

Failures are forced halfway with fault injection: the N-th call of an internal function raises
:class:`Injected`. Each case checks that the fault was actually reached (so the test is not vacuous),
that the model is unchanged (:mod:`model_state`: state_dict bytes, module tree, fx code,
requires_grad, lorafx bookkeeping), and that the same operation then succeeds on that model.
"""

from __future__ import annotations

import builtins
import importlib

import pytest
import torch
from model_state import assert_unchanged, snapshot
from tolerances import MERGED_LOGITS_FP32, UNMERGED_WEIGHT_FP32, assert_close
from variant_cases import example_configs

import lorafx
from lorafx.cli.models import TinyMLP, tiny_llama
from lorafx.variants.lora import LoRA, LoRAAdapter

# ``lorafx.apply`` / ``lorafx.merge`` are the functions; the modules are needed to patch internals.
apply_mod = importlib.import_module("lorafx.apply")
merge_mod = importlib.import_module("lorafx.merge")
state_mod = importlib.import_module("lorafx.state")


class Injected(RuntimeError):
    """The forced failure."""


def fail_on_call(monkeypatch, owner, attr: str, n: int) -> dict:
    """Make the ``n``-th call of ``owner.attr`` raise :class:`Injected`; returns the call counter."""
    real = getattr(owner, attr) if hasattr(owner, attr) else getattr(builtins, attr)
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Injected(f"{attr} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, faulty, raising=False)
    return calls


def small_llama():
    return tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)


def lora_spec(seed_init="random"):
    return lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init=seed_init), targets="all-linear")


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

# (owner, attribute, failing call) inside apply(): build phase and commit phase.
APPLY_FAULTS = {
    "second adapter construction": (LoRA, "make_adapter", 2),
    "second region rewrite": (apply_mod, "insert_adapters", 2),
    "second region swap (commit)": (apply_mod, "setattr", 2),  # module global shadows the builtin
    "activation (commit, last step)": (state_mod, "set_adapter", 1),
}


def _expect_failure(monkeypatch, model, fault, op):
    owner, attr, n = fault
    before = snapshot(model)
    calls = fail_on_call(monkeypatch, owner, attr, n)
    with pytest.raises(Injected):
        op()
    assert calls["n"] >= n, f"fault {attr}#{n} not reached"  # undo may call it again (setattr)
    monkeypatch.undo()
    assert_unchanged(before, model)


@pytest.mark.parametrize("fault", list(APPLY_FAULTS), ids=list(APPLY_FAULTS))
@pytest.mark.parametrize("second", [False, True], ids=["first-adapter", "second-adapter"])
def test_apply_fails_halfway_leaves_model_unchanged(monkeypatch, fault, second):
    model = small_llama()
    if second:
        # the first adapter covers q/v only: the second both adds to existing sites and rewrites new regions
        first = lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["q_proj", "v_proj"])
        model = lorafx.apply(model, first, name="first")
    _expect_failure(monkeypatch, model, APPLY_FAULTS[fault], lambda: lorafx.apply(model, lora_spec(), name="new"))
    model = lorafx.apply(model, lora_spec(), name="new")  # and then it works
    assert lorafx.active_adapter(model) == "new"


@pytest.mark.parametrize(
    "fault", ["second adapter construction", "second region swap (commit)", "activation (commit, last step)"]
)
@pytest.mark.parametrize("name", list(example_configs()))
def test_apply_every_variant_fails_halfway(monkeypatch, name, fault):
    cfg = example_configs()[name]
    owner, attr, n = APPLY_FAULTS[fault]
    owner = type(cfg) if owner is LoRA else owner
    model = small_llama()
    spec = lorafx.Spec(cfg, targets="all-linear")
    _expect_failure(monkeypatch, model, (owner, attr, n), lambda: lorafx.apply(model, spec))


@pytest.mark.parametrize("name", list(example_configs()))
def test_apply_every_variant_whole_model_region_commit_failure(monkeypatch, name):
    # TinyMLP traces whole: apply returns a new GraphModule root; a failed commit must leave the
    # original module (whose parameters that root shares) untouched, requires_grad included.
    torch.manual_seed(0)
    model = TinyMLP()
    spec = lorafx.Spec(example_configs()[name], targets="all-linear")
    _expect_failure(monkeypatch, model, (state_mod, "set_adapter", 1), lambda: lorafx.apply(model, spec))
    assert all(p.requires_grad for p in model.parameters())


def _merged_model():
    model = small_llama()
    model = lorafx.apply(model, lora_spec())
    return model


@pytest.mark.parametrize("keep_original", [False, True])
def test_merge_fails_at_second_weight_copy(monkeypatch, keep_original):
    model = _merged_model()
    reference = model(IDS).logits.detach()
    _expect_failure(monkeypatch, model, (merge_mod, "_delta", 2), lambda: lorafx.merge(model, keep_original))
    lorafx.merge(model, keep_original)
    assert lorafx.is_merged(model)
    assert_close(model(IDS).logits, reference, **MERGED_LOGITS_FP32)


def test_unmerge_fails_at_second_weight_copy(monkeypatch):
    model = _merged_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorafx.merge(model)
    _expect_failure(monkeypatch, model, (merge_mod, "_delta", 2), lambda: lorafx.unmerge(model))
    assert lorafx.is_merged(model)
    lorafx.unmerge(model)
    assert not lorafx.is_merged(model)
    for k, v in model.state_dict().items():
        assert_close(v, base[k], **UNMERGED_WEIGHT_FP32)


@pytest.fixture
def saved(tmp_path):
    """A trained-looking (random B) LoRA adapter in lorafx and in PEFT format, and its logits."""
    model = lorafx.apply(small_llama(), lora_spec())
    lorafx.save_adapter(model, tmp_path / "lorafx")
    lorafx.to_peft(model, tmp_path / "peft")
    return tmp_path, model(IDS).logits.detach()


LOAD_FAULTS = {
    "second tensor copy": (LoRAAdapter, "load_state_dict", 2),
    "second region swap (commit)": (apply_mod, "setattr", 2),
    "activation (commit)": (state_mod, "set_adapter", 1),
}


@pytest.mark.parametrize("fault", list(LOAD_FAULTS), ids=list(LOAD_FAULTS))
@pytest.mark.parametrize("fmt", ["lorafx", "peft"])
def test_load_fails_halfway_leaves_model_unchanged(monkeypatch, saved, fault, fmt):
    path, expected = saved
    load = lorafx.load_adapter if fmt == "lorafx" else lorafx.from_peft
    model = small_llama()
    _expect_failure(monkeypatch, model, LOAD_FAULTS[fault], lambda: load(model, path / fmt))
    model = load(model, path / fmt)
    assert_close(model(IDS).logits, expected)


@pytest.mark.parametrize("name", list(example_configs()))
def test_load_every_variant_fails_at_second_tensor_copy(monkeypatch, tmp_path, name):
    cfg = example_configs()[name]
    torch.manual_seed(0)
    trained = lorafx.apply(small_llama(), lorafx.Spec(cfg, targets="all-linear"))
    lorafx.save_adapter(trained, tmp_path)
    adapter_cls = type(cfg.make_adapter(4, 4, "probe"))
    model = small_llama()
    load = lambda: lorafx.load_adapter(model, tmp_path)  # noqa: E731
    _expect_failure(monkeypatch, model, (adapter_cls, "load_state_dict", 2), load)
    model = load()
    trained.eval(), model.eval()
    with torch.no_grad():
        assert_close(model(IDS).logits, trained(IDS).logits)
