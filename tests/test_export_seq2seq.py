"""Seq2seq KV-cache export (``to_onnx(..., kv_cache=True)`` on T5, BART, Whisper): encoder, first-step
decoder and with-past decoder graphs; each graph's outputs equal eager at shapes other than the
example's, each graph takes only its own sites' adapter inputs, and greedy decoding in onnxruntime
equals transformers' ``generate`` token for token, per adapter and for the base model, on a padded
batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import lorafx
from lorafx.errors import ExportError
from lorafx.export import AdapterSession, to_onnx
from tests.export_helpers import close, perturb
from tests.helpers import tiny_t5 as t5

pytest.importorskip("onnxruntime")

NEW = 6  # new tokens per generate: the with-past graph runs 5 times over a growing cache
EXAMPLE = {"input_ids": torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))}  # source 7


def bart():
    torch.manual_seed(0)
    cfg = tf.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        forced_eos_token_id=None,
    )
    return tf.BartForConditionalGeneration(cfg).eval()


def whisper():
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=10,  # 20 frames: Whisper fixes the source length
        max_target_positions=32,
        pad_token_id=1,  # the defaults (50256) are GPT-2's ids, outside a 64-token vocabulary
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return tf.WhisperForConditionalGeneration(cfg).eval()


def adapted(build, targets=("q", "v")):
    """Two random LoRA adapters ``a`` (rank 4) and ``b`` (rank 2) on ``build()``, ``a`` active; no EOS
    (random weights would stop at it by chance, and both sides stop alike anyway)."""
    model = build()
    for name, r in (("b", 2), ("a", 4)):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=list(targets)), name=name)
        perturb(model, name, seed=r)
    lorafx.set_adapter(model, "a")
    model.generation_config.eos_token_id = None
    return model


def sources(batch=3, length=9) -> dict[str, torch.Tensor]:
    """Source ids of another batch and length than the export's example; row 1 padded after 5 tokens."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 64, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@torch.no_grad()
def eager_generate(model, src: dict, adapter) -> np.ndarray:
    lorafx.set_adapter(model, adapter)
    try:
        return model.generate(**src, max_new_tokens=NEW, do_sample=False).numpy()
    finally:
        lorafx.set_adapter(model, "a")


@pytest.fixture(scope="module")
def t5_exported(tmp_path_factory):
    model = adapted(t5)
    root = tmp_path_factory.mktemp("t5")
    to_onnx(model, EXAMPLE, root, mode="unmerged", kv_cache=True)
    return model, root


def test_t5_graph_files_and_adapter_inputs(t5_exported):
    """Three graphs with the documented names; each takes exactly the adapter inputs of the sites it
    runs: the encoder's, the decoder's, and the decoder's without the cross-attention k/v projections
    (with the cache filled their output is read from ``past_key_values.N.encoder.*``)."""
    model, root = t5_exported
    graphs = AdapterSession(root).manifest["graphs"]
    layers = range(model.config.num_decoder_layers)  # 1 here (export time); BART and Whisper (slow) have 2
    assert {g: v["file"] for g, v in graphs.items()} == {
        "encoder": "encoder.onnx",
        "decoder": "decoder.onnx",
        "decoder_with_past": "decoder_with_past.onnx",
    }
    assert [i["name"] for i in graphs["decoder_with_past"]["inputs"]] == [
        "decoder_input_ids",
        "encoder_attention_mask",
        *(f"past_key_values.{i}.{p}.{k}" for i in layers for p in ("decoder", "encoder") for k in ("key", "value")),
    ]
    assert graphs["decoder"]["outputs"] == ["logits"] + [
        f"present.{i}.{p}.{k}" for p in ("decoder", "encoder") for i in layers for k in ("key", "value")
    ]
    assert graphs["decoder_with_past"]["outputs"] == ["logits"] + [
        f"present.{i}.decoder.{k}" for i in layers for k in ("key", "value")
    ]
    sites = set(lorafx.iter_sites(model))
    enc = {s for s in sites if s.startswith("encoder.")}
    cross_kv = {s for s in sites if "EncDecAttention" in s and s.endswith((".k", ".v"))}
    assert enc and cross_kv and enc | {s for s in sites if s.startswith("decoder.")} == sites

    def sites_of(graph):
        return {n.rsplit(".", 1)[0] for n in graphs[graph]["adapter_inputs"]}

    assert sites_of("encoder") == enc
    assert sites_of("decoder") == sites - enc
    assert sites_of("decoder_with_past") == sites - enc - cross_kv
    with pytest.raises(ExportError, match="decoder_with_past"):  # which graph? the session cannot guess
        AdapterSession(root).run(sources(), adapter="a")


