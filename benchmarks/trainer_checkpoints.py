"""What a ``transformers.Trainer`` checkpoint holds: lorafx (``LorafxTrainer``) vs PEFT vs a plain
Trainer, on the same tiny Llama (``lorafx.cli.models.tiny_llama``: 2 layers, hidden 64, vocab 256).

LoRA r=8 on all seven linear kinds of each layer for lorafx and PEFT; the plain Trainer fine-tunes
the whole base model (a plain Trainer refuses to checkpoint a lorafx-adapted model, whose
``save_pretrained`` is refused). Two steps, a checkpoint at step 2; bytes per file of
``checkpoint-2`` (model files only; optimizer, scheduler, RNG and trainer state are listed apart).

Run: ``PYTHONPATH=. python benchmarks/trainer_checkpoints.py``; writes
``benchmarks/results/trainer_checkpoints.{json,md}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import lorafx
from lorafx.cli.models import tiny_llama
from lorafx.integrations.transformers import LorafxTrainer

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.arange(16) * (i + 1) % 256
        return {"input_ids": ids, "labels": ids}


def checkpoint(trainer_class, model, out: Path) -> dict[str, int]:
    args = TrainingArguments(
        str(out), use_cpu=True, report_to=[], max_steps=2, save_steps=2, per_device_train_batch_size=4
    )
    trainer_class(model=model, args=args, train_dataset=Tokens()).train()
    ckpt = out / "checkpoint-2"
    return {f: os.path.getsize(ckpt / f) for f in sorted(os.listdir(ckpt))}


def main() -> None:
    import peft

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = lorafx.Spec(lorafx.LoRA(r=8), targets="all-linear")
        rows["lorafx (LorafxTrainer)"] = checkpoint(LorafxTrainer, lorafx.apply(tiny_llama().train(), spec), tmp / "a")
        peft_model = peft.get_peft_model(tiny_llama().train(), peft.LoraConfig(r=8, target_modules=LINEARS))
        rows["PEFT (Trainer)"] = checkpoint(Trainer, peft_model, tmp / "b")
        rows["plain Trainer, full model"] = checkpoint(Trainer, tiny_llama().train(), tmp / "c")
    results = Path(__file__).parent / "results"
    (results / "trainer_checkpoints.json").write_text(json.dumps(rows, indent=2))
    lines = ["| run | model files in checkpoint-2 (bytes) | optimizer.pt |", "|---|---|---|"]
    for name, files in rows.items():
        model_files = ", ".join(
            f"`{f}` {n:,}" for f, n in files.items() if f not in TRAINER_FILES and not f.startswith(".")
        )
        lines.append(f"| {name} | {model_files} | {files.get('optimizer.pt', 0):,} |")
    (results / "trainer_checkpoints.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
