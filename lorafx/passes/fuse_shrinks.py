"""Fuse the adapter shrinks of sibling sites that read the same input into one matmul.

In a whole-model graph (Dynamo's, under :func:`lorafx.compile`), q/k/v read the same normed hidden
state and gate/up the same MLP input. Each ``lorafx::lora_linear`` computes its own shrink
``x Aᵢᵀ`` (``[T, rᵢ]``): three thin matmuls that each re-read ``x``. This pass rewrites a group of
``lora_linear`` nodes (the ``"ops"`` site implementation, :mod:`lorafx.passes.lower_to_ops`) sharing
their adapter input into::

    h   = linear(x_in, cat([A₁, A₂, A₃]))       # one [T, Σrᵢ] shrink, x read once
    hᵢ  = narrow(h, -1, offsetᵢ, rᵢ)
    yᵢ  = lorafx::lora_expand(xᵢ, Wᵢ, bᵢ, hᵢ, Bᵢ, sᵢ, gᵢ)

Autograd goes through ``cat``/``narrow`` and ``lora_expand``'s own backward. The ``cat`` of adapter
weights is ``Σrᵢ·d_in`` elements per step (48×4096 at r=16 on Llama-7B q/k/v), negligible next to x.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

import lorafx.kernels  # registers torch.ops.lorafx

_ARGS = ("x", "W", "b", "A", "B", "s", "g", "x_in")


def _operands(node: fx.Node) -> dict:
    vals = dict(zip(_ARGS, node.args, strict=False))
    vals.update(node.kwargs)
    return {k: vals.get(k) for k in _ARGS}


def _meta(arg):
    return arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, fx.Node) else None


def _site_ops() -> tuple:
    """The op overloads an op-lowered site calls: ``lorafx::lora_linear``, and on CUDA with triton
    its ``triton_op`` twin ``lorafx::lora_linear_triton`` (same schema, same operands)."""
    twin = lorafx.kernels.lora_linear.cuda_op()
    if twin is lorafx.kernels.lora_linear.lora_linear:
        return (torch.ops.lorafx.lora_linear.default,)
    return (torch.ops.lorafx.lora_linear.default, torch.ops.lorafx.lora_linear_triton.default)


def _groups(gm: fx.GraphModule) -> list[list[tuple[fx.Node, dict]]]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_input = defaultdict(list)
    site_ops = _site_ops()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in site_ops:
            ops_ = _operands(node)
            A = _meta(ops_["A"])
            if A is None:
                continue
            key = ops_["x_in"] if ops_["x_in"] is not None else ops_["x"]
            by_input[(key, A.dtype, A.shape[-1])].append((node, ops_))
    groups = []
    for members in by_input.values():
        if len(members) < 2:
            continue
        ready = max(order[m[1]["A"]] for m in members)  # every A must exist before the first site
        if ready < min(order[m[0]] for m in members):
            groups.append(members)
    return groups


def fuse_shrinks_(gm: fx.GraphModule) -> PassResult:
    """Rewrite ``gm`` in place (see the module docstring); returns ``PassResult(gm, modified)``."""
    groups = _groups(gm)
    for members in groups:
        first = min((m[0] for m in members), key=list(gm.graph.nodes).index)
        x_in = members[0][1]["x_in"] if members[0][1]["x_in"] is not None else members[0][1]["x"]
        dtype = _meta(members[0][1]["A"]).dtype
        with gm.graph.inserting_before(first):
            a_cat = gm.graph.call_function(torch.cat, ([m[1]["A"] for m in members], 0))
            x_cast = gm.graph.call_method("to", (x_in, dtype))
            h = gm.graph.call_function(F.linear, (x_cast, a_cat))
        offset = 0
        for node, o in members:
            r = _meta(o["A"]).shape[0]
            with gm.graph.inserting_before(node):
                h_i = gm.graph.call_function(torch.narrow, (h, -1, offset, r))
                args = (o["x"], o["W"], o["b"], h_i, o["B"], o["s"], o["g"])
                y = gm.graph.call_function(torch.ops.lorafx.lora_expand.default, args)
            y.meta.update(node.meta)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            offset += r
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(groups))


def fusing_backend(inner="inductor"):
    """A torch.compile backend that runs :func:`fuse_shrinks_` on Dynamo's graph, then ``inner``."""
    inner_fn = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner

    def backend(gm: fx.GraphModule, example_inputs):
        fuse_shrinks_(gm)
        return inner_fn(gm, example_inputs)

    return backend
