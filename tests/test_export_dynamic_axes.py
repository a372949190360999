"""Per-input dynamic axes: each input's axes come from its role, so vision, vision-text and seq2seq
models export with the defaults and run in onnxruntime at shapes other than the example's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import lorafx
from lorafx.cli.models import tiny_mlp
from lorafx.errors import ExportError
from lorafx.export import AdapterSession, to_onnx
from tests.export_helpers import close
from tests.helpers import tiny_t5, tiny_unet
from tests.tolerances import ONNX_FP32


def _adapted(model, targets):
    torch.manual_seed(0)
    return lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=targets)).eval()


@torch.no_grad()
def _check_all_outputs(directory, model, inputs):
    """Every output of the onnxruntime session against the same-named eager output."""
    got = AdapterSession(directory).run(inputs)
    want = model(**inputs)
    assert got, "no outputs"
    for name, value in got.items():
        close(value, want[name].numpy())


def test_vit_unmerged_pixel_values_dynamic_batch_only(tmp_path):
    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    model = _adapted(tf.ViTModel(cfg), ["q_proj", "v_proj"])
    res = to_onnx(model, {"pixel_values": torch.randn(2, 3, 16, 16)}, tmp_path, mode="unmerged")
    assert res.manifest["inputs"][0]["shape"] == ["batch", 3, 16, 16]  # channels no longer a "seq" axis
    _check_all_outputs(tmp_path, model, {"pixel_values": torch.randn(5, 3, 16, 16)})


def test_clip_text_and_vision_inputs_have_their_own_axes(tmp_path):
    torch.manual_seed(0)
    cfg = tf.CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    model = _adapted(tf.CLIPModel(cfg), ["q_proj", "v_proj"])
    ex = {
        "input_ids": torch.randint(0, 64, (2, 5)),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "pixel_values": torch.randn(2, 3, 16, 16),
    }
    res = to_onnx(model, ex, tmp_path, mode="unmerged")
    shapes = {i["name"]: i["shape"] for i in res.manifest["inputs"]}
    assert shapes == {
        "input_ids": ["batch", "seq"],
        "attention_mask": ["batch", "seq"],
        "pixel_values": ["batch", 3, 16, 16],
    }
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # a padded row
    other = {
        "input_ids": torch.randint(0, 64, (3, 9)),
        "attention_mask": mask,
        "pixel_values": torch.randn(3, 3, 16, 16),
    }
    _check_all_outputs(tmp_path, model, other)


@pytest.mark.slow  # 16 s on the 2-core machine when quiet, 55 s shared (three ONNX Runtime runs + export)
def test_t5_encoder_and_decoder_lengths_are_independent(tmp_path):
    model = _adapted(tiny_t5(), ["q", "v"])
    ex = {
        "input_ids": torch.randint(0, 64, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "decoder_input_ids": torch.randint(0, 64, (2, 4)),
    }
    res = to_onnx(model, ex, tmp_path, mode="unmerged")
    shapes = {i["name"]: i["shape"] for i in res.manifest["inputs"]}
    assert shapes["decoder_input_ids"] == ["batch", "decoder_seq"] and shapes["input_ids"] == ["batch", "seq"]
    for enc, dec in [(9, 3), (3, 11)]:  # longer and shorter than the example, both ways round
        other = {
            "input_ids": torch.randint(0, 64, (3, enc)),
            "attention_mask": torch.ones(3, enc, dtype=torch.long),
            "decoder_input_ids": torch.randint(0, 64, (3, dec)),
        }
        got = AdapterSession(tmp_path).run(other)["logits"]
        assert got.shape == (3, dec, 64)
        with torch.no_grad():
            close(got, model(**other).logits.numpy())


def test_an_axis_the_model_fixes_is_a_named_error(tmp_path):
    model = tiny_mlp()  # its Linear fixes the feature axis at 32
    with pytest.raises(ExportError, match=r"input 'x' axis 1 \(dim 'features'\) is fixed to 32"):
        to_onnx(model, {"x": torch.randn(3, 32)}, tmp_path / "a", dynamic_shapes={"x": {0: "batch", 1: "features"}})
    assert not (tmp_path / "a").exists()


def test_bad_dynamic_shapes_are_named_errors(tmp_path):
    model, x = tiny_mlp(), {"x": torch.randn(3, 32)}
    with pytest.raises(ExportError, match=r"dynamic_shapes names \['pixels'\], which are not inputs"):
        to_onnx(model, x, tmp_path / "a", dynamic_shapes={"pixels": {0: "batch"}})
    with pytest.raises(ExportError, match=r"dynamic_shapes\['x'\]: axis 2 is not an axis of a 2-d input"):
        to_onnx(model, x, tmp_path / "a", dynamic_shapes={"x": {2: "batch"}})
    with pytest.raises(ExportError, match=r"input 'x' has size 1 on dynamic axis 0 \(batch\)"):
        to_onnx(model, {"x": torch.randn(1, 32)}, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_static_override_fixes_the_axes_in_the_graph(tmp_path):
    model = tiny_mlp()
    res = to_onnx(model, {"x": torch.randn(3, 32)}, tmp_path, mode="merged", dynamic_shapes={"x": None})
    assert res.manifest["inputs"][0]["shape"] == [3, 32]
    sess = AdapterSession(tmp_path)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run({"x": np.zeros((4, 32), np.float32)})


def test_axis_specialised_in_the_graph_is_named(tmp_path):
    """The check behind the error above, on a hand-built graph: x's axis 1 asked dynamic, written fixed."""
    import onnx
    from onnx import TensorProto, helper

    from lorafx.export.axes import check_axes_kept

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x, ids], [y])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    batch, seq, feat = (torch.export.Dim(n) for n in ("batch", "seq", "features"))
    check_axes_kept(tmp_path / "m.onnx", ["x", "ids"], ({0: batch}, {0: batch, 1: seq}))  # all kept
    with pytest.raises(ExportError, match=r"input 'x' axis 1 \(dim 'features'\) is fixed to 32"):
        check_axes_kept(tmp_path / "m.onnx", ["x", "ids"], ({0: batch, 1: feat}, {0: batch, 1: seq}))


