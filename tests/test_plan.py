"""One plan: ``inspect`` describes the plan ``apply`` builds and never traces more; its FLOPs are the
ones the rewritten graph executes (counted independently, on the graph itself)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx import regions
from lorafx.cli.models import TinyMLP, tiny_llama


def count_traces(monkeypatch) -> dict:
    """Count every fx trace lorafx's region tracer runs."""
    calls = {"n": 0}
    real = regions._Tracer.trace

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(regions._Tracer, "trace", counting)
    return calls


@pytest.mark.parametrize("targets", [["q_proj", "up_proj"], "all-linear"], ids=["q+up", "all-linear"])
def test_inspect_traces_no_more_than_apply(monkeypatch, targets):
    spec = lorafx.Spec(lorafx.LoRA(r=4), targets=targets)
    base = tiny_llama()
    calls = count_traces(monkeypatch)
    lorafx.build_report(base, spec)
    inspected = calls["n"]
    calls["n"] = 0
    lorafx.apply(copy.deepcopy(base), spec)
    applied = calls["n"]
    assert 0 < inspected <= applied, (inspected, applied)


def addmm_flops(_self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def executed_flops(model, x) -> int:
    # The eager site adds its expand in place (aten.addmm_), which FlopCounterMode has no formula for:
    # count it like addmm, so that every matmul the graph runs is counted.
    mapping = {torch.ops.aten.addmm_: addmm_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "config",
    [
        lorafx.MoR(r=8, experts=4),
        lorafx.LoRA(r=8),
        lorafx.CapaBoost(r=4, copies=2),
        lorafx.UniLoRA(r=4, vector_length=512),
    ],
    ids=lambda c: c.name,
)
def test_inspect_flops_equal_the_executed_ones(config):
    """Per-token adapter FLOPs from the report = FLOPs of the adapted model minus the base model's,
    measured by running both (MoR included: its shared shrink makes the canonical count 1.73× too
    high at r=8, N=4, d=64)."""
    torch.manual_seed(0)
    base = TinyMLP(d_in=64, hidden=64).eval()
    spec = lorafx.Spec(config, targets=["up", "mid"])
    report = lorafx.build_report(base, spec)
    adapted = lorafx.apply(copy.deepcopy(base), spec).eval()
    per_token = []
    for tokens in (3, 5):
        x = torch.randn(tokens, 64)
        per_token.append(executed_flops(adapted, x) - executed_flops(base, x))
    executed = (per_token[1] - per_token[0]) // 2
    fixed = per_token[0] - 3 * executed
    assert sum(s.flops_per_token for s in report.matched) == executed
    assert sum(s.flops_fixed for s in report.matched) == fixed
