"""``lorafx.add_weighted_adapter``: each combination equals its formula on ΔW, and equals PEFT 0.21's
``add_weighted_adapter`` given identical adapters (ΔW per site and the model's logits)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lorafx
from lorafx.cli.models import tiny_llama
from tests.tolerances import assert_close
from tests.variant_cases import example_configs

peft = pytest.importorskip("peft")
# PEFT's own deprecation notices from transformers while it wraps the model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

W = [0.7, -0.4]  # a negative weight exercises PEFT's sign-on-A rule


def pair(targets=(("q_proj", "v_proj"), ("q_proj", "v_proj")), ranks=(4, 4), alphas=(8, 4)):
    """PEFT and lorafx models holding the same two LoRA adapters "x" and "y" (non-zero A and B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama()
    configs = [
        LoraConfig(r=r, lora_alpha=al, target_modules=list(t), init_lora_weights=False)
        for r, al, t in zip(ranks, alphas, targets, strict=True)
    ]
    pm = get_peft_model(copy.deepcopy(base), configs[0], adapter_name="x")
    pm.add_adapter("y", configs[1])
    model = base
    for name, r, al, t in zip("xy", ranks, alphas, targets, strict=True):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=r, alpha=al), targets=list(t)), name=name)
    with torch.no_grad():
        for fqn, sa in lorafx.iter_sites(model).items():
            layer = pm.base_model.model.get_submodule(fqn)
            for name, a in sa.adapters.items():
                a.lora_A.copy_(layer.lora_A[name].weight)
                a.lora_B.copy_(layer.lora_B[name].weight)
    return pm.eval(), model.eval()


def deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {
        fqn: sa.adapters[name].delta_weight() for fqn, sa in lorafx.iter_sites(model).items() if name in sa.adapters
    }


class Masks:
    """Records torch.bernoulli's masks in PEFT's call and replays them in lorafx's: PEFT draws the new
    adapter's random init from the same generator first, so a shared seed alone cannot align DARE."""

    def __init__(self, monkeypatch):
        self.masks, self.replay, self.real = [], None, torch.bernoulli
        monkeypatch.setattr(torch, "bernoulli", self)

    def __call__(self, p, *args, **kwargs):
        if self.replay is None:
            self.masks.append(self.real(p, *args, **kwargs))
            return self.masks[-1]
        mask = self.replay.pop(0)
        assert mask.shape == p.shape  # same draw order: site by site, A factors then B factors
        return mask

    def start_replay(self):
        self.replay = list(self.masks)


PEFT_CASES = [
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2}),
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.7}),
]


