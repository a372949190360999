"""Small shared helpers for the test suite: model factories (state snapshots: :mod:`model_state`)."""

import copy

import torch
from torch import nn


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT-2 layout: fused c_attn, transformers Conv1D weights stored [d_in, d_out]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_opt(seed: int = 0) -> nn.Module:
    """OPT layout: nn.Linear q/k/v/out_proj, fc1/fc2, biases everywhere."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=128,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    """T5 with one encoder and one decoder layer (d_model 16); it starts decoding from its pad token, 0,
    as the released checkpoints' configs say."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def tiny_unet(seed: int = 0) -> nn.Module:
    """A diffusers UNet2DConditionModel with two blocks (channels 8, 16), cross-attention width 8."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def run_under_triton_interpreter(test_file: str, deselect: str) -> None:
    """Run ``test_file``'s tests again in a subprocess with ``TRITON_INTERPRET=1`` (it must be set
    before ``import triton`` and must not leak into other tests), ``-k deselect`` leaving out the
    launcher itself; fail with the subprocess's output unless its tests ran and passed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", deselect]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
