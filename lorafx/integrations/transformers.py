"""``transformers.Trainer`` for lorafx-adapted models: adapter-only checkpoints, exact resume, and
CE-LoRA's :func:`lorafx.step` after every optimizer step.

Use :class:`LorafxTrainer` where you would use ``Trainer`` (or :func:`lorafx_trainer` to add the
same behaviour to another Trainer subclass, e.g. TRL's ``SFTTrainer``)::

    from lorafx.integrations.transformers import LorafxTrainer

    model = lorafx.apply(base, lorafx.Spec(lorafx.LoRA(r=8), targets="all-linear"))
    trainer = LorafxTrainer(model=model, args=TrainingArguments(...), train_dataset=ds)
    trainer.train()                                  # checkpoint-N/ hold the adapter only
    trainer.train(resume_from_checkpoint=True)       # adapter, optimizer, scheduler, RNG restored
    trainer.save_model("runs/final")                 # lorafx_adapter.* (+ PEFT files for plain LoRA)

Why a Trainer subclass and not only a callback. Trainer writes model weights in ``_save`` (through
``save_pretrained`` for a ``PreTrainedModel``) and reads them back in ``_load_from_checkpoint`` and
``_load_best_model``, before any callback runs, and it recognises adapter models by class
(``_is_peft_model``: PeftModel only). A callback's ``on_save`` runs after the full model has been
written, and on resume Trainer refuses a checkpoint that holds no weights file it knows or loads it
with ``load_sharded_checkpoint``, which fails, before ``on_train_begin``. So those three methods are
overridden, each falling back to Trainer's own for a model lorafx has not adapted:

* ``_save`` writes ``lorafx_adapter.safetensors`` + ``lorafx_adapter.json`` (the active adapter,
  :func:`lorafx.save_adapter`), PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` too
  when every site is plain LoRA, and ``lorafx_runtime_state.pt`` for stateful adapters (CE-LoRA's step
  count and kept channels); plus the processing class and training arguments, as Trainer does.
  Optimizer, scheduler, scaler and RNG states are Trainer's own files, untouched.
* ``_load_from_checkpoint`` / ``_load_best_model`` load those files into the adapter the model
  already holds, in place (:func:`lorafx.adapter_files.reload_adapter`), so the optimizer's
  parameters stay the same objects.

The step is a callback, :class:`LorafxCallback`, which any Trainer can take: at ``on_train_begin`` it
hooks :func:`lorafx.step` on the innermost torch optimizer (:func:`lorafx.attach_step`), so it runs
once per real update (not on gradient-accumulation micro-steps, not on an fp16-overflow skip).
``LorafxTrainer`` adds it itself. On an adapted ``PreTrainedModel``, ``save_pretrained`` is refused
(see :func:`lorafx.apply`), so a plain ``Trainer`` with this callback fails loudly at its first
checkpoint instead of writing the whole model under keys ``from_pretrained`` drops.

Limits: the files are written by the process that saves (``args.should_save``) from the model it
holds, so FSDP-sharded adapters (where every rank must gather) and DeepSpeed ZeRO-3 are not handled
here yet; DDP and one process are. Only the active adapter is saved and restored.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from lorafx import state
from lorafx.adapter_files import CONFIG, reload_adapter, save_adapter
from lorafx.errors import SpecError
from lorafx.peft_interop import to_peft
from lorafx.training import attach_step, load_runtime_state, runtime_state

RUNTIME_STATE = "lorafx_runtime_state.pt"
TRAINING_ARGS = "training_args.bin"  # Trainer's file name for its arguments


class LorafxCallback(TrainerCallback):
    """Run :func:`lorafx.step` after every optimizer step of a Trainer (needed by CE-LoRA; harmless
    for stateless variants). Pass it as ``Trainer(..., callbacks=[LorafxCallback()])``; a model
    lorafx has not adapted is left alone."""

    def __init__(self):
        self._handle = None

    def on_train_begin(self, args, state_, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None and state.find(_unwrap(model)) is not None:
            self._handle = attach_step(optimizer, _unwrap(model))

    def on_train_end(self, args, state_, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint_files(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the active adapter of ``model`` to ``directory`` as :class:`LorafxTrainer` does: lorafx
    files, PEFT files when every site is plain LoRA, and the runtime state of stateful adapters."""
    directory = save_adapter(model, directory)
    try:
        to_peft(model, directory)
    except SpecError:  # not plain LoRA everywhere: the lorafx files alone describe it
        pass
    extra = runtime_state(model)
    if extra:
        torch.save(extra, directory / RUNTIME_STATE)
    return directory


def load_checkpoint_files(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load what :func:`save_checkpoint_files` wrote into ``model``'s active adapter, in place."""
    directory = Path(directory)
    reload_adapter(model, directory)
    if (directory / RUNTIME_STATE).is_file():
        load_runtime_state(model, torch.load(directory / RUNTIME_STATE, weights_only=True))


def _adapted(trainer: Trainer, model: nn.Module | None = None) -> nn.Module | None:
    model = _unwrap(trainer.accelerator.unwrap_model(model if model is not None else trainer.model))
    return model if state.find(model) is not None else None


class LorafxTrainerMixin:
    """The overrides of :class:`LorafxTrainer`, for mixing into another ``Trainer`` subclass
    (``class MySFT(LorafxTrainerMixin, SFTTrainer)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, LorafxCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(LorafxCallback())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _adapted(self)
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_checkpoint_files(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapted = _adapted(self, model)
        if adapted is None or not (Path(resume_from_checkpoint) / CONFIG).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_files(adapted, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        adapted = _adapted(self)
        best = self.state.best_model_checkpoint
        if adapted is None or best is None or not (Path(best) / CONFIG).is_file():
            return super()._load_best_model()
        load_checkpoint_files(adapted, best)
        return None


class LorafxTrainer(LorafxTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold the adapter only, whose
    ``resume_from_checkpoint`` restores it exactly, and which calls :func:`lorafx.step` after every
    optimizer step (see the module docstring).

    Example:
        >>> trainer = LorafxTrainer(model=lorafx.apply(base, spec), args=args, train_dataset=ds)
        >>> trainer.train()
    """


def lorafx_trainer(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` with :class:`LorafxTrainerMixin`'s behaviour, e.g. ``lorafx_trainer(SFTTrainer)``."""
    return type(f"Lorafx{trainer_class.__name__}", (LorafxTrainerMixin, trainer_class), {})
