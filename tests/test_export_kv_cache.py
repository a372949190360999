"""KV-cache export (``to_onnx(..., kv_cache=True)``) and ``AdapterSession.generate``: greedy decoding
in onnxruntime equals transformers' eager ``generate`` token for token, per adapter, with a
left-padded batch, in merged, unmerged and multi modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorafx
from lorafx.errors import ExportError
from lorafx.export import AdapterSession, compare_export, to_onnx
from lorafx.export.decode import BoundStep, NumpyStep, Sampling, generate_tokens
from lorafx.export.kv_cache import kv_cache_inputs
from tests.export_helpers import genai_decode, perturb
from tests.tolerances import ONNX_FP32

pytest.importorskip("onnxruntime")

NEW = 6  # new tokens per generate: enough for several decode steps over a grown cache


def llama():
    from lorafx.cli.models import tiny_llama

    return tiny_llama(0, layers=2)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=1)
    ).eval()


def adapted(build, targets):
    """Two random LoRA adapters ``a`` (rank 4) and ``b`` (rank 2) on ``build()``, ``a`` active."""
    model = build()
    for name, r in (("b", 2), ("a", 4)):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=targets), name=name)
        perturb(model, name, seed=r)
    lorafx.set_adapter(model, "a")
    return model


def prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 5 tokens; row 1 is left-padded by 2 and row 2 by 1."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def eager_generate(model, ids, mask, adapter) -> np.ndarray:
    lorafx.set_adapter(model, adapter)
    try:
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False).numpy()
    finally:
        lorafx.set_adapter(model, "a")


def family(config_cls, **kw):
    """A builder of a tiny 2-layer causal LM of ``config_cls`` (hidden 64) with seeded random weights."""

    def build():
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = config_cls(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, **kw
        )
        return AutoModelForCausalLM.from_config(cfg).eval()

    return build


def _slow_families():
    from transformers import GemmaConfig, Phi3Config, Qwen3Config

    attn = ["q_proj", "v_proj", "down_proj"]
    return {
        "qwen3": (family(Qwen3Config, num_key_value_heads=2, head_dim=16), attn),
        "phi3": (
            family(Phi3Config, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
            ["qkv_proj", "o_proj", "gate_up_proj"],
        ),
        "gemma": (family(GemmaConfig, num_key_value_heads=1, head_dim=16), attn),
    }


CASES = {"llama": (llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (gpt2, ["c_attn", "c_fc"]), **_slow_families()}
PARAMS = [pytest.param(k, marks=[pytest.mark.slow] if k not in ("llama", "gpt2") else []) for k in CASES]


@pytest.fixture(scope="module", params=PARAMS)
def exported(request, tmp_path_factory):
    """One adapted model per family and its unmerged and multi KV-cache exports."""
    build, targets = CASES[request.param]
    model = adapted(build, targets)
    ids, _ = prompts(model.config.vocab_size)
    root = tmp_path_factory.mktemp(f"kv-{request.param}")
    for mode in ("unmerged", "multi"):
        to_onnx(model, {"input_ids": ids[:2]}, root / mode, mode=mode, kv_cache=True)
    return model, root


def test_graph_names_and_prefill_logits(exported):
    """The graph's inputs/outputs are the documented names; logits and present equal eager."""
    model, root = exported
    sess = AdapterSession(root / "unmerged")
    names = [i.name for i in sess.session.get_inputs()]
    layers = model.config.num_hidden_layers
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [n for n in names if n.startswith("past_key_values.")] == [
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")
    ]
    assert sess.output_names == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    ids, mask = prompts(model.config.vocab_size)
    # batch 3 and a past of 5 (the export saw batch 2, past 5): every output, every adapter
    assert (
        compare_export(model, kv_cache_inputs(model, {"input_ids": ids, "attention_mask": mask}), root / "unmerged")
        < (ONNX_FP32["atol"])
    )


@pytest.mark.parametrize("adapter", ["a", "b", None])
def test_unmerged_generate_equals_eager(exported, adapter):
    model, root = exported
    ids, mask = prompts(model.config.vocab_size)
    sess = AdapterSession(root / "unmerged")
    got = sess.generate(ids, NEW, adapter=adapter, attention_mask=mask)
    np.testing.assert_array_equal(got, eager_generate(model, ids, mask, adapter))


def assert_rows_equal_eager(model, got, ids, mask, rows):
    for i, name in enumerate(rows):
        want = eager_generate(model, ids[i : i + 1], mask[i : i + 1], name)
        np.testing.assert_array_equal(got[i : i + 1, : want.shape[1]], want)


