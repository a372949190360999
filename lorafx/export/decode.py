"""Token generation over a KV-cache export (:mod:`lorafx.export.kv_cache`) on onnxruntime.

One graph serves prefill and decode: the first step feeds the prompt with an empty past
(``[batch, kv_heads, 0, head_dim]``), each later step feeds the chosen token, the grown mask, the
next position and the previous step's ``present.N.*`` as ``past_key_values.N.*``.

Two ways to run a step: :class:`NumpyStep` (``session.run`` with numpy arrays, which onnxruntime
reads in place on CPU) and :class:`BoundStep` (I/O binding: the cache one step returns is bound as
the next step's input as the same ``OrtValue``, adapter tensors bound once per generate call; on a
GPU nothing returns to the host but the logits). :meth:`AdapterSession.generate` uses the first on
CPU, where it measured faster, and the second on other devices (numbers in ``AdapterSession._step``).

Sampling follows ``transformers``' order (temperature, then top-k, then top-p) and its end-of-sequence
rule: a finished row gets ``pad_token_id`` from then on, and generation stops when every row finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafx.errors import ExportError
from lorafx.export.kv_cache import IDS, MASK, POS


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``do_sample=False``) or sampled with these warpers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ExportError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ExportError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ExportError(f"top_p must be in (0, 1], got {self.top_p}")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Next token per row from ``logits [batch, vocab]``."""
        if not self.do_sample:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            # keep the smallest head of the sorted distribution whose mass reaches top_p (at least one token)
            drop_sorted = (np.cumsum(sorted_p, -1) - sorted_p) >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            p = np.where(drop, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        u = rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


class BoundStep:
    """One forward of a KV-cache graph through I/O binding; ``fixed`` inputs (adapter tensors as
    ``OrtValue``) are bound once.

    No ``RunOptions`` here: onnxruntime 1.32 ignores the adapters activated by
    ``RunOptions.add_active_adapter`` in ``run_with_iobinding`` (measured: the base model's tokens,
    silently), so adapters are bound as inputs; :class:`NumpyStep` takes onnxruntime adapters."""

    def __init__(self, session, kv: dict, fixed: dict, device: str = "cpu"):
        self.session, self.kv, self.device = session, kv, device
        self.outputs = [o.name for o in session.get_outputs()]
        self.binding = session.io_binding()
        for name, value in fixed.items():
            self.binding.bind_ortvalue_input(name, value)

    def __call__(self, feed: dict[str, np.ndarray], past: dict) -> tuple[np.ndarray, dict]:
        b = self.binding
        for name, arr in feed.items():
            b.bind_cpu_input(name, arr)
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                b.bind_cpu_input(name, value)
            else:
                b.bind_ortvalue_input(name, value)
        b.clear_binding_outputs()
        for name in self.outputs:
            b.bind_output(name, self.device)
        self.session.run_with_iobinding(b)
        out = dict(zip(self.outputs, b.get_outputs(), strict=True))
        logits = out["logits"].numpy()[:, -1]
        present = present_as_past(self.kv, out)
        return logits, present


class NumpyStep:
    """One forward through ``session.run`` with numpy feeds; ``run_options`` may activate onnxruntime
    adapters (``.onnx_adapter`` files) in place of fed adapter tensors."""

    def __init__(self, session, kv: dict, fixed: dict, run_options=None, device: str = "cpu"):
        self.session, self.kv, self.run_options = session, kv, run_options
        self.fixed = {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in fixed.items()}
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, feed: dict[str, np.ndarray], past: dict) -> tuple[np.ndarray, dict]:
        arrays = self.session.run(self.outputs, {**feed, **past, **self.fixed}, self.run_options)
        out = dict(zip(self.outputs, arrays, strict=True))
        present = present_as_past(self.kv, out)
        return out["logits"][:, -1], present


def present_as_past(kv: dict, outputs: dict) -> dict:
    """Next step's past inputs: ``past_key_values.N.*`` -> this step's ``present.N.*``."""
    pairs = zip(sum(kv["past"], []), sum(kv["present"], []), strict=True)
    return {past: outputs[present] for past, present in pairs}


def choose_next(
    sampling: Sampling, logits: np.ndarray, rng, eos: np.ndarray, unfinished: np.ndarray, pad_token_id: int | None
) -> np.ndarray:
    """Next token per row from ``logits [batch, vocab]``; a row that finished earlier gets
    ``pad_token_id`` (``eos[0]`` without one), and ``unfinished`` is updated in place."""
    nxt = sampling.choose(logits, rng).astype(np.int64)
    if eos.size:
        nxt = np.where(unfinished, nxt, pad_token_id if pad_token_id is not None else eos[0])
        unfinished &= ~np.isin(nxt, eos)
    return nxt


def generate_tokens(
    step,
    kv: dict,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: list[int] | None,
    pad_token_id: int | None,
) -> np.ndarray:
    """``[batch, prompt + new]`` token ids: the prompt, then up to ``max_new_tokens`` chosen tokens."""
    batch = input_ids.shape[0]
    dtype = np.dtype(kv["dtype"])
    past = {
        name: np.zeros((batch, shape[0], 0, shape[1 + j]), dtype)
        for names, shape in zip(kv["past"], kv["kv_shapes"], strict=True)
        for j, name in enumerate(names)
    }
    mask = attention_mask.astype(np.int64)
    pos = np.where(mask == 0, 0, mask.cumsum(-1) - 1)
    ids, out = input_ids.astype(np.int64), [input_ids.astype(np.int64)]
    rng = np.random.default_rng(sampling.seed)
    eos = np.array(eos_token_id or [], np.int64)
    unfinished = np.ones(batch, bool)
    for _ in range(max_new_tokens):
        feed = {IDS: ids, MASK: mask}
        if kv["position_ids"]:
            feed[POS] = pos
        logits, past = step(feed, past)
        nxt = choose_next(sampling, logits, rng, eos, unfinished, pad_token_id)
        out.append(nxt[:, None])
        if not unfinished.any():
            break
        ids, mask, pos = nxt[:, None], np.concatenate([mask, np.ones((batch, 1), np.int64)], 1), pos[:, -1:] + 1
    return np.concatenate(out, 1)
