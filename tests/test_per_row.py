"""Per-row adapters in PyTorch (issue 15 item 3): ``lorafx.using_adapter(model, ["a", "b", None])``.

The reference is always one adapter at a time: ``using_adapter(model, name)`` on the rows (forward),
or on the whole batch with the same seed, keeping that adapter's rows (generate: the batch shape, and
so the sampling RNG stream, is the same as the mixed run's).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from variant_cases import example_configs

import lorafx
from lorafx.cli.models import TinyMLP, tiny_llama
from tests.tolerances import assert_close

VARIANTS = ("lora", "unilora", "celora", "capaboost", "droplora")  # every mergeable variant


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama with one adapter per mergeable variant (random init, non-zero deltas), MoR too, and
    a plain LoRA of another rank on q/v only (sites without it run the base for its rows)."""
    configs = example_configs()
    model = tiny_llama(seed=3)
    for name in VARIANTS:
        model = lorafx.apply(model, lorafx.Spec(configs[name], targets="all-linear"), name=name)
    model = lorafx.apply(model, lorafx.Spec(configs["mor"], targets=["q_proj"]), name="mor")
    qv = lorafx.LoRA(r=6, alpha=3, init="random")
    model = lorafx.apply(model, lorafx.Spec(qv, targets=["q_proj", "v_proj"]), name="qv")
    with torch.no_grad():  # Uni-LoRA's init (|θ| <= 0.02) moves logits by 3e-4 only: make it visible
        for m in lorafx.state.shared_modules(model, "unilora").values():
            for p in m.parameters():
                p.mul_(50)
    lorafx.set_adapter(model, "lora")
    return model.eval()


NAMES = ["lora", "unilora", None, "qv", "celora", "capaboost", "droplora", "lora"]


def _rowwise(model, ids, names):
    out = []
    for i, name in enumerate(names):
        with lorafx.using_adapter(model, name):
            out.append(model(ids[i : i + 1]).logits)
    return torch.cat(out)


@torch.no_grad()
def test_forward_rows_equal_one_adapter_at_a_time(llama):
    ids = torch.randint(0, 256, (len(NAMES), 9), generator=torch.Generator().manual_seed(0))
    with lorafx.using_adapter(llama, NAMES):
        mixed = llama(ids).logits
    assert lorafx.active_adapter(llama) == "lora"  # restored
    expected = _rowwise(llama, ids, NAMES)
    assert_close(mixed, expected)
    # the adapters do change the output: rows are not all the base
    with lorafx.using_adapter(llama, None):
        base = llama(ids).logits
    assert all((expected[i] - base[i]).abs().max() > 1e-3 for i, n in enumerate(NAMES) if n is not None)
    # PEFT's keyword, PEFT's spelling of the base: the same
    peft_names = ["__base__" if n is None else n for n in NAMES]
    assert_close(llama(ids, adapter_names=peft_names).logits, mixed)
    assert lorafx.active_adapter(llama) == "lora"


@torch.no_grad()
def test_forward_batch_multiple_of_names_keeps_row_adapter(llama):
    names = ["qv", None, "lora"]
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    wide = ids.repeat_interleave(2, dim=0)  # as generate expands for num_beams=2
    with lorafx.using_adapter(llama, names):
        mixed = llama(wide).logits
    assert_close(mixed, _rowwise(llama, wide, [n for n in names for _ in range(2)]))


def _generate(model, ids, seed, **kw):
    """(sequences, raw logits ``[steps, rows, vocab]``) of one ``generate`` call with ``seed``."""
    torch.manual_seed(seed)
    out = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _generate_per_adapter(model, ids, names, seed, **kw):
    """Each adapter over the whole batch, same seed; row i keeps adapter names[i]'s output."""
    per = {}
    for name in dict.fromkeys(names):
        with lorafx.using_adapter(model, name):
            per[name] = _generate(model, ids, seed, **kw)
    k = per[names[0]][0].shape[0] // len(names)  # returned sequences per input row
    b = per[names[0]][1].shape[1] // len(names)  # rows per input row while generating (beams)
    seqs = torch.cat([per[n][0][i * k : (i + 1) * k] for i, n in enumerate(names)])
    logits = torch.cat([per[n][1][:, i * b : (i + 1) * b] for i, n in enumerate(names)], dim=1)
    return seqs, logits, per


GENERATE = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.5),
    "beam": dict(do_sample=False, num_beams=3),
    "return_sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", GENERATE)
