"""The variant test cases, one table: each variant's configs, its paper formula and closed forms.

``tests/test_variants.py`` runs every row against its invariants (``make``, ``delta``,
``per_site_params``, ...); the tables that run every variant once (ONNX, compile, files, bad input,
...) take each variant's ``example`` config through :func:`example_configs`. Variants that are not
registered yet are skipped there, so a test table grows as variants land. The constructor arguments
are the variants' public API (see lorafx/variants/*.py).

The reference formulas are written from the papers' equations (VARIANTS.md), not from the canonical
lowering: MoR as a sum over experts, CapaBoost as a sum over masked copies (Uni-LoRA, whose formula
needs the whole model, is special-cased by its tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import lorafx

# -- the paper formulas: delta(x) of one site, from the adapter's raw tensors --------------------------


def delta_lora(a, x, gate, scale):
    return scale * (x @ a.lora_A.t()) @ a.lora_B.t()


def delta_droplora(a, x, gate):
    h = x @ a.lora_A.t()
    if gate is not None:  # the training mask the graph drew, captured from the site's Lowered
        h = h * gate
    return a.config.alpha / a.config.r * h @ a.lora_B.t()


def delta_mor(a, x, gate):
    c = a.config
    G = torch.softmax(x @ a.router.t(), dim=-1)
    out = 0
    for i in range(c.experts):  # Σ_i G_i(x)·(α/r)·diag(λB_i)·B·diag(λA_i)·A x
        D_i = (a.omega_B[i][:, None] * a.lora_B) @ (a.omega_A[i][:, None] * a.lora_A)
        out = out + G[..., i : i + 1] * (x @ D_i.t())
    if c.shared_expert:
        out = out + x @ (a.lora_B @ a.lora_A).t()
    return c.alpha / c.r * out


def delta_capaboost(a, x, gate):
    c = a.config
    out = 0
    for i in range(c.copies):
        out = out + (x @ (a.lora_A * a.mask_A[i]).t()) @ (a.lora_B * a.mask_B[i]).t()
    return c.alpha / c.r * out


def delta_celora(a, x, gate):
    r_prime = int(7 * a.config.r / 8)  # the paper code's rank balancing
    return delta_lora(a, x, gate, a.config.alpha / math.sqrt(r_prime))


# -- the table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable  # (random: bool) -> config
    delta: Callable | None  # (adapter, x, gate) -> delta; Uni-LoRA is special-cased (needs the model)
    per_site_params: Callable | None  # (config, d_in, d_out) -> trainable count; None = global
    mergeable: bool = True
    zero_init: bool = True  # default init gives the base model exactly
    # (vector_length) -> the variant's config in the tables that run every variant once (ONNX, compile,
    # files, ...): rank 4 and non-zero init; None for a second row of the same variant
    example: Callable | None = None


def _lora_count(c, d_in, d_out):
    return c.r * (d_in + d_out)


CASES = [
    Case(
        "lora",
        lambda rnd: lorafx.LoRA(r=3, alpha=6, init="random" if rnd else "default"),
        lambda a, x, g: delta_lora(a, x, g, 2.0),
        _lora_count,
        example=lambda n: lorafx.LoRA(r=4, alpha=8, init="random"),
    ),
    Case(
        "mor",
        lambda rnd: lorafx.MoR(r=3, alpha=6, experts=4, router_std=0.5, init="random" if rnd else "default"),
        delta_mor,
        lambda c, i, o: c.r * (i + o) + c.experts * (c.r + o) + c.experts * i,
        mergeable=False,
        example=lambda n: lorafx.MoR(r=4, alpha=8, experts=3, init="random"),
    ),
    Case(
        "mor_shared",
        lambda rnd: lorafx.MoR(
            r=2, alpha=3, experts=2, shared_expert=True, router_std=0.5, init="random" if rnd else "default"
        ),
        delta_mor,
        lambda c, i, o: c.r * (i + o) + c.experts * (c.r + o) + c.experts * i,
        mergeable=False,
    ),
    Case(
        "unilora",
        lambda rnd: lorafx.UniLoRA(r=3, vector_length=97, seed=5, init_bound=0.3 if rnd else 0.02),
        None,
        None,
        zero_init=False,
        example=lambda n: lorafx.UniLoRA(r=4, vector_length=n, seed=0),
    ),
    Case(
        "celora",
        lambda rnd: lorafx.CELoRA(r=8, alpha=16, keep_ratio=0.5, init="random" if rnd else "default"),
        delta_celora,
        lambda c, i, o: 7 * (i + o),
        example=lambda n: lorafx.CELoRA(r=8, alpha=16, keep_ratio=0.5, init="random"),
    ),
    Case(
        "capaboost",
        lambda rnd: lorafx.CapaBoost(r=3, alpha=6, copies=3, density=0.4, seed=2, init="random" if rnd else "default"),
        delta_capaboost,
        _lora_count,
        example=lambda n: lorafx.CapaBoost(r=4, alpha=8, copies=2, density=0.5, seed=0, init="random"),
    ),
    Case(
        "droplora",
        lambda rnd: lorafx.DropLoRA(r=3, alpha=6, rank_dropout=0.4, init="random" if rnd else "default"),
        delta_droplora,
        _lora_count,
        example=lambda n: lorafx.DropLoRA(r=4, alpha=8, rank_dropout=0.5, init="random"),
    ),
]


def example_configs(vector_length: int = 256) -> dict:
    """name -> a small config of that variant with non-trivial (non-zero-output) initialisation."""
    out = {}
    for case in CASES:
        if case.example is None:
            continue
        try:
            config = case.example(vector_length)
        except AttributeError:  # variant not in this build yet
            continue
        out[config.name] = config
    return out
