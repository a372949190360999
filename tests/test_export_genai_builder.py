"""lorafx adapters on ORT GenAI's model builder graph (:func:`lorafx.export.genai_builder.build_with_builder`):
onnxruntime-genai decodes eager ``generate``'s tokens for each adapter and for the base model, switching
``.onnx_adapter`` files on the builder's fused graph; what the graph cannot hold is refused before building."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorafx
from lorafx.errors import ExportError
from lorafx.export.genai_builder import BUILDER_MANIFEST, build_with_builder
from tests.export_helpers import genai_decode, perturb
from tests.model_state import assert_unchanged, snapshot

og = pytest.importorskip("onnxruntime_genai")

NEW = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted():
    """Tiny Llama with LoRA ``a`` (rank 4) and ``b`` (rank 2, padded to 4 in the graph, scale set to 3)."""
    from lorafx.cli.models import tiny_llama

    model = tiny_llama(0, layers=2)
    for name, r in (("b", 2), ("a", 4)):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=TARGETS), name=name)
        perturb(model, name, seed=r)
    lorafx.set_scale(model, 3.0, "b")  # the scale is folded into B: set_scale must reach the file
    lorafx.set_adapter(model, "a")
    model.generation_config.eos_token_id = None  # a random model may emit EOS: decode every token
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from lorafx.cli.models import word_tokenizer

    model = adapted()
    out = tmp_path_factory.mktemp("builder") / "genai"
    before = snapshot(model)
    manifest = build_with_builder(model, out, word_tokenizer(model.config.vocab_size))
    assert_unchanged(before, model)  # the base weights were saved from an unloaded copy
    return model, out, manifest


def genai_tokens(directory, manifest: dict, ids: np.ndarray, adapter: str | None) -> np.ndarray:
    return genai_decode(directory, manifest["adapters"], ids, adapter, NEW, exact=True)


@pytest.mark.parametrize("adapter", ["a", "b", None])
def test_genai_tokens_equal_eager(built, adapter):
    """Each adapter (and none: the zero defaults) decodes exactly eager transformers' greedy tokens."""
    model, out, manifest = built
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    lorafx.set_adapter(model, adapter)
    try:
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    finally:
        lorafx.set_adapter(model, "a")
    np.testing.assert_array_equal(genai_tokens(out, manifest, ids.numpy(), adapter), want.numpy())


def test_graph_is_the_builders_with_adapter_inputs(built):
    """The graph keeps the builder's fused attention and shared cache buffer; every site's A and B are
    graph inputs of the exported rank, with zero defaults."""
    import onnx
    from onnx import numpy_helper

    model, out, manifest = built
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert "GroupQueryAttention" in ops
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    assert json.loads((out / BUILDER_MANIFEST).read_text()) == manifest
    sites = {s: sa.adapters["a"] for s, sa in lorafx.iter_sites(model).items() if "a" in sa.adapters}
    assert sorted(manifest["sites"]) == sorted(sites) and len(sites) == 14
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer}
    for site, names in manifest["sites"].items():
        a = sites[site]
        assert inputs[names["A"]] == [a.in_features, 4] and inputs[names["B"]] == [4, a.out_features]
        assert not numpy_helper.to_array(inits[names["A"]]).any()


def test_refusals_before_building(tmp_path):
    """A gated variant (MoR) and a rank below the adapters' are refused naming the site or rank; nothing is written."""
    from lorafx.cli.models import tiny_llama, word_tokenizer

    tok = word_tokenizer(256)
    mor = lorafx.apply(tiny_llama(0, layers=1), lorafx.Spec(lorafx.MoR(r=2, experts=2), targets=["down_proj"]))
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.down_proj.*gated"):
        build_with_builder(mor, tmp_path / "m", tok)
    lora = lorafx.apply(tiny_llama(0, layers=1), lorafx.Spec(lorafx.LoRA(r=4), targets=["q_proj"]))
    with pytest.raises(ExportError, match="rank=2 is below the adapters' rank 4"):
        build_with_builder(lora, tmp_path / "l", tok, rank=2)
    with pytest.raises(ExportError, match="has none"):
        build_with_builder(tiny_llama(0, layers=1), tmp_path / "p", tok)
    assert not any(tmp_path.iterdir())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not an earlier build_with_builder output"):
        build_with_builder(lora, tmp_path / "mine", tok)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
