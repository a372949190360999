"""Hugging Face Trainer and saving (issue items 1-2): adapter-only checkpoints, exact resume, CE-LoRA's
step under Trainer and accelerate, save_pretrained refusal, merge_and_unload / unload, the summary."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import lorafx
from lorafx.cli.models import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from lorafx.integrations.transformers import LorafxCallback, LorafxTrainer  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 16):
        self.ids = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, max_steps=6, save_steps=3, **kw) -> TrainingArguments:
    return TrainingArguments(
        str(out),
        use_cpu=True,
        report_to=[],
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=100,
        seed=0,
        disable_tqdm=True,
        **kw,
    )


def adapted(config=None) -> torch.nn.Module:
    config = config or lorafx.LoRA(r=4, dropout=0.1)  # dropout: resume must restore the RNG too
    return lorafx.apply(tiny_llama().train(), lorafx.Spec(config, targets="all-linear"))


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}


def train(out, config=None, resume=None, trainer_class=LorafxTrainer, **kw):
    model = adapted(config)
    trainer = trainer_class(model=model, args=training_args(out, **kw), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path):
    whole, _ = train(tmp_path / "whole")
    ckpt = tmp_path / "whole" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"lorafx_adapter.safetensors", "lorafx_adapter.json", "adapter_model.safetensors"} <= files
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert "model.safetensors" not in files
    assert os.path.getsize(ckpt / "lorafx_adapter.safetensors") < 40_000  # the whole model: ~445 kB

    resumed, _ = train(tmp_path / "resumed", resume=str(ckpt))
    want, got = adapter_state(whole), adapter_state(resumed)
    assert want.keys() == got.keys() and len(want) > 0
    for k in want:
        assert torch.equal(want[k], got[k]), k  # bit for bit: weights, optimizer, scheduler and RNG restored
    middle = lorafx.load_adapter(tiny_llama(), ckpt)
    assert any(not torch.equal(v, adapter_state(middle)[k]) for k, v in want.items())  # it trained after step 3


def test_final_save_model_is_an_adapter_that_lorafx_and_peft_load(tmp_path):
    model, trainer = train(tmp_path / "run", max_steps=2, save_steps=100)
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    ids = torch.randint(0, 256, (2, 8))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        got = lorafx.load_adapter(tiny_llama(), tmp_path / "final")(ids).logits
        peft = pytest.importorskip("peft")
        via_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_peft, want, rtol=1e-5, atol=1e-5)


def test_celora_steps_under_trainer_and_resumes_exactly(tmp_path):
    config = lorafx.CELoRA(r=8, keep_ratio=0.5, recompute_every=2)
    whole, _ = train(tmp_path / "whole", config)
    adapters = [sa.adapters["default"] for sa in lorafx.iter_sites(whole).values()]
    assert all(a.steps == 6 for a in adapters)  # lorafx.step ran after each optimizer step
    # and chose the kept channels where an input gradient flows (layer 0's inputs need none)
    chosen = {sa.site for sa in lorafx.iter_sites(whole).values() if sa.adapters["default"].index.numel() > 0}
    assert any(s.startswith("model.layers.1.") for s in chosen)
    resumed, _ = train(tmp_path / "resumed", config, resume=str(tmp_path / "whole" / "checkpoint-3"))
    for sa, again in zip(lorafx.iter_sites(whole).values(), lorafx.iter_sites(resumed).values(), strict=True):
        a, b = sa.adapters["default"], again.adapters["default"]
        assert (a.steps, a.pending) == (b.steps, b.pending) and torch.equal(a.index, b.index)
    want, got = adapter_state(whole), adapter_state(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_callback_steps_a_plain_trainer_once_per_update(tmp_path):
    model = adapted(lorafx.CELoRA(r=8, keep_ratio=0.5))
    args = training_args(tmp_path, max_steps=3, save_strategy="no", gradient_accumulation_steps=2)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[LorafxCallback()]).train()
    assert {sa.adapters["default"].steps for sa in lorafx.iter_sites(model).values()} == {3}


def test_plain_trainer_checkpoint_of_an_adapted_model_is_refused(tmp_path):
    args = training_args(tmp_path, max_steps=1, save_steps=1)
    with pytest.raises(lorafx.LorafxError, match="LorafxTrainer"):
        Trainer(model=adapted(), args=args, train_dataset=Tokens()).train()


def test_attach_step_reaches_through_accelerates_optimizer():
    accelerate = pytest.importorskip("accelerate")
    model = adapted(lorafx.CELoRA(r=8, keep_ratio=0.5))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    assert lorafx.attach_step(opt, model) is lorafx.attach_step(opt, model)  # once per model
    ids = torch.randint(0, 256, (2, 8))
    for _ in range(2):
        acc.backward(model(ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    assert {sa.adapters["default"].steps for sa in lorafx.iter_sites(model).values()} == {2}


def test_save_pretrained_of_an_adapted_model_is_refused_and_from_pretrained_never_gives_the_base(tmp_path):
    model = adapted(lorafx.LoRA(r=4, init="random"))
    with pytest.raises(lorafx.LorafxError, match=r"save_adapter.*merge_and_unload"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # refused before writing anything
    ids = torch.randint(0, 256, (2, 8))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    lorafx.merge_and_unload(model).save_pretrained(tmp_path)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the adapter's effect is in the file


def test_merge_and_unload_returns_the_plain_class_with_merged_weights():
    base = tiny_llama()
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear"))
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        lorafx.merge(model)
        want = model(ids).logits
        lorafx.unmerge(model)
        merged = lorafx.merge_and_unload(model)
        got = merged(ids).logits
    assert type(merged) is type(base)
    assert type(merged.model.layers[0].mlp) is type(base.model.layers[0].mlp)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert list(merged.state_dict()) == list(base.state_dict())
    assert not any(k.startswith("_lorafx") or k == "save_pretrained" for k in merged.__dict__)
    assert torch.equal(got, want)
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    merged.save_pretrained  # the class's method again  # noqa: B018


def test_unload_gives_the_base_model_back_even_when_merged():
    base = tiny_llama()
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear"))
    lorafx.merge(model, keep_original=True)
    plain = lorafx.unload(model)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, base(ids).logits, rtol=0, atol=0)
    assert list(plain.state_dict()) == list(base.state_dict())
    again = lorafx.apply(plain, lorafx.Spec(lorafx.LoRA(r=2), targets=["q_proj"]))  # adaptable again
    assert len(lorafx.iter_sites(again)) == 2


def test_unload_of_a_model_traced_whole_returns_the_original_object():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gm = lorafx.apply(base, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["0"]), name="a")
    gm = lorafx.apply(gm, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["2"]), name="b")
    assert gm is not base
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = gm(x)
    merged = lorafx.merge_and_unload(gm)
    assert merged is base and list(merged.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.testing.assert_close(merged(x), want, rtol=1e-6, atol=1e-6)


def test_mor_is_not_merged_and_the_model_is_unchanged():
    model = adapted(lorafx.MoR(r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorafx.NotMergeableError):
        lorafx.merge_and_unload(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert lorafx.adapter_names(model) == ["default"]


def test_trainable_parameter_summary_matches_peft(capsys):
    peft = pytest.importorskip("peft")
    ours = adapted(lorafx.LoRA(r=8))
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(
            r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    )
    trainable, total = lorafx.trainable_parameters(ours)
    assert (trainable, total) == theirs.get_nb_trainable_parameters()
    lorafx.print_trainable_parameters(ours)
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    model = adapted()
    args = training_args(
        tmp_path,
        max_steps=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worse (earlier) checkpoint is "best": loading it is visible
    )
    trainer = LorafxTrainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    want = adapter_state(lorafx.load_adapter(tiny_llama(), best))
    assert all(torch.equal(v, want[k]) for k, v in adapter_state(model).items())


def test_unload_after_deepcopy_dtype_change_lowering_and_two_adapters():
    import lorafx.kernels  # noqa: F401  (registers the "ops" implementation)

    base = tiny_llama()
    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets="all-linear"))
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["up_proj"]), name="b")
    ids = torch.randint(0, 256, (2, 8))
    copied = copy.deepcopy(model).to(torch.float64)
    lorafx.use_kernels(copied, "ops")
    plain = lorafx.unload(copied)
    assert {p.dtype for p in plain.state_dict().values()} == {torch.float64}
    assert type(plain.model.layers[1].mlp) is type(base.model.layers[1].mlp)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, base.double()(ids).logits, rtol=0, atol=0)