@torch.no_grad()
def test_t5_graphs_equal_eager(t5_exported):
    """Batch 3, source 9 with a padded row, a first step of 2 decoder tokens and a with-past step of 3
    (the example: batch 2, source 7, 3 and 3): the encoder states and both decoders' logits equal
    eager's (the with-past logits: eager's full decoder sequence without a cache), per adapter."""
    model, root = t5_exported
    sess = AdapterSession(root)
    src = sources()
    dec = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    logits = {}
    for adapter in ("a", "b", None):
        enc = sess.run(src, adapter=adapter, graph="encoder")["encoder_hidden_states"]
        mask = src["attention_mask"]
        first = sess.run(
            {"decoder_input_ids": dec[:, :2], "encoder_hidden_states": enc, "encoder_attention_mask": mask},
            adapter=adapter,
            graph="decoder",
        )
        past = {k.replace("present.", "past_key_values.", 1): v for k, v in first.items() if k != "logits"}
        step = sess.run(
            {"decoder_input_ids": dec[:, 2:], "encoder_attention_mask": mask, **past},
            adapter=adapter,
            graph="decoder_with_past",
        )
        lorafx.set_adapter(model, adapter)
        close(enc, model.get_encoder()(**src).last_hidden_state.numpy())
        full = model(**src, decoder_input_ids=dec).logits.numpy()
        close(first["logits"], full[:, :2])
        close(step["logits"], full[:, 2:])
        logits[adapter] = step["logits"]
    lorafx.set_adapter(model, "a")
    assert np.abs(logits["a"] - logits[None]).max() > 1e-3 and np.abs(logits["b"] - logits["a"]).max() > 1e-3


@pytest.mark.parametrize("adapter", ["a", "b", None])
def test_t5_generate_equals_eager(t5_exported, adapter):
    model, root = t5_exported
    src = sources()
    got = AdapterSession(root).generate(src["input_ids"], NEW, adapter=adapter, attention_mask=src["attention_mask"])
    np.testing.assert_array_equal(got, eager_generate(model, src, adapter))


def test_t5_per_row_adapters_and_other_lengths(t5_exported):
    """Unmerged, one adapter per row (b, base, a), at batch 3 and source 4 (shorter than the example)."""
    model, root = t5_exported
    src = sources(length=4)
    rows = ["b", None, "a"]
    got = AdapterSession(root).generate(src["input_ids"], NEW, adapter=rows, attention_mask=src["attention_mask"])
    for i, name in enumerate(rows):
        np.testing.assert_array_equal(
            got[i : i + 1], eager_generate(model, {k: v[i : i + 1] for k, v in src.items()}, name)
        )


def test_t5_refusals(t5_exported, tmp_path):
    """dynamic=False, a .onnx path, a size-1 source axis, example decoder ids and a model without a
    decoder start token are refused before anything is written."""
    model, _ = t5_exported
    with pytest.raises(ExportError, match="dynamic=False"):
        to_onnx(model, EXAMPLE, tmp_path / "d", mode="unmerged", kv_cache=True, dynamic=False)
    with pytest.raises(ExportError, match="give a directory"):
        to_onnx(model, EXAMPLE, tmp_path / "t5.onnx", mode="unmerged", kv_cache=True)
    with pytest.raises(ExportError, match="input_ids"):
        to_onnx(model, {"input_ids": torch.ones(2, 1, dtype=torch.long)}, tmp_path / "s", kv_cache=True)
    with pytest.raises(ExportError, match=r"drop \['decoder_input_ids'\]"):  # the graphs start from the start token
        to_onnx(model, {**EXAMPLE, "decoder_input_ids": EXAMPLE["input_ids"]}, tmp_path / "x", kv_cache=True)
    gen = model.generation_config
    saved = gen.decoder_start_token_id, gen.bos_token_id
    gen.decoder_start_token_id = gen.bos_token_id = None
    try:
        with pytest.raises(ExportError, match="decoder_start_token_id or bos_token_id"):
            to_onnx(model, EXAMPLE, tmp_path / "n", mode="unmerged", kv_cache=True)
    finally:
        gen.decoder_start_token_id, gen.bos_token_id = saved
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # two more exports of three graphs: ~25 s each on the shared 2-core machine
def test_t5_multi_and_merged(tmp_path):
    """Multi: rows b, a, b in one run per step (adapter_ids fed to every graph); merged: b folded in."""
    model = adapted(t5)
    src = sources()
    rows = ["b", "a", "b"]
    to_onnx(model, EXAMPLE, tmp_path / "multi", mode="multi", kv_cache=True)
    got = AdapterSession(tmp_path / "multi").generate(
        src["input_ids"], NEW, adapter=rows, attention_mask=src["attention_mask"]
    )
    for i, name in enumerate(rows):
        np.testing.assert_array_equal(
            got[i : i + 1], eager_generate(model, {k: v[i : i + 1] for k, v in src.items()}, name)
        )
    to_onnx(model, EXAMPLE, tmp_path / "merged", mode="merged", adapters=["b"], kv_cache=True)
    got = AdapterSession(tmp_path / "merged").generate(src["input_ids"], NEW, attention_mask=src["attention_mask"])
    np.testing.assert_array_equal(got, eager_generate(model, src, "b"))


