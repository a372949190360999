"""Give a region copy's quantized sites dense base weights, for passes that need a plain graph (ONNX).

A bitsandbytes site calls ``quantized_lora_linear(x, lorafx.<key>, low)`` (or its ``"ops"`` twin) (its base is the module's
own forward, a bitsandbytes op that ONNX cannot express); a torchao site calls a site implementation
with a tensor-subclass weight. In the copy, each becomes a registered site call
``lora_linear(x, W, b, low)`` with ``W = dequant(Wq)`` in the compute dtype (a non-persistent buffer of
the copy), so the export passes see an ordinary site whose adapter they can feed. The live region is
not modified and no base weight is copied into it.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lorafx.canonical import is_quantized_site_call, is_site_call, lora_linear
from lorafx.passes.insert_adapters import copy_graph_module
from lorafx.quantized import dense_linear, quantized_kind


def _is_quantized_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    if is_quantized_site_call(node):
        return True
    if is_site_call(node) and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        w = getattr(gm.get_submodule(node.args[1].target.rpartition(".")[0]), node.args[1].target.rpartition(".")[2])
        return isinstance(w, torch.Tensor) and is_traceable_wrapper_subclass(w)
    return False


def _dense(new: fx.GraphModule, node: fx.Node) -> nn.Linear:
    if is_quantized_site_call(node):
        base = new.get_submodule(node.args[1].target).base
        return base if quantized_kind(base) is None else dense_linear(base)  # merged: already dense
    owner = new.get_submodule(node.args[1].target.rpartition(".")[0])
    return dense_linear(owner)


def dequantize_sites(gm: fx.GraphModule) -> PassResult:
    """A copy of ``gm`` whose quantized sites are ``lora_linear`` on ``dequant(Wq)`` (see the module
    docstring); ``gm`` itself when it has none (``modified`` False)."""
    if not any(_is_quantized_node(gm, n) for n in gm.graph.nodes):
        return PassResult(gm, False)
    new = copy_graph_module(gm, gm.graph, class_name=type(gm).__name__)
    for i, node in enumerate([n for n in new.graph.nodes if _is_quantized_node(new, n)]):
        dense = _dense(new, node)
        weight, bias = f"lorafx_dequantized_{i}_weight", f"lorafx_dequantized_{i}_bias"
        new.register_buffer(weight, dense.weight.detach(), persistent=False)
        if dense.bias is not None:
            new.register_buffer(bias, dense.bias.detach(), persistent=False)
        x, low = node.args[0], node.args[-1] if is_quantized_site_call(node) else node.args[3]
        old = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
        with new.graph.inserting_before(node):
            w = new.graph.get_attr(weight)
            b = new.graph.get_attr(bias) if dense.bias is not None else None
            y = new.graph.call_function(lora_linear, (x, w, b, low))
        y.meta.update(node.meta)
        node.replace_all_uses_with(y)
        new.graph.erase_node(node)
        for a in old:
            if not a.users:
                new.graph.erase_node(a)
    new.graph.lint()
    new.recompile()
    return PassResult(new, True)
