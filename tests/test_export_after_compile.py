"""Export whatever the live sites call: after ``lorafx.compile(model, kernels=...)`` and after the
live regions were swapped for copies whose sites call another registered implementation.

Each case exports merged, unmerged and multi and compares onnxruntime with eager (``check_onnx``);
after every export the model's regions are the same objects with the same generated code, and no
module has an instance ``forward``.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx

import lorafx
from lorafx.apply import swap_regions
from lorafx.canonical import SITE_IMPLEMENTATIONS
from lorafx.cli.models import tiny_llama, tiny_mlp
from lorafx.export import check_onnx
from lorafx.passes.feed_adapters import FED, FedSite, feed_adapters
from lorafx.passes.insert_adapters import CONTAINER
from lorafx.passes.retarget_sites import retarget_sites
from lorafx.regions import is_region
from tests.export_helpers import perturb
from tests.tolerances import ONNX_FP32

pytest.importorskip("onnxruntime")

TINY = dict(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
MODELS = {  # tiny_mlp traces whole (the root is the region); Llama has a region per MLP / projection
    "mlp": (tiny_mlp, ["up", "mid"], ["up"], lambda: torch.randn(4, 32)),
    "llama": (lambda: tiny_llama(**TINY), ["q_proj", "up_proj"], ["q_proj"], lambda: {"input_ids": ids()}),
}


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (4, 6))


def _two_adapters(kind: str):
    make, first, second, example = MODELS[kind]
    torch.manual_seed(0)
    model = lorafx.apply(make(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=first))
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=second), name="b")
    perturb(model, "b", 1)
    lorafx.set_adapter(model, "default")
    return model.eval(), example()


def _regions(model) -> dict[str, fx.GraphModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, fx.GraphModule) and hasattr(m, CONTAINER)}


def _retargeted(model):
    """The live regions swapped for copies whose sites call ``"functional"`` (what kernel lowering
    by region swap does); the root copy takes over the model's adapter state as ``commit`` does."""
    copies = [(fqn, retarget_sites(gm, "functional").graph_module) for fqn, gm in _regions(model).items()]
    root = swap_regions(model, copies, [])
    if root is not model:
        lorafx.state.put(root, lorafx.state.get(model))
    return root


def _export_all_modes(model, example) -> None:
    codes = {n: gm.code for n, gm in _regions(model).items()}
    modules = [(n, id(m)) for n, m in model.named_modules()]
    for mode in ("merged", "unmerged", "multi"):
        assert check_onnx(model, example, mode) <= ONNX_FP32["atol"], mode
        assert {n: gm.code for n, gm in _regions(model).items()} == codes
        assert [(n, id(m)) for n, m in model.named_modules()] == modules
        assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert lorafx.active_adapter(model) == "default" and not lorafx.is_merged(model)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_after_compile_with_op_kernels(kind):
    model, example = _two_adapters(kind)
    lorafx.compile(model, kernels="triton")  # sites now call the lorafx:: op wrapper (not ONNX-exportable)
    targets = {n.target for gm in _regions(model).values() for n in gm.graph.nodes if n.op == "call_function"}
    assert SITE_IMPLEMENTATIONS["composite"] not in targets
    _export_all_modes(model, example)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_after_regions_were_retargeted(kind):
    model, example = _two_adapters(kind)
    model = _retargeted(model)
    assert all(is_region(gm) for gm in _regions(model).values())  # copies keep the region's container
    _export_all_modes(model, example)


def test_feed_adapters_is_pure_and_feeds_every_site():
    model, x = _two_adapters("mlp")
    assert is_region(model)
    before, live = model.code, dict(getattr(model, CONTAINER))
    seen = []

    def lowered_for(sa, xin):
        seen.append(sa.site)
        return None  # the base output: the fed graph must then equal the plain model

    new = feed_adapters(model, lowered_for)
    assert new.modified and model.code == before and dict(getattr(model, CONTAINER)) == live
    fed = getattr(new.graph_module, FED)
    assert {k: type(m) for k, m in fed.items()} == {"up": FedSite, "mid": FedSite}
    assert all(fed[k].site_adapters is live[k] for k in fed)
    calls = [n for n in new.graph_module.graph.nodes if n.op == "call_function" and len(n.args) == 4]
    assert calls and all(n.target is SITE_IMPLEMENTATIONS["functional"] for n in calls)
    with torch.no_grad():
        torch.testing.assert_close(new.graph_module(x), tiny_mlp()(x))
    assert seen == ["up", "mid"]
    assert not [k for k in new.graph_module.state_dict() if k.startswith(FED)]  # no second name per parameter
