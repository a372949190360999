"""Sibling shrink fusion on Dynamo's whole-model graph: q/k/v and gate/up each become one shrink.

Reference: the unfused eager model (the canonical composite). The graph is checked for what the pass
promises (op counts), and values and adapter gradients must match."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from tolerances import assert_close

import lorafx
from lorafx.cli.models import tiny_llama
from lorafx.passes.fuse_shrinks import fusing_backend


def _model():
    model = tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
    torch.manual_seed(0)
    return lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets="all-linear"))


def test_fused_graph_has_one_shrink_per_sibling_group():
    torch._dynamo.reset()
    model = _model()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    params = [p for p in model.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(want.square().mean(), params)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = lorafx.compile(model, kernels="ops", fuse_shrinks=True, backend=fusing_backend(capture))
    got = compiled(ids).logits
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lorafx.lora_expand.default) == 5  # q, k, v, gate, up
    assert targets.count(torch.ops.lorafx.lora_linear.default) == 2  # o_proj, down_proj: alone
    shrinks = [n for n in graphs[0].graph.nodes if n.target is torch.cat and any(u.target is F.linear for u in n.users)]
    assert sorted(len(n.args[0]) for n in shrinks) == [2, 3]  # [gate, up], [q, k, v]
    assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.square().mean(), params), want_grads, strict=True):
        assert_close(g, w, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_fuse_shrinks_needs_op_lowering():
    with pytest.raises(lorafx.SpecError, match="fuse_shrinks"):
        lorafx.compile(_model(), kernels="composite", fuse_shrinks=True)
