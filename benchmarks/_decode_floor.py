"""Lower bounds for unmerged eager decoding: lorafx's sites replaced by hand-written code with no checks.

Helpers of ``benchmarks/overhead.py --decode``. Each floor is a copy of the lorafx model whose adapted
regions run their eager twin's graph (:mod:`lorafx.passes.eager_sites`) with every site replaced by
fixed operands and a fixed sequence of ATen calls: nothing is checked per call (no guard, no cache key,
no dtype test), so a floor is only right for the model as it was when built, in eval, without autograd.
They answer "how close to the base model can any unmerged implementation in separate ATen calls get on
this machine", beside the real thing in the same run:

* ``3 ops``: ``y = x Wᵀ``, ``h = x Aᵀ``, ``y += s·h Bᵀ`` on a contiguous ``Bᵀ`` (what
  :func:`lorafx.canonical.eager_lora_linear` runs after its checks): four ATen calls more than the base
  per site (the shrink, two views, ``addmm_``).
* ``A in W's GEMM``: ``A`` stored as ``R`` extra rows of ``W`` (one ``[d_out + R, d_in]`` buffer), so one
  GEMM gives ``x Wᵀ`` and ``x Aᵀ`` into a buffer made once per input shape, then one ``baddbmm`` for the
  expand: one ATen call more than the base per site, and ``A`` read in the weight stream. Bit-equal to
  ``3 ops`` here (MKL's result columns do not depend on ``N``); a storage layout lorafx does not use (file
  writers, DDP buckets, FSDP shards and ``.data`` writes would all see ``W`` and ``A`` share a storage).

Compiled, the same ``A in W's GEMM`` sites written for inductor (one GEMM, then the one-token expand as
a product and a sum over ``R`` that inductor fuses with the add into one loop, as lorafx's one-token
graph does) bound any unmerged compiled step: one extern GEMM per site, as the base model has, plus one
small generated kernel and ``A``'s and ``B``'s bytes.

Merged weights (``lorafx.merge``) are the bound no unmerged path can beat: the base model's cost.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import lorafx
from lorafx.adapted_region import CONTAINER, AdaptedRegion
from lorafx.canonical import eager_lora_linear
from lorafx.passes.eager_sites import eager_sites_graph

FLOORS = ("3 ops", "A in W's GEMM", "merged")  # the contender names, in the tables' order
_OPS = "_floor_operands"  # where a floor keeps a site's fixed operands (on its container's __dict__)


def _three_ops(x, weight, bias, sites):
    A, Bt, s = sites.__dict__[_OPS]
    y = F.linear(x, weight, bias)
    y.view(-1, y.shape[-1]).addmm_(F.linear(x, A).view(-1, A.shape[0]), Bt, alpha=s)
    return y


def _shrink_in_gemm(x, weight, bias, sites):
    ops = sites.__dict__[_OPS]
    out = ops["shapes"].get(x.shape)
    if out is None:  # once per input shape: the GEMM's output buffer, its two halves, Bᵀ per batch row
        buf = x.new_empty((*x.shape[:-1], ops["WA"].shape[0]))
        d_out = ops["d_out"]
        bt = ops["Bt"][None].expand(x.shape[0], -1, -1)  # x is [batch, tokens, d_in] (decoder LMs)
        out = ops["shapes"][x.shape] = (buf, buf[..., :d_out], buf[..., d_out:], bt)
    buf, y, h, bt = out
    torch.matmul(x, ops["WAt"], out=buf)
    return torch.baddbmm(y, h, bt, alpha=ops["s"])


def _shrink_in_gemm_graph(x, weight, bias, sites):
    yh = F.linear(x, sites.floor_wa)
    d_out = weight.shape[0]
    delta = (yh[..., d_out:, None] * sites.floor_bt).sum(-2)  # [.., R, 1] * [R, d_out], summed over R
    return yh[..., :d_out] + delta * sites.floor_s


def _operands(adapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    A, B, s = adapter.effective_weights()
    return A.detach(), B.detach().t().contiguous(), float(s)


def _floor(fx_model: torch.nn.Module, site_fn, prepare) -> torch.nn.Module:
    """A copy of ``fx_model`` whose regions run ``site_fn(x, W, b, sites)`` at each plain site, with
    ``prepare(region, weight_node, sites)`` storing the site's fixed operands first."""
    model = copy.deepcopy(fx_model).eval()
    for region in model.modules():
        if not isinstance(region, AdaptedRegion):
            continue
        graph = eager_sites_graph(region.graph, CONTAINER)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op == "call_function" and node.target is eager_lora_linear:
                x, weight, bias, key = node.args
                if bias is not None or weight.op != "get_attr":
                    raise ValueError(f"the decode floors take bias-free linear sites only, not {node.format_node()}")
                sites = getattr(region, CONTAINER)[key.args[1]]
                prepare(region, weight.target, sites)
                node.target = site_fn
        code = graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<decode floor {site_fn.__name__}>", "exec"), namespace)  # noqa: S102
        type(region).forward = namespace["forward"]
    return model


def _prepare_three_ops(region, weight_name, sites):
    sites.__dict__[_OPS] = _operands(sites._slot)


def _packed(region, weight_name, sites) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``([W; A], Bᵀ, s)`` of a site, the floor's ``W`` rehomed to the first rows of the shared buffer."""
    A, Bt, s = _operands(sites._slot)
    weight = region.get_parameter(weight_name)
    WA = torch.cat([weight.detach(), A])
    weight.data = WA[: weight.shape[0]]
    return WA, Bt, s


def _prepare_shrink_in_gemm(region, weight_name, sites):
    WA, Bt, s = _packed(region, weight_name, sites)
    d_out = WA.shape[0] - Bt.shape[0]
    sites.__dict__[_OPS] = {"WA": WA, "WAt": WA.t(), "Bt": Bt, "s": s, "d_out": d_out, "shapes": {}}


def _prepare_shrink_in_gemm_graph(region, weight_name, sites):
    WA, Bt, s = _packed(region, weight_name, sites)
    sites.register_buffer("floor_wa", WA, persistent=False)  # buffers: torch.compile lifts them as inputs
    sites.register_buffer("floor_bt", Bt, persistent=False)
    sites.floor_s = s


def _merged(fx_model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(fx_model).eval()
    lorafx.merge(model)
    return model


def floor_models(fx_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The eager floors and the merged model, each a copy of ``fx_model`` (a lorafx model with one
    plain LoRA adapter per site), keyed by the contender names of the decode tables."""
    return {
        "3 ops": _floor(fx_model, _three_ops, _prepare_three_ops),
        "A in W's GEMM": _floor(fx_model, _shrink_in_gemm, _prepare_shrink_in_gemm),
        "merged": _merged(fx_model),
    }


def compiled_floor_models(fx_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The compiled floor and the merged model, uncompiled (``compiled_floor_steps`` compiles them)."""
    return {
        "A in W's GEMM": _floor(fx_model, _shrink_in_gemm_graph, _prepare_shrink_in_gemm_graph),
        "merged": _merged(fx_model),
    }


def compiled_floor_steps(models: dict) -> dict:
    """``torch.compile(fullgraph=True)`` of each of :func:`compiled_floor_models`."""
    return {k: torch.compile(m, fullgraph=True) for k, m in models.items()}
