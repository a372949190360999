"""One table of variant cases (tests/variant_cases.py) x the invariants that apply to each (issue 3).

Every reference formula is written from the papers' equations (VARIANTS.md), not from the canonical
lowering: MoR as a sum over experts, CapaBoost as a sum over masked copies (in the table), Uni-LoRA
through a dense projection matrix P (below). The toy model runs in float64 so that two orderings of the same sums agree
to ~1e-15; the tiny Llama runs in float32 with the tolerance table's fp32 entry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from tolerances import assert_close
from torch import nn
from variant_cases import CASES, Case, delta_lora

import lorafx
from lorafx.config import _VARIANTS, AdapterConfig, register_variant
from lorafx.errors import NotMergeableError

# -- the toy model: whole-model trace, odd shapes --------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(23, 37)
        self.fc2 = nn.Linear(37, 19, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Toy().double()


TOY_SITES = ["fc1", "fc2"]
TOY_X = torch.randn(3, 5, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def unilora_projection(model) -> torch.Tensor:
    """Dense P [D, d] from the saved indices and scales, rows in site order, A then B, row-major."""
    adapters = [sa.adapters["default"] for sa in lorafx.iter_sites(model).values()]
    d = adapters[0].vector.theta.numel()
    rows = []
    for a in adapters:
        for idx, sc in ((a.idx_A, a.scale_A), (a.idx_B, a.scale_B)):
            block = torch.zeros(idx.numel(), d, dtype=torch.float64)
            block[torch.arange(idx.numel()), idx.flatten()] = sc.flatten().double()
            rows.append(block)
    return torch.cat(rows)


def unilora_factors(model, a) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of site adapter ``a`` as slices of θ_D = P θ (the paper's view)."""
    theta_D = unilora_projection(model).to(a.vector.theta.dtype) @ a.vector.theta
    start = 0
    for b in [sa.adapters["default"] for sa in lorafx.iter_sites(model).values()]:
        nA, nB = b.idx_A.numel(), b.idx_B.numel()
        if b is a:
            A = theta_D[start : start + nA].view(a.config.r, a.in_features)
            B = theta_D[start + nA : start + nA + nB].view(a.out_features, a.config.r)
            return A, B
        start += nA + nB
    raise AssertionError("adapter not found")


IDS = [c.name for c in CASES]


def adapt(case: Case, random: bool, model=None, targets=TOY_SITES):
    model = toy() if model is None else model
    return lorafx.apply(model, lorafx.Spec(case.make(random), targets=targets))


def site_adapters(model) -> dict:
    return {fqn: sa.adapters["default"] for fqn, sa in lorafx.iter_sites(model).items()}


def reference_forward(case: Case, model, x, gates: dict) -> torch.Tensor:
    """Toy.forward with every site's delta from the paper formula (shares the model's tensors)."""
    ad = site_adapters(model)

    def site(name, inp):
        lin = model.get_submodule(name)
        a = ad[name]
        if case.delta is None:
            A, B = unilora_factors(model, a)
            d = (inp @ A.t()) @ B.t()
        else:
            d = case.delta(a, inp, gates.get(name))
        return nn.functional.linear(inp, lin.weight, lin.bias) + d

    return site("fc2", torch.tanh(site("fc1", x)))


