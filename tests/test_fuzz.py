"""Property-based tests (hypothesis) of ``apply`` on random toy models, specs, ranks, dtypes, variants.

Properties, for any drawn case:

* ``apply`` either succeeds or raises a :class:`lorafx.LorafxError` (configs may also refuse bad
  fields with ``ValueError`` naming the field, as the style guide asks) — never anything else, and a
  failed apply leaves the model unchanged;
* with the default (zero-B) init, the adapted model's output equals the base output exactly;
* with non-zero weights, merged ≈ unmerged (dtype tolerance) for mergeable variants, and unmerge
  brings the base weights back to within one rounding of the base dtype.

Bounded for CI: ``max_examples`` 60 (25 for the file round trip) per property, ``derandomize=True`` (the same cases every run),
``deadline=None`` (2 shared cores make per-example timing noisy); ~10 s in all.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from model_state import assert_unchanged, snapshot
from tolerances import HALF_CHAIN_LAYERS, TOLERANCES
from variant_cases import example_configs

import lorafx
from lorafx.errors import LorafxError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
VARIANTS = sorted(example_configs())


class Toy(torch.nn.Module):
    """A chain of linears of random widths; ``branchy`` adds data-dependent control flow, so the
    model does not trace whole and lorafx falls back to per-linear regions."""

    def __init__(self, widths: list[int], bias: list[bool], branchy: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b, bias=c) for a, b, c in zip(widths, widths[1:], bias, strict=False)
        )
        self.branchy = branchy

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
            if self.branchy and bool(x.sum() > 0):
                x = x * 0.5
        return x


@st.composite
def toys(draw):
    n = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 24), min_size=n + 1, max_size=n + 1))
    bias = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return Toy(widths, bias, draw(st.booleans())).to(draw(st.sampled_from(DTYPES)))


NAMES = st.sampled_from(["0", "1", "2", "3", "layers.0", "layers.1", "nope", "layer", "layers"])
TARGETS = st.one_of(
    st.just("all-linear"),
    st.lists(NAMES, min_size=0, max_size=3),
    st.sampled_from([r"layers\.[0-9]", r"layers\.(0|2)", "layers.(", "[", ".*", r"layers\.9"]),
)


@st.composite
def configs(draw, init=None):
    """(variant's example config, field changes): a random rank (possibly invalid), optionally the init."""
    # Uni-LoRA's vector must not outgrow the toy's D = Σ r(d_in + d_out) (a clear SpecError otherwise)
    base = example_configs(vector_length=draw(st.sampled_from([2, 8, 256])))[draw(st.sampled_from(VARIANTS))]
    fields = {}
    if hasattr(base, "r"):
        # ~1 draw in 5 is invalid (hypothesis over-draws integer boundaries, so list the values)
        fields["r"] = draw(st.sampled_from([*range(1, 9), *range(1, 9), 0, -1, 2.5, True, "4"]))
    if init is not None and hasattr(base, "init"):
        fields["init"] = init
    return base, fields


def _apply_or_error(model, cfg, fields, **spec_kw):
    """(adapted model or None, the config); asserts only lorafx's own errors escape."""
    try:
        cfg = dataclasses.replace(cfg, **fields)
        spec = lorafx.Spec(cfg, **spec_kw)
    except LorafxError:
        event("spec refused")
        return None, None
    except ValueError as e:  # config field checks (``__post_init__``) must name the field
        assert re.search(r"\b(r|alpha|dropout|init)\b", str(e)), e
        event("config refused")
        return None, None
    before = snapshot(model)
    try:
        adapted = lorafx.apply(model, spec)
    except LorafxError:
        event("apply refused")
        assert_unchanged(before, model)
        return None, cfg
    event(f"applied ({'whole model' if adapted is not model else 'regions'})")
    event(f"applied {cfg.name}")
    return adapted, cfg


def _input(model: Toy) -> torch.Tensor:
    d_in = model.layers[0].in_features
    dtype = model.layers[0].weight.dtype
    return torch.randn(3, d_in, generator=torch.Generator().manual_seed(0)).to(dtype)


@FUZZ
@given(model=toys(), targets=TARGETS, exclude=st.lists(NAMES, max_size=2), data=st.data())
def test_apply_raises_only_lorafx_errors_and_zero_init_is_base(model, targets, exclude, data):
    x = _input(model)
    with torch.no_grad():
        expected = model(x)
    adapted, cfg = _apply_or_error(model, *data.draw(configs(init="default")), targets=targets, exclude=exclude)
    if adapted is None or not hasattr(cfg, "init"):
        return  # variants without a zero-B init (Uni-LoRA) do not start at the base output
    with torch.no_grad():
        assert torch.equal(adapted(x), expected)


@FUZZ
@given(model=toys(), data=st.data())
def test_merged_equals_unmerged_and_unmerge_restores(model, data):
    x = _input(model)
    adapted, cfg = _apply_or_error(model, *data.draw(configs(init="random")), targets="all-linear")
    if adapted is None or not cfg.mergeable():
        return
    adapted.eval()
    dtype = x.dtype
    originals = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        unmerged = adapted(x)
        lorafx.merge(adapted)
        merged = adapted(x)
        lorafx.unmerge(adapted)
    # Outputs pass through tanh (|y| <= 1), so the dtype's absolute tolerance applies; a half-precision
    # chain of up to 4 layers rounds once per layer, hence 4x the single-op tolerance.
    atol = TOLERANCES[dtype]["atol"] * (HALF_CHAIN_LAYERS if dtype in (torch.float16, torch.bfloat16) else 1)
    torch.testing.assert_close(merged, unmerged, atol=atol, rtol=0)
    for name, p in adapted.named_parameters():
        if name in originals:
            # one rounding of round(W+ΔW)-ΔW: half an ulp of |W| + |ΔW| (|W| <= 1 here, |ΔW| ~ 1)
            ulp = torch.finfo(dtype).eps * 4
            torch.testing.assert_close(p, originals[name], atol=ulp, rtol=0, msg=name)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(model=toys(), data=st.data())
def test_saved_adapter_reloads_into_a_fresh_copy(model, data, tmp_path_factory):
    fresh = copy.deepcopy(model)
    x = _input(model)
    adapted, cfg = _apply_or_error(model, *data.draw(configs(init="random")), targets="all-linear")
    if adapted is None:
        return
    adapted.eval()
    directory = lorafx.save_adapter(adapted, tmp_path_factory.mktemp("fuzz"))
    loaded = lorafx.load_adapter(fresh, directory).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), adapted(x))