def test_per_row_adapters(exported):
    """Multi: one decode per step serves rows with adapters b and a (2 slots); unmerged serves rows
    with b, the base model and a by one generate per adapter."""
    model, root = exported
    ids, mask = prompts(model.config.vocab_size)
    rows = ["b", "a", "b"]
    got = AdapterSession(root / "multi").generate(ids, NEW, adapter=rows, attention_mask=mask)
    assert_rows_equal_eager(model, got, ids, mask, rows)
    rows = ["b", None, "a"]
    got = AdapterSession(root / "unmerged").generate(ids, NEW, adapter=rows, attention_mask=mask)
    assert_rows_equal_eager(model, got, ids, mask, rows)


@pytest.mark.parametrize(
    "name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("qwen3", marks=pytest.mark.slow)]
)
def test_merged_generate_batch_one(tmp_path, name):
    """Merged mode: adapter b folded in; a batch of one and the left-padded batch decode (exported
    with batch 2)."""
    build, targets = CASES[name]
    model = adapted(build, targets)
    ids, mask = prompts(model.config.vocab_size)
    to_onnx(model, ids[:2], tmp_path, mode="merged", adapters=["b"], kv_cache=True)
    sess = AdapterSession(tmp_path)
    got = sess.generate(ids[:1], NEW)
    np.testing.assert_array_equal(got, eager_generate(model, ids[:1], mask[:1], "b"))
    np.testing.assert_array_equal(sess.generate(ids, NEW, attention_mask=mask), eager_generate(model, ids, mask, "b"))
    with pytest.raises(ExportError, match="attention_mask"):
        AdapterSession(tmp_path).generate(ids, 0, attention_mask=mask[:, :2])


def test_eos_ends_rows_as_transformers_does(exported):
    """An end-of-sequence id that one row reaches early: that row is filled with the pad id from then
    on and the others go on, exactly as transformers' generate does."""
    model, root = exported
    ids, mask = prompts(model.config.vocab_size)
    config = model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = None
        free = eager_generate(model, ids, mask, "a")
        eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token
        config.eos_token_id = eos
        want = eager_generate(model, ids, mask, "a")
    finally:
        config.eos_token_id = saved
    got = AdapterSession(root / "unmerged").generate(ids, NEW, adapter="a", attention_mask=mask, eos_token_id=eos)
    np.testing.assert_array_equal(got, want)
    stopped = want.shape != free.shape or not np.array_equal(want[0], free[0])
    assert stopped and eos in want[0, ids.shape[1] :]  # row 0 did stop at its eos


