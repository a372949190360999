"""``Spec.modules_to_save`` and ``Spec(task="seq_cls")`` against PEFT 0.21's ``modules_to_save`` and
SEQ_CLS task: trainable parameters, outputs, head gradients, checkpoints loaded both ways, per-adapter
copies switched by ``set_adapter``, and the warning for a classification head left frozen."""

import copy
import warnings

import pytest
import torch
from model_state import assert_unchanged, snapshot
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from tolerances import MERGED_LOGITS_FP32, ONNX_FP32, assert_close
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

import lorafx
from lorafx.cli.models import tiny_llama
from lorafx.errors import ExportError, SpecError
from lorafx.export import to_onnx

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def tiny_bert_cls():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, num_labels=3
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama_cls():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return LlamaForSequenceClassification(cfg).eval()


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _head(model):
    return model.classifier if hasattr(model, "classifier") else model.score


def _peft_seq_cls(base, targets):
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=targets, init_lora_weights=False),
    )
    with torch.no_grad():  # a trained head: the copy differs from the original
        for p in _head(peft_model.base_model.model).modules_to_save["default"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    return peft_model


CASES = {"bert": (tiny_bert_cls, ["query", "value"]), "llama": (tiny_llama_cls, ["q_proj", "v_proj"])}


@pytest.mark.parametrize("make, targets", CASES.values(), ids=CASES)
def test_seq_cls_trains_and_saves_the_head_as_peft(make, targets, tmp_path):
    base = make()
    peft_model = _peft_seq_cls(base, targets)
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4), targets=targets, task="seq_cls"))
    assert _trainable(model) == _trainable(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = lorafx.from_peft(copy.deepcopy(base), tmp_path / "peft")
    ours, theirs = model(IDS).logits, peft_model(IDS).logits
    assert (theirs - base(IDS).logits).abs().max() > 1e-2
    assert_close(ours, theirs)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    mine = _head(model).copies["default"].weight.grad
    assert_close(mine, _head(peft_model.base_model.model).modules_to_save["default"].weight.grad)
    assert _head(model).original.weight.grad is None  # the original stays frozen
    lorafx.to_peft(model, tmp_path / "back")  # and PEFT loads lorafx's checkpoint
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert type(again).__name__ == "PeftModelForSequenceClassification"
    assert_close(again(IDS).logits, theirs.detach())


def test_a_classification_head_left_frozen_warns_with_the_fix():
    with pytest.warns(
        UserWarning, match=r"classifier .*stays frozen.*task='seq_cls'.*modules_to_save=\['classifier'\]"
    ):
        lorafx.apply(tiny_bert_cls(), lorafx.Spec(lorafx.LoRA(r=4), targets=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafx.apply(tiny_bert_cls(), lorafx.Spec(lorafx.LoRA(r=4), targets=["query"], modules_to_save=["classifier"]))


def test_each_adapter_has_its_own_copy_switched_saved_and_deleted(tmp_path):
    base = tiny_bert_cls()
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4), targets=["query"], task="seq_cls"), "a")
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets=["value"], task="seq_cls"), "b")
    head = model.classifier
    with torch.no_grad():
        head.copies["a"].weight.add_(1.0)
        head.copies["b"].weight.sub_(1.0)
    lorafx.set_adapter(model, "a")
    assert head.copies["a"].weight.requires_grad and not head.copies["b"].weight.requires_grad
    out_a = model(IDS).logits
    lorafx.set_adapter(model, "b")
    out_b = model(IDS).logits
    assert (out_a - out_b).abs().max() > 1e-2
    lorafx.set_adapter(model, None)  # no adapter: the original head and base sites
    assert_close(model(IDS).logits, base(IDS).logits)
    lorafx.save_adapter(model, tmp_path, name="a")
    loaded = lorafx.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(loaded(IDS).logits, out_a)
    lorafx.delete_adapter(model, "a")
    assert list(head.copies) == ["b"]


def test_merge_and_unload_keeps_the_trained_head_and_unload_the_original():
    base = tiny_bert_cls()
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4), targets=["query"], task="seq_cls"))
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    adapted = model(IDS).logits
    merged = lorafx.merge_and_unload(copy.deepcopy(model))
    assert type(merged.classifier) is torch.nn.Linear
    assert_close(merged(IDS).logits, adapted, **MERGED_LOGITS_FP32)
    plain = lorafx.unload(model)
    assert type(plain.classifier) is torch.nn.Linear
    assert_close(plain(IDS).logits, base(IDS).logits)


def test_bad_modules_to_save_are_refused_by_name_and_leave_the_model_unchanged():
    model = tiny_bert_cls()
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"modules_to_save entries \['clasifier'\] match no module"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4), targets=["query"], modules_to_save=["clasifier"]))
    with pytest.raises(SpecError, match=r"site 'classifier' is inside 'classifier'"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=3), targets=["classifier"], task="seq_cls"))
    with pytest.raises(SpecError, match=r"task 'seq_cls': LlamaForCausalLM has none of the heads"):
        lorafx.apply(tiny_llama(), lorafx.Spec(lorafx.LoRA(r=4), task="seq_cls"))
    with pytest.raises(SpecError, match=r"Spec.task must be one of"):
        lorafx.Spec(lorafx.LoRA(r=4), task="causal_lm")
    assert_unchanged(before, model)


def test_spec_round_trips_modules_to_save_and_task():
    spec = lorafx.Spec(lorafx.LoRA(r=4), targets=["query"], modules_to_save=["pooler"], task="seq_cls")
    assert lorafx.Spec.from_json(spec.to_json()) == spec
    plain = lorafx.Spec(lorafx.LoRA(r=4), targets=["query"])
    assert "modules_to_save" not in plain.to_dict() and "task" not in plain.to_dict()  # old files unchanged


def _trained_head_model():
    spec = lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["query"], task="seq_cls")
    model = lorafx.apply(tiny_bert_cls(), spec)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    return model


def test_compile_runs_the_saved_head_and_unmerged_export_is_refused(tmp_path):
    model = _trained_head_model()
    with torch.no_grad():
        eager = model(IDS).logits
        torch._dynamo.reset()
        assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(IDS).logits, eager)
        torch._dynamo.reset()
    before = snapshot(model)
    with pytest.raises(ExportError, match=r"modules_to_save \['classifier'\]: mode 'unmerged'"):
        to_onnx(model, {"input_ids": IDS}, tmp_path / "u", mode="unmerged")
    assert_unchanged(before, model)


@pytest.mark.slow
def test_merged_onnx_export_runs_the_saved_head(tmp_path):
    import onnxruntime as ort

    model = _trained_head_model()
    with torch.no_grad():
        eager = model(IDS).logits
    result = to_onnx(model, {"input_ids": IDS}, tmp_path / "m", mode="merged")
    session = ort.InferenceSession(str(result.onnx_path))
    (logits, *_) = session.run(None, {"input_ids": IDS.numpy()})
    assert_close(torch.from_numpy(logits), eager, **ONNX_FP32)