@pytest.mark.slow  # 25 s quiet, more shared (diffusers import + export)
def test_diffusers_unet_exports_with_defaults(tmp_path):
    pytest.importorskip("diffusers")
    from lorafx.export import compare_export

    unet = tiny_unet()
    unet = _adapted(unet, ["to_q", "to_v"])
    ex = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([3, 7]),
        "encoder_hidden_states": torch.randn(2, 5, 8),
    }
    res = to_onnx(unet, ex, tmp_path, mode="unmerged")
    shapes = {i["name"]: i["shape"] for i in res.manifest["inputs"]}
    assert shapes == {
        "sample": ["batch", 4, 8, 8],
        "timestep": ["batch"],
        "encoder_hidden_states": ["batch", "encoder_seq", 8],
    }
    assert res.manifest["outputs"] == ["sample_output"]  # an output may not share the input's name in ONNX
    other = {
        "sample": torch.randn(3, 4, 8, 8),
        "timestep": torch.tensor([1, 5, 9]),
        "encoder_hidden_states": torch.randn(3, 7, 8),
    }
    got = AdapterSession(tmp_path).run(other)["sample_output"]
    with torch.no_grad():
        close(got, unet(**other).sample.numpy())
    assert compare_export(unet, other, tmp_path) <= ONNX_FP32["atol"]


def test_torch_export_guard_errors_are_reraised_with_input_names():
    """The guard torch.export raised on T5 before per-input axes (text as it printed it)."""
    from lorafx.export.axes import named_constraint_errors

    seq = torch.export.Dim("seq")
    names, dyn = ["input_ids", "attention_mask", "decoder_input_ids"], ({1: seq}, {1: seq}, {1: seq})
    torch_text = "L['flat'][2].size()[1] = 4 is not equal to L['flat'][0].size()[1] = 7"
    with pytest.raises(
        ExportError, match=r"input 'input_ids' axis 1 \(dim 'seq'\), input 'decoder_input_ids' axis 1"
    ) as e:
        with named_constraint_errors(names, dyn):
            raise RuntimeError(torch_text)
    assert "decoder_input_ids.shape[1] = 4 is not equal to input_ids.shape[1] = 7" in str(e.value)
    with pytest.raises(ValueError, match="unrelated"), named_constraint_errors(names, dyn):
        raise ValueError("unrelated")  # other errors pass through unchanged


def _bart():
    cfg = tf.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    ex = lambda b, t, d: {  # noqa: E731
        "input_ids": torch.randint(3, 64, (b, t)),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "decoder_input_ids": torch.randint(3, 64, (b, d)),
    }
    return tf.BartForConditionalGeneration(cfg), ex


def _whisper():
    cfg = tf.WhisperConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # input_features [b, mel bins, frames]: frames fixed at 2 x max_source_positions by the model
    ex = lambda b, t, d: {"input_features": torch.randn(b, 8, 16), "decoder_input_ids": torch.randint(3, 64, (b, d))}  # noqa: E731
    return tf.WhisperForConditionalGeneration(cfg), ex


@pytest.mark.slow  # 8.6 s each quiet, ~30 s shared; BART and Whisper add little beyond the T5 case
@pytest.mark.parametrize("build", [_bart, _whisper], ids=["bart", "whisper"])
def test_seq2seq_runs_at_other_decoder_lengths(build, tmp_path):
    torch.manual_seed(0)
    model, ex = build()
    model = _adapted(model, ["q_proj", "v_proj"])
    to_onnx(model, ex(2, 7, 4), tmp_path, mode="unmerged")
    for b, t, d in [(3, 9, 2), (1, 5, 6)]:
        other = ex(b, t, d)
        got = AdapterSession(tmp_path).run(other)["logits"]
        with torch.no_grad():
            close(got, model(**other).logits.numpy())
