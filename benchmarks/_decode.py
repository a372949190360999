"""KV-cache decoding, batch 1 and 8: base model vs lorafx (unmerged) vs PEFT, eager and compiled.

Helpers of ``benchmarks/overhead.py --decode``. Eager rows time ``generate`` (greedy, transformers'
dynamic KV cache) per new token; compiled rows time a greedy loop over a ``StaticCache`` whose decode
step is ``torch.compile``d (one graph per contender and batch: the prefill runs eagerly). Contenders
run interleaved in one process (``common.interleaved_medians``); the compiled ones are compiled and
checked against their eager twin before timing.
"""

from __future__ import annotations

import torch

import lorafx


def generate_fn(model, ids, new_tokens: int):
    """Eager greedy ``generate`` with the KV cache, exactly ``new_tokens`` new tokens."""

    def run():
        with torch.no_grad():
            return model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    return run


def static_decode_fn(model, step, ids, new_tokens: int):
    """Greedy decoding over a ``StaticCache``: eager prefill, then ``step`` (the model or its compiled
    forward) once per new token. Returns the generated ids like ``generate``."""
    from transformers import StaticCache

    def run():
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(ids.shape[1]))
            tok = out.logits[:, -1:].argmax(-1)
            toks = [ids, tok]
            for i in range(new_tokens - 1):
                pos = torch.tensor([ids.shape[1] + i])
                out = step(tok, past_key_values=cache, use_cache=True, cache_position=pos)
                tok = out.logits[:, -1:].argmax(-1)
                toks.append(tok)
        return torch.cat(toks, 1)

    return run


def compiled_steps(base, fx_model, peft_model) -> dict:
    """The compiled decode step of each contender: ``lorafx.compile`` for lorafx (fullgraph), plain
    ``torch.compile`` for the base model and PEFT (PEFT is allowed graph breaks)."""
    return {
        "base": torch.compile(base, fullgraph=True),
        "lorafx": lorafx.compile(fx_model),
        "peft": torch.compile(peft_model),
    }