@pytest.mark.slow  # one export of three graphs + 3 generates: ~30 s on the shared 2-core machine
def test_bart_generate_equals_eager(tmp_path):
    model = adapted(bart, ["q_proj", "v_proj"])
    res = to_onnx(model, EXAMPLE, tmp_path, mode="unmerged", kv_cache=True)
    assert res.manifest["graphs"]["decoder_with_past"]["outputs"] == ["logits"] + [
        f"present.{i}.decoder.{k}" for i in range(2) for k in ("key", "value")
    ]  # two decoder layers under one encoder layer
    src = sources()
    src["input_ids"] = src["input_ids"].masked_fill(src["attention_mask"] == 0, model.config.pad_token_id)
    sess = AdapterSession(tmp_path)
    outs = {}
    for adapter in ("a", "b", None):
        outs[adapter] = sess.generate(src["input_ids"], NEW, adapter=adapter, attention_mask=src["attention_mask"])
        np.testing.assert_array_equal(outs[adapter], eager_generate(model, src, adapter))
    assert (outs["a"] != outs[None]).any() or (outs["b"] != outs[None]).any()


@pytest.mark.slow  # one export of three graphs + 3 generates: ~30 s on the shared 2-core machine
def test_whisper_generate_equals_eager(tmp_path):
    """Whisper: ``input_features`` in, no encoder mask, the source length fixed by the model (20 frames);
    another batch than the example's. Whisper's own ``generate`` returns the new tokens without the
    decoder start token, which the session's output starts with."""
    model = adapted(whisper, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(4)
    res = to_onnx(
        model, {"input_features": torch.randn(2, 8, 20, generator=g)}, tmp_path, mode="unmerged", kv_cache=True
    )
    assert [i["name"] for i in res.manifest["graphs"]["decoder"]["inputs"]] == [
        "decoder_input_ids",
        "encoder_hidden_states",
    ]
    feats = torch.randn(3, 8, 20, generator=g)
    sess = AdapterSession(tmp_path)
    outs = {}
    for adapter in ("a", "b", None):
        outs[adapter] = got = sess.generate(feats, NEW, adapter=adapter)
        assert (got[:, 0] == model.generation_config.decoder_start_token_id).all()
        np.testing.assert_array_equal(got[:, 1:], eager_generate(model, {"input_features": feats}, adapter))
    assert (outs["a"] != outs[None]).any() and (outs["b"] != outs[None]).any()
    with pytest.raises(ExportError, match="input_features"):
        sess.generate(torch.ones(3, 20, dtype=torch.long), NEW, adapter="a")
    with pytest.raises(ExportError, match=r"encoder takes \['input_features'\], not input_ids"):
        to_onnx(model, {"input_ids": torch.ones(2, 4, dtype=torch.long)}, tmp_path / "ids", kv_cache=True)
    with pytest.raises(ExportError, match="no attention_mask"):  # Whisper's encoder takes none: never ignored
        sess.generate(feats, NEW, adapter="a", attention_mask=torch.ones(3, 20, dtype=torch.long))


@pytest.mark.slow  # one export of three graphs: ~25 s on the shared 2-core machine
def test_cli_exports_t5_with_the_cache(tmp_path, capsys):
    """``lorafx export <T5 config dir> --kv-cache --check`` writes the three graphs and checks greedy
    tokens against eager ``generate``."""
    from lorafx.cli import main

    cfg = t5().config
    cfg.architectures = ["T5ForConditionalGeneration"]
    cfg.save_pretrained(tmp_path / "t5")
    argv = ["export", str(tmp_path / "t5"), "--kv-cache", "--mode", "unmerged", "--variant", "lora", "--r", "4"]
    assert main([*argv, "--targets", "q,v", "--out", str(tmp_path / "out"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "encoder.onnx, decoder.onnx, decoder_with_past.onnx" in printed
    assert "greedy tokens onnxruntime == eager generate: True" in printed
