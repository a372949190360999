"""Quantized tiny Llamas for the QLoRA tests, loaded the way users load them (transformers'
``BitsAndBytesConfig`` on CPU; torchao's ``quantize_``).

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a ``Linear4bit`` weight in place at its first
forward in eval mode without grad and computes in bf16 from then on (errors ~2e-3 against the fp32
dequant path). Tests that compare against fp32 references therefore run the model in train mode with
grad enabled (Llama has no dropout, so train and eval compute the same function).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lorafx.cli.models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

BNB_KINDS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def save_tiny_llama(directory: Path) -> Path:
    tiny_llama(0).save_pretrained(directory)
    return directory


def bnb_llama(directory: Path, kind: str = "nf4-dq"):
    """The tiny Llama at ``directory`` loaded with bitsandbytes (``kind`` of :data:`BNB_KINDS`), fp32 compute."""
    cfg = transformers.BitsAndBytesConfig(**BNB_KINDS[kind], bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=cfg, device_map="cpu", dtype=torch.float32
    )


def torchao_llama():
    """A tiny Llama with torchao weight-only quantized projections (the head stays dense)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_llama(0)
    quantize_(
        model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn
    )
    return model


def fresh(model):
    """A deep copy in train mode (the fp32 dequant path of bitsandbytes; see the module docstring)."""
    return copy.deepcopy(model).train()
