"""Token generation over a seq2seq export (:mod:`lorafx.export.seq2seq`) on onnxruntime.

The encoder graph runs once on the source; the first-step decoder runs once on
``decoder_start_token_id`` and returns the first logits with the self-attention cache and the
cross-attention cache; then the with-past decoder runs once per new token, fed the chosen token,
its self-attention cache of the step before and the cross-attention cache of the first step. Token
choice and the end-of-sequence rule are :mod:`lorafx.export.decode`'s, so they are transformers'.
The result is what transformers' ``generate`` returns for an encoder-decoder: ``[batch, 1 + new]``
decoder ids, the start token first.
"""

from __future__ import annotations

import numpy as np

from lorafx.export.decode import Sampling, choose_next
from lorafx.export.seq2seq import DEC_IDS, DECODER, ENC_MASK, ENCODER, HIDDEN, MASK, WITH_PAST


class GraphRunner:
    """One graph of the export with its adapter tensors ``fixed`` fed on every run."""

    def __init__(self, session, fixed: dict[str, np.ndarray]):
        self.session, self.fixed = session, fixed
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, {**feed, **self.fixed}), strict=True))


def generate_seq2seq(
    runners: dict[str, GraphRunner],
    info: dict,
    source: dict[str, np.ndarray],
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: list[int] | None,
    pad_token_id: int | None,
) -> np.ndarray:
    """``[batch, 1 + new]`` decoder token ids for the encoder inputs ``source``."""
    hidden = runners[ENCODER](source)[HIDDEN]
    batch = hidden.shape[0]
    mask = {ENC_MASK: source[MASK]} if info["encoder_attention_mask"] else {}
    tokens = [np.full((batch, 1), info["decoder_start_token_id"], np.int64)]
    out = runners[DECODER]({DEC_IDS: tokens[0], HIDDEN: hidden, **mask})
    cross = {past: out[present] for past, present in info["cache"]["cross"]}
    rng = np.random.default_rng(sampling.seed)
    eos = np.array(eos_token_id or [], np.int64)
    unfinished = np.ones(batch, bool)
    for step in range(max_new_tokens):
        nxt = choose_next(sampling, out["logits"][:, -1], rng, eos, unfinished, pad_token_id)
        tokens.append(nxt[:, None])
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        past = {past: out[present] for past, present in info["cache"]["self"]}
        out = runners[WITH_PAST]({DEC_IDS: nxt[:, None], **mask, **past, **cross})
    return np.concatenate(tokens, 1)