def test_equals_peft_add_weighted_adapter(monkeypatch):
    pm, model = pair()
    masks = Masks(monkeypatch)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    sites = {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    for i, (combination, kw) in enumerate(PEFT_CASES):
        name = f"c{i}"
        masks.masks, masks.replay = [], None
        pm.add_weighted_adapter(["x", "y"], W, name, combination_type=combination, **kw)
        masks.start_replay()
        model = lorafx.add_weighted_adapter(model, ["x", "y"], W, name, combination=combination, **kw)
        assert masks.replay == [] and bool(masks.masks) == combination.startswith("dare")  # PEFT's masks, all used
        mine = deltas(model, name)
        assert mine.keys() == sites, combination
        for fqn, d in mine.items():
            assert_close(d, pm.base_model.model.get_submodule(fqn).get_delta_weight(name))
            assert d.abs().max() > 1e-3  # a real update, not an empty adapter
        pm.set_adapter(name)
        lorafx.set_adapter(model, name)
        with torch.no_grad():
            assert_close(model(ids).logits, pm(ids).logits)


def test_cat_and_svd_with_different_ranks_and_sites_equal_peft():
    # a: r=4 on q,v; b: r=2 on q,up. cat's rank is 6 where both sit, the adapter's own where one does
    pm, model = pair(targets=(("q_proj", "v_proj"), ("q_proj", "up_proj")), ranks=(4, 2), alphas=(8, 3))
    for combination in ("cat", "svd"):
        pm.add_weighted_adapter(["x", "y"], W, combination, combination_type=combination)
        model = lorafx.add_weighted_adapter(model, ["x", "y"], W, combination, combination=combination)
        mine = deltas(model, combination)
        assert len(mine) == 6
        for fqn, d in mine.items():
            assert_close(d, pm.base_model.model.get_submodule(fqn).get_delta_weight(combination))
    ranks = {f.rsplit(".", 1)[1]: sa.adapters["cat"].lora_A.shape[0] for f, sa in lorafx.iter_sites(model).items()}
    assert ranks == {"q_proj": 6, "v_proj": 4, "up_proj": 2}


# -- the formulas on ΔW (lorafx alone) ---------------------------------------------------------------


def test_each_combination_equals_its_formula():
    _, model = pair()
    src = {n: deltas(model, n) for n in "xy"}
    factors = {
        n: {
            f: (sa.adapters[n].lora_A, sa.adapters[n].lora_B, sa.adapters[n].config.scale)
            for f, sa in lorafx.iter_sites(model).items()
        }
        for n in "xy"
    }
    model = lorafx.add_weighted_adapter(model, ["x", "y"], W, "cat", combination="cat")
    model = lorafx.add_weighted_adapter(model, ["x", "y"], W, "svd2", combination="svd", svd_rank=2)
    model = lorafx.add_weighted_adapter(model, ["x", "y"], W, "lin", combination="linear")
    for fqn, d in deltas(model, "cat").items():
        total = W[0] * src["x"][fqn] + W[1] * src["y"][fqn]
        assert_close(d, total)  # cat is exact: ΔW = Σ wᵢΔWᵢ
        U, S, Vh = torch.linalg.svd(total.double())  # Eckart-Young: the best rank-2 approximation
        assert_close(deltas(model, "svd2")[fqn], ((U[:, :2] * S[:2]) @ Vh[:2]).float())
        (Aa, Ba, sa), (Ab, Bb, sb) = factors["x"][fqn], factors["y"][fqn]
        ka, kb = W[0] * sa, W[1] * sb  # linear: √|k| on both factors, the sign on A only
        A = math.copysign(math.sqrt(abs(ka)), ka) * Aa + math.copysign(math.sqrt(abs(kb)), kb) * Ab
        B = math.sqrt(abs(ka)) * Ba + math.sqrt(abs(kb)) * Bb
        assert_close(deltas(model, "lin")[fqn], B @ A)
    assert lorafx.adapter_names(model)[-3:] == ["cat", "svd2", "lin"]
    assert lorafx.active_adapter(model) == "y"  # added, not activated


@pytest.mark.parametrize("variant", sorted(example_configs()))
def test_every_mergeable_variant_combines_exactly_or_is_refused(variant):
    config = example_configs()[variant]
    torch.manual_seed(0)
    model = lorafx.apply(tiny_llama(), lorafx.Spec(config, targets=["q_proj", "down_proj"]), name="v")
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["q_proj"]), name="l").eval()
    names = lorafx.adapter_names(model)
    if not config.mergeable():
        with pytest.raises(lorafx.NotMergeableError, match=rf"adapter 'v' \({variant}\) has an input-dependent gate"):
            lorafx.add_weighted_adapter(model, ["v", "l"], W, "vl", combination="cat")
        assert lorafx.adapter_names(model) == names
        return
    src = {n: deltas(model, n) for n in ("v", "l")}
    model = lorafx.add_weighted_adapter(model, ["v", "l"], W, "cat", combination="cat")
    model = lorafx.add_weighted_adapter(model, ["v", "l"], W, "svd", combination="svd", svd_rank=64)
    for fqn in src["v"]:
        total = W[0] * src["v"][fqn] + W[1] * src["l"].get(fqn, torch.zeros_like(src["v"][fqn]))
        assert_close(deltas(model, "cat")[fqn], total)
        assert_close(deltas(model, "svd")[fqn], total, atol=1e-5, rtol=1e-4)  # full rank: exact up to SVD rounding
    if variant in ("unilora", "capaboost"):
        with pytest.raises(lorafx.SpecError, match=rf"adapter 'v' \({variant}\) does not own.*use 'cat' or 'svd'"):
            lorafx.add_weighted_adapter(model, ["v", "l"], W, "lin", combination="linear")
        assert "lin" not in lorafx.adapter_names(model)


def test_combined_adapter_saves_loads_and_merges(tmp_path):
    _, model = pair(targets=(("q_proj", "v_proj"), ("q_proj", "up_proj")), ranks=(4, 2), alphas=(8, 3))
    model = lorafx.add_weighted_adapter(model, ["x", "y"], W, "ab", combination="cat")
    lorafx.set_adapter(model, "ab")
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        lorafx.save_adapter(model, tmp_path / "ab", name="ab")
        torch.manual_seed(0)
        fresh = lorafx.load_adapter(tiny_llama(), tmp_path / "ab").eval()
        assert_close(fresh(ids).logits, want)
        lorafx.merge(model)
        assert_close(model(ids).logits, want)


BAD = [
    (dict(adapters=["x", "nope"]), lorafx.SpecError, "no adapter named 'nope'"),
    (dict(adapters="x"), lorafx.SpecError, "must be a non-empty list"),
    (dict(weights=[1.0]), lorafx.SpecError, "must be 2 finite numbers"),
    (dict(weights=[1.0, float("nan")]), lorafx.SpecError, "must be 2 finite numbers"),
    (dict(name="x"), lorafx.SpecError, "adapter 'x' already exists"),
    (dict(combination="average"), lorafx.SpecError, "unknown combination 'average'"),
    (dict(combination="ties"), lorafx.SpecError, "needs density in \\(0, 1\\], got None"),
    (dict(combination="svd", svd_rank=0), lorafx.SpecError, "svd_rank must be a positive int"),
]


def test_bad_arguments_name_the_problem_and_change_nothing():
    _, model = pair(ranks=(4, 2))
    keys = set(model.state_dict())
    for kw, error, message in BAD:
        args = dict(adapters=["x", "y"], weights=W, name="ab", combination="cat") | kw
        with pytest.raises(error, match=message):
            lorafx.add_weighted_adapter(model, **args)
        assert lorafx.adapter_names(model) == ["x", "y"] and set(model.state_dict()) == keys
    with pytest.raises(
        lorafx.SpecError, match=r"site 'model.layers.0.self_attn.q_proj': combination 'linear' needs one rank.*\[2, 4\]"
    ):
        lorafx.add_weighted_adapter(model, ["x", "y"], W, "ab", combination="linear")
    assert lorafx.adapter_names(model) == ["x", "y"] and set(model.state_dict()) == keys