def test_sampling(exported):
    """top_k=1 sampling is greedy; a seed repeats a sample; different seeds differ at high temperature."""
    model, root = exported
    ids, mask = prompts(model.config.vocab_size)
    sess = AdapterSession(root / "unmerged")
    greedy = sess.generate(ids, NEW, adapter="a", attention_mask=mask)
    kw = dict(adapter="a", attention_mask=mask, do_sample=True)
    np.testing.assert_array_equal(sess.generate(ids, NEW, top_k=1, seed=3, **kw), greedy)
    hot = [sess.generate(ids, NEW, temperature=50.0, seed=s, **kw) for s in (7, 7, 8)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert (hot[0] != hot[2]).any()


def test_sampling_warpers_by_hand():
    """top-k and top-p keep exactly the tokens the definitions keep (transformers' semantics)."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    seen = lambda s: {int(s.choose(logits, rng)[0]) for _ in range(400)}  # noqa: E731
    assert seen(Sampling(True, top_k=2)) == {0, 1}
    assert seen(Sampling(True, top_p=0.75)) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert seen(Sampling(True, top_p=0.85)) == {0, 1, 2}
    assert seen(Sampling(True)) == {0, 1, 2, 3}
    with pytest.raises(ExportError, match="top_p"):
        Sampling(True, top_p=0)


def test_step_strategies_agree(exported):
    """I/O binding (what device sessions use) and onnxruntime's adapter API (the .onnx_adapter file
    activated by RunOptions) decode the tokens that numpy feeds (CPU sessions) decode."""
    import onnxruntime as ort

    model, root = exported
    sess = AdapterSession(root / "unmerged")
    kv = sess.manifest["kv_cache"]
    ids, mask = prompts(model.config.vocab_size)
    want = sess.generate(ids, NEW, adapter="b", attention_mask=mask, eos_token_id=None)
    lora = ort.LoraAdapter()
    lora.Load(str(root / "unmerged" / sess.manifest["onnx_adapters"]["b"]))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    bound = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in sess.adapters["b"].items()}
    for step in (BoundStep(sess.session, kv, bound), NumpyStep(sess.session, kv, {}, run_options=options)):
        got = generate_tokens(step, kv, ids.numpy(), mask.numpy(), NEW, Sampling(), None, None)
        np.testing.assert_array_equal(got, want)


def test_generate_needs_the_cache(exported, tmp_path):
    """An export without the KV cache (here: its manifest entry removed) is refused by generate."""
    import json
    import shutil

    _, root = exported
    shutil.copytree(root / "unmerged", tmp_path / "plain")
    path = tmp_path / "plain" / "lorafx_export.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "kv_cache"}))
    with pytest.raises(ExportError, match="kv_cache=True"):
        AdapterSession(tmp_path / "plain").generate(torch.ones(1, 3, dtype=torch.long), 2, adapter="a")


def test_kv_cache_bad_input(tmp_path):
    """A model without a cache, float inputs and dynamic=False are refused, naming what is wrong."""
    from lorafx.cli.models import tiny_mlp

    with pytest.raises(ExportError, match="past_key_values"):
        to_onnx(tiny_mlp(), {"input_ids": torch.ones(2, 4, dtype=torch.long)}, tmp_path / "mlp", kv_cache=True)
    model = llama()
    with pytest.raises(ExportError, match="integer"):
        to_onnx(model, torch.randn(2, 4), tmp_path / "f", kv_cache=True)
    with pytest.raises(ExportError, match="dynamic"):
        to_onnx(model, torch.ones(2, 4, dtype=torch.long), tmp_path / "d", kv_cache=True, dynamic=False)
    assert not (tmp_path / "d").exists()


def genai_generate(model_dir, adapters: dict, ids: np.ndarray, adapter) -> np.ndarray:
    pytest.importorskip("onnxruntime_genai")
    return genai_decode(model_dir, adapters, ids, adapter, NEW)


@pytest.mark.parametrize("adapter", ["a", "b", None])
def test_onnxruntime_genai_switches_adapters(exported, adapter):
    """The unmerged export directory is an onnxruntime-genai model; its .onnx_adapter files switch
    adapters per generator (no adapter: the base model) and the tokens equal eager generate."""
    model, root = exported
    ids, _ = prompts(model.config.vocab_size)
    ids = ids[:1]  # an unpadded row: genai pads batches on its own terms
    manifest = AdapterSession(root / "unmerged").manifest
    got = genai_generate(root / "unmerged", manifest["onnx_adapters"], ids.numpy(), adapter)
    want = eager_generate(model, ids, torch.ones_like(ids), adapter)
    if got.shape[1] < want.shape[1]:  # genai ends at EOS without appending it; transformers appends it
        assert want[0, got.shape[1]] == model.generation_config.eos_token_id
        want = want[:, : got.shape[1]]
    np.testing.assert_array_equal(got, want)


def _variants():
    from tests.variant_cases import example_configs

    return {k: v for k, v in example_configs().items() if k != "lora"}


@pytest.mark.parametrize("variant", [v if v == "mor" else pytest.param(v, marks=pytest.mark.slow) for v in _variants()])
def test_onnxruntime_genai_serves_every_variant(variant, tmp_path):
    """Every variant's unmerged KV-cache export (MoR's router, CapaBoost's masks, Uni-LoRA's
    projection, CE-LoRA's and DropLoRA's eval forms as graph inputs and ops) decodes in
    onnxruntime-genai, adapters switched from their .onnx_adapter files, to eager generate's tokens."""
    config = _variants()[variant]
    model = llama()
    for name, seed in (("b", 2), ("a", 1)):
        model = lorafx.apply(model, lorafx.Spec(config, targets=["q_proj", "v_proj", "down_proj"]), name=name)
        perturb(model, name, seed=seed)
    lorafx.set_adapter(model, "a")
    model.eval()
    ids, _ = prompts(model.config.vocab_size)
    to_onnx(model, {"input_ids": ids[:2]}, tmp_path, mode="unmerged", kv_cache=True)
    manifest = AdapterSession(tmp_path).manifest
    outputs = []
    for adapter in ("a", "b"):
        got = genai_generate(tmp_path, manifest["onnx_adapters"], ids[:1].numpy(), adapter)
        want = eager_generate(model, ids[:1], torch.ones_like(ids[:1]), adapter)
        if got.shape[1] < want.shape[1]:  # genai ends at EOS without appending it
            want = want[:, : got.shape[1]]
        np.testing.assert_array_equal(got, want)
        outputs.append(got)
    assert not np.array_equal(*outputs), "the two adapters decode alike: the switch is not tested"
