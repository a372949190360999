"""Shared pieces of the ONNX export tests: tiny models, a test-only gated variant, comparisons."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

import lorafx
from lorafx.adapter import Adapter, Lowered
from lorafx.config import _VARIANTS, AdapterConfig, register_variant
from tests.tolerances import ONNX_FP32


@dataclass(frozen=True)
class GatedForTests(AdapterConfig):
    """A gated variant shaped like MoR (softmax router over rank slots), so the ``params`` export form
    is covered before MoR lands: ``delta = s·((x Aᵀ) ⊙ softmax(x Wgᵀ)) Bᵀ``."""

    name: ClassVar[str] = "gated_for_tests"
    r: int = 4
    alpha: float = 8.0

    def mergeable(self) -> bool:
        return False

    def make_adapter(self, in_features, out_features, site):
        return _GatedAdapter(self, in_features, out_features, site)


class _GatedAdapter(Adapter):
    def __init__(self, config, in_features, out_features, site):
        super().__init__(config, in_features, out_features, site)
        self.A = nn.Parameter(torch.randn(config.r, in_features) / in_features**0.5)
        self.B = nn.Parameter(torch.randn(out_features, config.r) / config.r**0.5)
        self.router = nn.Parameter(torch.randn(config.r, in_features))

    def lower(self, x):
        return Lowered(x, self.A, self.B, self.config.alpha / self.config.r, torch.softmax(x @ self.router.t(), dim=-1))


def perturb(model: nn.Module, name: str, seed: int) -> None:
    """Add noise to every floating parameter of adapter ``name`` (sites and shared) so two adapters surely differ."""
    g = torch.Generator().manual_seed(seed)
    modules = [sa.adapters[name] for sa in lorafx.iter_sites(model).values() if name in sa.adapters]
    shared = getattr(model, "lorafx_shared", {})  # model-level state, e.g. Uni-LoRA's one vector
    modules += [m for k, m in shared.items() if k.split("__")[0] == name]
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)


@torch.no_grad()
def eager(model: nn.Module, inputs, name: str | None) -> np.ndarray:
    """Eager output (first tensor output) with adapter ``name`` active, in eval mode."""
    if name is not None:
        lorafx.set_adapter(model, name)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
    return out.numpy()


def genai_decode(model_dir, adapters: dict, ids: np.ndarray, adapter: str | None, new: int, exact: bool = False):
    """Greedy onnxruntime-genai tokens ``[batch, prompt + new]`` of the model in ``model_dir`` with the
    ``.onnx_adapter`` files ``adapters`` (name -> path under ``model_dir``) loaded and ``adapter`` active
    (None: none, the zero defaults). ``exact``: exactly ``new`` tokens (no stop at EOS), a batch of rows."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    loaded = og.Adapters(model)
    for name, path in adapters.items():
        loaded.load(str(model_dir / path), name)
    params = og.GeneratorParams(model)
    n = ids.shape[1] + new
    extra = {"min_length": n, "batch_size": ids.shape[0]} if exact else {}
    params.set_search_options(max_length=n, do_sample=False, **extra)
    gen = og.Generator(model, params)
    if adapter is not None:
        gen.set_active_adapter(loaded, adapter)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return np.stack([np.array(gen.get_sequence(i)) for i in range(ids.shape[0])])


def close(got: np.ndarray, want: np.ndarray) -> None:
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), torch.from_numpy(want), **ONNX_FP32)


def op_types(path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def initializer_shapes(path) -> list[tuple]:
    import onnx

    return sorted(tuple(t.dims) for t in onnx.load(str(path)).graph.initializer)


@contextlib.contextmanager
def gated_registered():
    """Register :class:`GatedForTests` for the duration (its adapter files name it), then remove it
    so that no other test sees a test-only variant in the registry."""
    register_variant(GatedForTests)
    try:
        yield
    finally:
        _VARIANTS.pop(GatedForTests.name, None)