@torch.no_grad()
def test_generate_rows_equal_one_adapter_at_a_time(llama, mode):
    names = ["lora", None, "qv"]
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=4, min_new_tokens=4, attention_mask=torch.ones_like(ids), pad_token_id=0, **GENERATE[mode])
    with lorafx.using_adapter(llama, names):
        seqs, logits = _generate(llama, ids, 7, **kw)
    expected_seqs, expected_logits, per = _generate_per_adapter(llama, ids, names, 7, **kw)
    assert torch.equal(seqs, expected_seqs)
    assert_close(logits, expected_logits)
    # PEFT's keyword gives the same
    torch.manual_seed(7)
    assert torch.equal(llama.generate(ids, adapter_names=names, **kw), seqs)
    # the assignment matters: each row's logits differ from another adapter's on that row
    b = logits.shape[1] // len(names)
    for i in range(len(names)):
        other = per[names[(i + 1) % len(names)]][1][:, i * b : (i + 1) * b]
        assert (logits[:, i * b : (i + 1) * b] - other).abs().max() > 1e-2


def test_training_gradients_reach_each_adapter_from_its_rows(llama):
    names = ["lora", "qv", None, "lora"]
    ids = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(3))
    weight = torch.randn(4, 5, 256, generator=torch.Generator().manual_seed(4))
    params = {n: [p for a in lorafx.state.adapter_modules(llama, n) for p in a.parameters()] for n in ("lora", "qv")}
    llama.train()  # training mode: the named adapters require grad in the block (dropout is 0)
    with lorafx.using_adapter(llama, names):
        (llama(ids).logits * weight).sum().backward()
    got = {n: [p.grad.clone() for p in ps] for n, ps in params.items()}
    for ps in params.values():
        for p in ps:
            p.grad = None
    for i, name in enumerate(names):
        if name is None:  # the base row: nothing trainable in its graph
            continue
        with lorafx.using_adapter(llama, name):
            (llama(ids[i : i + 1]).logits * weight[i : i + 1]).sum().backward()
    for n, ps in params.items():
        for g, p in zip(got[n], ps, strict=True):
            assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
            p.grad = None
    llama.eval()
    assert all(p.requires_grad for p in params["lora"]) and not any(p.requires_grad for p in params["qv"])


def test_bad_input_is_refused_and_leaves_the_model_unchanged(llama):
    ids = torch.randint(0, 256, (5, 4))
    before = {sa.site: sa._slot for sa in lorafx.iter_sites(llama).values()}
    with torch.no_grad(), lorafx.using_adapter(llama, ["lora", "qv"]):
        with pytest.raises(lorafx.SpecError, match=r"for 2 rows, but the batch has 5 rows"):
            llama(ids)
    with pytest.raises(lorafx.SpecError, match=r"adapter 'mor' \(variant 'mor'\) cannot run per row.*q_proj"):
        with lorafx.using_adapter(llama, ["lora", "mor"]):
            pass
    with pytest.raises(lorafx.SpecError, match="no adapter named 'nope'"):
        with lorafx.using_adapter(llama, ["lora", "nope"]):
            pass
    with pytest.raises(lorafx.SpecError, match="non-empty list"):
        with lorafx.using_adapter(llama, []):
            pass
    llama.train()
    try:
        with pytest.raises(lorafx.SpecError, match="adapter_names= is for inference"):
            llama(ids[:2], adapter_names=["lora", "qv"])
        with pytest.raises(
            lorafx.SpecError, match="variant .droplora. does not run in its canonical eval form in training mode"
        ):
            with lorafx.using_adapter(llama, ["droplora", "qv"]):
                llama(ids[:2])
    finally:
        llama.eval()
    assert {sa.site: sa._slot for sa in lorafx.iter_sites(llama).values()} == before
    assert lorafx.active_adapter(llama) == "lora"
    lorafx.merge(llama)
    try:
        with pytest.raises(lorafx.SpecError, match="merged into the base weights"):
            with lorafx.using_adapter(llama, ["qv", None]):
                pass
    finally:
        lorafx.unmerge(llama)


def test_unload_removes_the_adapter_names_hooks():
    model = lorafx.apply(tiny_llama(), lorafx.Spec(lorafx.LoRA(r=2), targets=["q_proj"]))
    assert "generate" in model.__dict__ and model._forward_pre_hooks
    plain = lorafx.unload(model)
    assert "generate" not in plain.__dict__
    assert not plain._forward_pre_hooks and not plain._forward_hooks