def capture_gates(model) -> tuple[dict, list]:
    gates, handles = {}, []
    for fqn, sa in lorafx.iter_sites(model).items():
        handles.append(sa.register_forward_hook(lambda m, i, out, fqn=fqn: gates.__setitem__(fqn, out.gate)))
    return gates, handles


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_output(case):
    """Default init = base model where the method guarantees it; Uni-LoRA's documented non-zero init."""
    base = toy()
    model = adapt(case, random=False, model=copy.deepcopy(base))
    out, ref = model(TOY_X), base(TOY_X)
    if case.zero_init:
        assert torch.equal(out, ref)
        return
    # Uni-LoRA: θ ~ U(±0.02) is not zero, so step 0 is not the base model (as in the official code) ...
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 1e-2
    # ... and θ = 0 gives the base model exactly.
    with torch.no_grad():
        next(iter(model.lorafx_shared.values())).theta.zero_()
    assert torch.equal(model(TOY_X), ref)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_graph_matches_paper_formula(case, mode):
    """Output and gradients of the rewritten graph = the paper formula written above (float64)."""
    torch.manual_seed(0)
    model = adapt(case, random=True)
    model.train(mode == "train")
    gates, handles = capture_gates(model)
    x = TOY_X.clone().requires_grad_(True)
    out = model(x)
    ref = reference_forward(case, model, x, gates)
    for h in handles:
        h.remove()
    assert_close(out, ref, torch.float64)
    probe = torch.randn_like(out)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((out * probe).sum(), [x, *params])
    want = torch.autograd.grad((ref * probe).sum(), [x, *params])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float64)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trainable_count_closed_form(case):
    model = adapt(case, random=False)
    got = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = case.make(False)
    if case.per_site_params is None:
        assert got == cfg.vector_length
    else:
        assert got == sum(
            case.per_site_params(cfg, lin.in_features, lin.out_features) for lin in (Toy().fc1, Toy().fc2)
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge(case, tiny_llama):
    """Mergeable: merged = unmerged (fp32, tiny Llama). MoR: refused, model untouched."""
    model = lorafx.apply(tiny_llama, lorafx.Spec(case.make(True), targets=["q_proj", "v_proj", "down_proj"]))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        if not case.mergeable:
            with pytest.raises(NotMergeableError, match="mlp.down_proj"):
                lorafx.merge(model)
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
            assert not lorafx.is_merged(model)
            return
        lorafx.merge(model)
        assert_close(model(ids).logits, ref)
        lorafx.unmerge(model)
        assert_close(model(ids).logits, ref)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_exact(case, tmp_path, tiny_llama):
    base = copy.deepcopy(tiny_llama)
    model = lorafx.apply(tiny_llama, lorafx.Spec(case.make(True), targets=["k_proj", "o_proj", "up_proj"]))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    lorafx.save_adapter(model, tmp_path / "a")
    loaded = lorafx.load_adapter(base, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- variant-specific invariants --------------------------------------------------------------------


def test_mor_factored_shrink_equals_canonical():
    """``Lowered.h`` (one shared shrink) = the canonical ``x_in Aᵉᵀ``; lora_linear gives the same y."""
    from lorafx.canonical import lora_linear

    model = adapt(CASES[1], random=True)
    a, lin = site_adapters(model)["fc1"], model.fc1
    low = a.lower(TOY_X)
    assert low.A.shape == (12, 23) and low.B.shape == (37, 12) and low.gate.shape == (3, 5, 12)
    assert_close(low.h, TOY_X @ low.A.t(), torch.float64)
    assert_close(
        lora_linear(TOY_X, lin.weight, lin.bias, low),
        lora_linear(TOY_X, lin.weight, lin.bias, low._replace(h=None)),
        torch.float64,
    )
    assert_close(
        low.gate.view(3, 5, 4, 3).sum(-1).sum(-1) / 3, torch.ones(3, 5, dtype=torch.float64), torch.float64
    )  # rows sum to 1


def test_mor_per_token_update_has_rank_r():
    """R = N·r = 12 slots, but each token's ΔW(x) = s·Bᵉ diag(g(x)) Aᵉ has rank ≤ r = 3 (shared row space)."""
    a = site_adapters(adapt(CASES[1], random=True))["fc1"]
    low = a.lower(TOY_X[0, :2])
    for t in range(2):
        delta = low.B @ torch.diag(low.gate[t]) @ low.A
        assert torch.linalg.matrix_rank(delta) == 3


def test_mor_one_expert_is_lora():
    """N = 1, Ω = 1: LoRA with the same A, B and α/r, whatever the router."""
    model = lorafx.apply(toy(), lorafx.Spec(lorafx.MoR(r=3, alpha=6, experts=1, router_std=1.0), targets=["fc1"]))
    a = site_adapters(model)["fc1"]
    with torch.no_grad():
        a.lora_B.normal_()
    h = nn.functional.linear(TOY_X, model.fc1.weight, model.fc1.bias) + delta_lora(a, TOY_X, None, 2.0)
    assert_close(model(TOY_X), model.fc2(torch.tanh(h)), torch.float64)


def test_capaboost_masks_and_rank():
    cfg = lorafx.CapaBoost(r=4, alpha=8, copies=3, density=0.3, seed=7, init="random")
    model = lorafx.apply(toy(), lorafx.Spec(cfg, targets=["fc1"]))
    a = site_adapters(model)["fc1"]
    for m in (a.mask_A, a.mask_B):
        assert m.dtype == torch.bool and [int(mi.sum()) for mi in m] == [int(m[0].numel() * 0.3)] * 3
    assert not torch.equal(a.mask_A[0], a.mask_A[1])
    again = site_adapters(lorafx.apply(toy(), lorafx.Spec(cfg, targets=["fc1"])))["fc1"]
    assert torch.equal(again.mask_A, a.mask_A) and torch.equal(again.mask_B, a.mask_B)
    assert "mask_A" in a.state_dict()  # saved, unlike the official code
    # ΔW reaches rank d·r = 12 on a random example (LoRA alone: 4).
    assert torch.linalg.matrix_rank(a.delta_weight()) == 12
    # Dense gradient = Σ_i M_i ⊙ ∂L/∂A_i: entries outside every mask never move.
    model(TOY_X).sum().backward()
    outside = ~a.mask_A.any(0)
    assert outside.any() and torch.all(a.lora_A.grad[outside] == 0)


def test_unilora_projection_is_isometric(tiny_llama):
    cfg = lorafx.UniLoRA(r=2, vector_length=301, seed=3)
    base = copy.deepcopy(tiny_llama)
    model = lorafx.apply(tiny_llama, lorafx.Spec(cfg, targets=["q_proj", "v_proj", "down_proj"]))
    P = unilora_projection(model)
    # The scales are fp32 buffers (1/√n rounded once), hence the fp32 tolerance.
    assert_close(P.t() @ P, torch.eye(301, dtype=torch.float64), torch.float32)
    sizes = (P != 0).sum(0)
    assert sizes.max() - sizes.min() <= 1  # balanced groups
    theta = next(iter(model.lorafx_shared.values())).theta.double()
    assert_close((P @ theta).norm(), theta.norm(), torch.float32)
    # Same seed + sites -> same indices; another seed changes them.
    same = lorafx.apply(copy.deepcopy(base), lorafx.Spec(cfg, targets=["q_proj", "v_proj", "down_proj"]))
    other = lorafx.apply(
        copy.deepcopy(base),
        lorafx.Spec(lorafx.UniLoRA(r=2, vector_length=301, seed=4), targets=["q_proj", "v_proj", "down_proj"]),
    )
    assert torch.equal(unilora_projection(same), P) and not torch.equal(unilora_projection(other), P)


def test_unilora_vector_too_long_is_a_clear_error():
    with pytest.raises(lorafx.SpecError, match=r"vector_length 500 exceeds D = 180"):  # D = 3·(23+37)
        lorafx.apply(toy(), lorafx.Spec(lorafx.UniLoRA(r=3, vector_length=500), targets=["fc1"]))


def test_droplora_gate_statistics_and_eval_is_lora():
    cfg = lorafx.DropLoRA(r=16, alpha=32, rank_dropout=0.25, init="random")
    model = lorafx.apply(toy(), lorafx.Spec(cfg, targets=["fc1"])).train()
    a = site_adapters(model)["fc1"]
    gate = a.lower(torch.randn(64, 23, dtype=torch.float64)).gate
    assert set(gate.unique().tolist()) == {0.0, 1 / 0.75}
    assert abs((gate == 0).double().mean().item() - 0.25) < 0.05  # 1024 draws: std 0.014
    assert not torch.equal(gate[0], gate[1])  # a fresh mask per token
    lora = lorafx.apply(toy(), lorafx.Spec(lorafx.LoRA(r=16, alpha=32), targets=["fc1"]))
    lora.load_state_dict(model.state_dict(), strict=False)
    b = site_adapters(lora)["fc1"]
    assert torch.equal(b.lora_A, a.lora_A) and torch.equal(b.lora_B, a.lora_B)
    model.eval()
    assert torch.equal(model(TOY_X), lora(TOY_X))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_json_round_trip(case):
    cfg = case.make(True)
    assert lorafx.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.mergeable() is case.mergeable


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: lorafx.MoR(experts=0), "experts"),
        (lambda: lorafx.MoR(init="gaussian"), "init"),
        (lambda: lorafx.CapaBoost(density=0.0), "density"),
        (lambda: lorafx.CapaBoost(copies=0), "copies"),
        (lambda: lorafx.DropLoRA(rank_dropout=1.0), "rank_dropout"),
        (lambda: lorafx.CELoRA(keep_ratio=0.0), "keep_ratio"),
        (lambda: lorafx.CELoRA(r=1), "r' = 0"),
        (lambda: lorafx.UniLoRA(vector_length=0), "vector_length"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_unilora_overrides_must_share_the_vector():
    spec = lorafx.Spec(
        lorafx.UniLoRA(r=2, vector_length=50),
        targets=TOY_SITES,
        overrides={"fc2": lorafx.UniLoRA(r=2, vector_length=60)},
    )
    with pytest.raises(lorafx.SpecError, match="share one vector"):
        lorafx.apply(toy(), spec)
    # Different ranks with one vector are fine: D counts each site's own r.
    spec = lorafx.Spec(lorafx.UniLoRA(r=2, vector_length=50), targets=TOY_SITES, overrides={"fc2": {"r": 5}})
    model = lorafx.apply(toy(), spec)
    assert site_adapters(model)["fc2"].idx_B.shape == (19, 5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 50


def test_config_versions_older_files_migrate_newer_are_refused():
    """A variant at version 2 reads its version-1 dicts through ``migrate``; a version 3 dict is refused."""

    @dataclass(frozen=True)
    class RenamedForTests(AdapterConfig):  # version 1 called the rank "rank"; version 2 calls it "r"
        name: ClassVar[str] = "renamed_for_tests"
        version: ClassVar[int] = 2
        r: int = 4

        @classmethod
        def migrate(cls, version, data):
            assert version == 1
            return {("r" if k == "rank" else k): v for k, v in data.items()}

    register_variant(RenamedForTests)
    try:
        assert RenamedForTests(r=3).to_dict() == {"variant": "renamed_for_tests", "version": 2, "r": 3}
        old = {"variant": "renamed_for_tests", "version": 1, "rank": 3}
        assert lorafx.AdapterConfig.from_dict(old) == RenamedForTests(r=3)
        assert lorafx.AdapterConfig.from_dict(RenamedForTests(r=5).to_dict()) == RenamedForTests(r=5)
        for version in (3, 0, "2"):
            with pytest.raises(lorafx.SpecError, match=rf"config version {version!r} is not supported"):
                lorafx.AdapterConfig.from_dict({"variant": "renamed_for_tests", "version": version, "r": 3})
        # A version-1 variant reads its own version as before, with no migration.
        assert lorafx.AdapterConfig.from_dict({"variant": "lora", "version": 1, "r": 2}) == lorafx.LoRA(r=2)
    finally:
        _VARIANTS.pop(RenamedForTests.name, None)
