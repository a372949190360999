"""KV-cache decoding, batch 1 and 8: base model vs lorafx (unmerged) vs PEFT, eager and compiled.

Helpers of ``benchmarks/overhead.py --decode``. Eager rows time ``generate`` (greedy, transformers'
dynamic KV cache) per new token; compiled rows time a greedy loop over a ``StaticCache`` whose decode
step is ``torch.compile``d (one graph per contender and batch: the prefill runs eagerly). Contenders
run interleaved in one process (``common.interleaved_medians``); the compiled ones are compiled and
checked against their eager twin before timing.

Step rows (:func:`step_fn`) time one forward of one new token at a fixed past length, the cache put
back after each, round-robin over the contenders: hundreds of samples each, where a ``generate`` row
interleaves only whole calls. On this 2-core machine the ``generate`` ratios of the same code moved by
±4% between runs (eager batch 1: 1.051× and 1.096× in two runs ten minutes apart); step ratios by
±0.6% (medians of 150 steps, six processes).
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


def step_fn(model, step, batch: int, past: int, vocab: int, *, static: int | None = None, seed: int = 0):
    """One decode step of ``batch`` rows at ``past`` cached tokens, repeatable: each call runs ``step``
    (the model or its compiled forward) on one new token and leaves the cache as it found it (a
    ``DynamicCache`` is cropped back; a ``StaticCache``'s position counters are set back, so the step
    rewrites the same position). Putting the cache back is inside the timed call, for every contender alike.
    ``static``: the ``StaticCache`` length (that of :func:`static_decode_fn`'s loop, so that the compiled
    step is the graph that loop compiled), else a ``DynamicCache``."""
    from transformers import StaticCache

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, past), generator=g)
    tok = torch.randint(0, vocab, (batch, 1), generator=g)
    with torch.no_grad():
        if static is not None:
            cache = StaticCache(config=model.config, max_cache_len=static)
            model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(past))
        else:
            cache = model(ids, use_cache=True).past_key_values
    pos = torch.tensor([past])

    def run():
        with torch.no_grad():
            if static is not None:
                out = step(tok, past_key_values=cache, use_cache=True, cache_position=pos)
                for layer in cache.layers:  # a StaticCache writes where its own counter says
                    layer.cumulative_length.fill_(past)
                return out
            out = step(tok, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the token just added (transformers 5 crops by a negative count)
            return out

    return run