def _rowwise_plain(model, x, names):
    out = []
    for i, name in enumerate(names):
        with lorafx.using_adapter(model, name):
            out.append(model(x[i : i + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("how", ["lorafx.compile", "torch.compile", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_does_not_recompile_when_rows_change(how):
    """lorafx.compile (op-lowered sites) and torch.compile(fullgraph=True) of the composite sites: new
    assignments, None rows included, change index values only. aot_eager by default (inductor's code
    generation adds ~20 s here and nothing Dynamo guards on); the slow case runs inductor."""
    torch._dynamo.reset()
    model = TinyMLP()
    for i, name in enumerate(("a", "b", "c")):
        model = lorafx.apply(
            model, lorafx.Spec(lorafx.LoRA(r=4, alpha=4 + i, init="random"), targets="all-linear"), name=name
        )
    model.eval()
    if how == "lorafx.compile":
        compiled = lorafx.compile(model, kernels="ops", backend="aot_eager")
    elif how == "torch.compile":
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    else:
        compiled = lorafx.compile(model, kernels="ops")
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    assignments = [["a", "b", None, "c"], ["c", "a", "b", None], [None, None, "a", "a"], ["b", "b", "b", "b"]]
    with torch.no_grad():
        with lorafx.using_adapter(model, assignments[0]):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in assignments:
                with lorafx.using_adapter(model, names):
                    got = compiled(x)
                assert_close(got, _rowwise_plain(model, x, names))


def test_adapter_names_under_torch_compile_run_per_row_and_the_hooks_stay_eager():
    """The root's adapter_names= hooks run eagerly under torch.compile (no frame of theirs is
    compiled); the compiled forward sees the per-row state they enter and equals the row-wise model."""
    torch._dynamo.reset()
    model = TinyMLP()
    for i, name in enumerate(("a", "b")):
        model = lorafx.apply(
            model, lorafx.Spec(lorafx.LoRA(r=4, alpha=4 + i, init="random"), targets="all-linear"), name=name
        )
    model.eval()
    frames = []

    def backend(gm, inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    names = ["b", None, "a"]
    with torch.no_grad():
        got = compiled(x, adapter_names=names)
        assert_close(got, _rowwise_plain(model, x, names))
        plain = compiled(x)  # the post-hook left per-row mode: the active adapter on every row
        assert_close(plain, model(x))
    for hook in (lorafx.rows.adapter_names_pre_hook, lorafx.rows.adapter_names_post_hook):
        code = inspect.unwrap(hook).__code__  # a hook Dynamo compiled would hold cache entries
        assert torch._dynamo.eval_frame._debug_get_cache_entry_list(code) == [], code.co_name
    assert len(frames) == 2  # per-row and plain: the hooks' state reached the compiled forward


@pytest.mark.parametrize("layout", ["rows", "rows_with_base", "runs", "interleaved"])
def test_multi_op_layouts_equal_the_per_token_formula(layout):
    """lorafx::lora_linear_multi's three CPU paths (a batched bmm when every leading row has one
    adapter, in-place slices for contiguous runs, gathers otherwise) against a dense per-token formula,
    forward and gradients, fp64."""
    from lorafx.kernels.lora_linear_multi import lora_linear_multi

    g = torch.Generator().manual_seed(6)
    n, r, d_in, d_out, rows, seq = 3, 4, 9, 7, 4, 20
    per_row = {"rows": [2, 0, 1, 2], "rows_with_base": [2, -1, 1, 0]}.get(layout, [0, 2, -1, 1])
    idx = torch.tensor(per_row).repeat_interleave(seq)
    if layout == "interleaved":
        idx = idx[torch.randperm(idx.numel(), generator=g)]
    shape = (rows, seq, d_in) if layout.startswith("rows") else (rows * seq, d_in)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(*shape, **f64).requires_grad_()
    W, b = torch.randn(d_out, d_in, **f64), torch.randn(d_out, **f64)
    A = torch.randn(n, r, d_in, **f64).requires_grad_()
    B = torch.randn(n, d_out, r, **f64).requires_grad_()
    s = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    y = lora_linear_multi(x, W, b, A, B, s, idx)
    x2 = x.reshape(-1, d_in)
    want = torch.stack(
        [x2[t] @ (W if int(i) < 0 else W + s[i] * B[i] @ A[i]).T + b for t, i in enumerate(idx)]
    ).reshape(y.shape)
    assert_close(y, want, torch.float64)
    got = torch.autograd.grad(y.square().sum(), (x, A, B))
    exp = torch.autograd.grad(want.square().sum(), (x, A, B))
    for a, w in zip(got, exp, strict=True):
        assert_close(a, w, torch.float64)


@torch.no_grad()
def test_stacks_follow_in_place_updates_and_scale_inside_a_block():
    """The eval-time stack cache never serves stale weights: an in-place update or set_scale inside the
    block shows in the next forward."""
    model = TinyMLP()
    for name in ("a", "b"):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear"), name=name)
    model.eval()
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    names = ["a", "b"]
    with lorafx.using_adapter(model, names):
        first = model(x)
        for sa in lorafx.iter_sites(model).values():
            sa.adapters["b"].lora_B.mul_(3.0)
        lorafx.set_scale(model, 0.25, name="a")
        second = model(x)
    assert_close(second, _rowwise_plain(model, x, names))
    assert (second - first).abs().min() > 0
