"""KV-cache export of encoder-decoder models (T5, BART, Whisper): an encoder graph and two decoder graphs.

``to_onnx(model, ..., kv_cache=True)`` on a model with ``config.is_encoder_decoder`` writes, in the
export directory:

* ``encoder.onnx``: ``input_ids`` + ``attention_mask`` (or Whisper's ``input_features``) ->
  ``encoder_hidden_states [batch, source, hidden]``;
* ``decoder.onnx`` (the first step): ``decoder_input_ids``, ``encoder_hidden_states``,
  ``encoder_attention_mask`` (families whose encoder takes a mask) -> ``logits`` and
  ``present.N.decoder.key/value`` (self-attention) and ``present.N.encoder.key/value``
  (cross-attention keys and values, computed once from the encoder states);
* ``decoder_with_past.onnx`` (every later step): ``decoder_input_ids``, ``encoder_attention_mask``
  and ``past_key_values.N.{decoder,encoder}.{key,value}`` -> ``logits`` and
  ``present.N.decoder.key/value``; the cross-attention cache is fed back unchanged every step.

Why two decoder graphs, as Optimum writes them, rather than one: transformers' cross-attention picks
"project the encoder states" or "read the cache" with a Python flag (``EncoderDecoderCache.is_updated``),
which torch.export fixes at trace time. One graph would need an ONNX ``If`` on the past length
(Optimum's ``decoder_model_merged``), whose two branches each hold every decoder site's adapter
subgraph, or would project the whole encoder output again at every step (2 extra ``[source, hidden]
x [hidden, hidden]`` matmuls per layer per token). The first-step graph is run once per generate.

The traced calls rebuild an ``EncoderDecoderCache`` of two ``DynamicCache`` from the flat tensors,
so the attention code traced is the model's own (as :mod:`lorafx.export.kv_cache` does for decoder
LMs). The with-past graph gives the model zero encoder states of the right shape: with the cache
filled, the cross-attention reads its keys and values from the cache and the states only set the
mask's length; :func:`seq2seq_graphs` checks that eagerly (other states, the same logits) and
refuses a model that reads them anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafx.errors import ExportError
from lorafx.export.inputs import ExampleInputs
from lorafx.export.kv_cache import forward_params

ENCODER, DECODER, WITH_PAST = "encoder", "decoder", "decoder_with_past"
GRAPH_FILES = {ENCODER: "encoder.onnx", DECODER: "decoder.onnx", WITH_PAST: "decoder_with_past.onnx"}
IDS, MASK, FEATURES = "input_ids", "attention_mask", "input_features"
DEC_IDS, HIDDEN, ENC_MASK = "decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"
KINDS = ("key", "value")
EXAMPLE_DECODER_LENGTH = 3  # torch.export fixes axes of size 0 or 1; any length >= 2 keeps them dynamic


def past_name(layer: int, part: str, kind: str) -> str:
    """Graph input of layer ``layer``'s cached ``part`` (``decoder`` = self-, ``encoder`` = cross-attention)."""
    return f"past_key_values.{layer}.{part}.{kind}"


def present_name(layer: int, part: str, kind: str) -> str:
    """Graph output of layer ``layer``'s ``part`` cache after the step."""
    return f"present.{layer}.{part}.{kind}"


def is_seq2seq(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@dataclass(frozen=True)
class Seq2SeqGraph(ExampleInputs):
    """Example inputs of one of the three graphs; :meth:`call` returns its named outputs."""

    graph: str = ENCODER
    layers: int = 0
    source_dynamic: bool = True  # Whisper's source length is fixed by its positional table

    @property
    def file(self) -> str:
        return GRAPH_FILES[self.graph]

    def call(self, model: nn.Module, tensors: tuple[torch.Tensor, ...] | None = None):
        t = dict(zip(self.names, self.tensors if tensors is None else tensors, strict=True))
        if self.graph == ENCODER:
            return {HIDDEN: _encoder(model)(**t).last_hidden_state}
        mask = {MASK: t[ENC_MASK]} if ENC_MASK in t else {}
        if self.graph == DECODER:
            out = model(decoder_input_ids=t[DEC_IDS], encoder_outputs=(t[HIDDEN],), use_cache=True, **mask)
            return _flat(out, self.layers, with_cross=True)
        cross_key = t[past_name(0, ENCODER, "key")]
        hidden = cross_key.new_zeros(cross_key.shape[0], cross_key.shape[2], _hidden_size(model))
        out = _decode_with_past(model, t, self.layers, hidden)
        return _flat(out, self.layers, with_cross=False)

    def dynamic_shapes(self, dynamic: bool, fed_batched: list[bool], overrides: dict | None = None) -> tuple:
        if not dynamic:
            raise ExportError(
                "kv_cache=True on an encoder-decoder model needs dynamic axes (batch, source, decoder and past "
                "lengths): drop dynamic=False"
            )
        if overrides:
            raise ExportError(
                f"kv_cache=True fixes the seq2seq graphs' axes itself; drop dynamic_shapes= (given for {sorted(overrides)})"
            )
        names = ("batch_size", "encoder_sequence_length", "decoder_sequence_length", "past_decoder_sequence_length")
        batch, source, dec, past = (torch.export.Dim(n) for n in names)
        src = {1: source} if self.source_dynamic else {}
        by_name = {
            IDS: {0: batch, 1: source},
            MASK: {0: batch, 1: source},
            FEATURES: {0: batch},
            DEC_IDS: {0: batch, 1: dec},
            HIDDEN: {0: batch, **src},
            ENC_MASK: {0: batch, 1: source},
        }
        specs = [by_name.get(n) or {0: batch, 2: past if ".decoder." in n else source} for n in self.names]
        if not self.source_dynamic:
            specs = [{0: batch} if ".encoder." in n else s for n, s in zip(self.names, specs, strict=True)]
        return (*specs, *({0: batch} if b else None for b in fed_batched))


def decoder_start(model: nn.Module) -> int:
    """The first decoder token, as transformers' ``generate`` picks it: ``generation_config``'s
    ``decoder_start_token_id``, else its ``bos_token_id``; neither is an error, as in ``generate``."""
    gen = getattr(model, "generation_config", None)
    for key in ("decoder_start_token_id", "bos_token_id"):
        value = getattr(gen, key, None)
        if value is not None:
            if not isinstance(value, int):
                raise ExportError(f"kv_cache=True: generation_config.{key} must be one token id, got {value!r}")
            return value
    raise ExportError(
        f"kv_cache=True: {type(model).__name__}.generation_config has no decoder_start_token_id or bos_token_id, "
        "so the decoder has no first token (transformers' generate refuses too); set one"
    )


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "d_model", None) or cfg.hidden_size


def _decode_with_past(model: nn.Module, t: dict[str, torch.Tensor], layers: int, hidden: torch.Tensor):
    """One decoder step of ``model`` on the flat past tensors in ``t``, as an ``EncoderDecoderCache``."""
    from transformers import DynamicCache, EncoderDecoderCache

    caches = [
        DynamicCache(ddp_cache_data=[tuple(t[past_name(i, part, k)] for k in KINDS) for i in range(layers)])
        for part in (DECODER, ENCODER)
    ]
    mask = {MASK: t[ENC_MASK]} if ENC_MASK in t else {}
    cache = EncoderDecoderCache(*caches)
    return model(decoder_input_ids=t[DEC_IDS], encoder_outputs=(hidden,), past_key_values=cache, use_cache=True, **mask)


def _encoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_encoder", None)
    if get is None:
        raise ExportError(f"kv_cache=True: {type(model).__name__} has no get_encoder(); it cannot be split in graphs")
    return get()


def _flat(out, layers: int, with_cross: bool) -> dict[str, torch.Tensor]:
    cache = out.past_key_values
    parts = [(DECODER, cache.self_attention_cache)] + ([(ENCODER, cache.cross_attention_cache)] if with_cross else [])
    flat = {"logits": out.logits}
    for part, c in parts:
        for i, layer in enumerate(c.layers[:layers]):
            flat[present_name(i, part, "key")] = layer.keys
            flat[present_name(i, part, "value")] = layer.values
    return flat


@torch.no_grad()
def seq2seq_graphs(model: nn.Module, example_inputs) -> list[Seq2SeqGraph]:
    """The example inputs of the encoder, first-step decoder and with-past decoder graphs of ``model``.

    ``example_inputs``: ``input_ids`` ``[batch, source]`` (a tensor, or a dict with ``input_ids`` and
    optionally ``attention_mask``), or a dict with Whisper's ``input_features``; batch and source >= 2.
    """
    given = example_inputs.feed() if isinstance(example_inputs, ExampleInputs) else example_inputs
    if isinstance(given, torch.Tensor):
        given = {IDS: given}
    if not isinstance(given, dict) or not ({IDS, FEATURES} & set(given)):
        raise ExportError("kv_cache=True on an encoder-decoder model takes input_ids (or input_features for Whisper)")
    extra = sorted(set(given) - {IDS, MASK, FEATURES})
    if extra:
        raise ExportError(
            f"kv_cache=True builds the decoder graphs' inputs itself (from the decoder start token); drop {extra}"
        )
    enc = _encoder_inputs(given)
    batch = enc[0][1].shape[0]
    names, tensors = zip(*enc, strict=True)
    encoder = _encoder(model)
    takes = forward_params(encoder)
    if takes and names[0] not in takes:
        raise ExportError(
            f"kv_cache=True: {type(model).__name__}'s encoder takes {sorted(takes & {IDS, FEATURES})}, not {names[0]}"
        )
    hidden = encoder(**dict(enc)).last_hidden_state
    source_dynamic = FEATURES not in names
    dec = torch.full((batch, EXAMPLE_DECODER_LENGTH), decoder_start(model), dtype=torch.long)
    enc_mask = dict(enc).get(MASK)
    mask = [(ENC_MASK, enc_mask)] if enc_mask is not None else []
    first_in = [(DEC_IDS, dec), (HIDDEN, hidden), *mask]
    out = model(decoder_input_ids=dec, encoder_outputs=(hidden,), use_cache=True, **({MASK: enc_mask} if mask else {}))
    layers = _check_cache(model, out.past_key_values, dec.shape[1], hidden.shape[1])
    past = [
        (past_name(i, part, k), getattr(c.layers[i], f"{k}s").contiguous())
        for i in range(layers)
        for part, c in (
            (DECODER, out.past_key_values.self_attention_cache),
            (ENCODER, out.past_key_values.cross_attention_cache),
        )
        for k in KINDS
    ]
    graphs = [
        Seq2SeqGraph(names, tensors, True, ENCODER, layers, source_dynamic),
        Seq2SeqGraph(*_split(first_in), True, DECODER, layers, source_dynamic),
        Seq2SeqGraph(*_split([(DEC_IDS, dec), *mask, *past]), True, WITH_PAST, layers, source_dynamic),
    ]
    _check_states_unread(model, graphs[2], hidden)
    return graphs


def _encoder_inputs(given: dict) -> list[tuple[str, torch.Tensor]]:
    if FEATURES in given:
        x = given[FEATURES]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 or x.shape[0] < 2:
            raise ExportError(f"kv_cache=True: input_features must be float [batch >= 2, mels, frames], got {_desc(x)}")
        return [(FEATURES, x)]
    ids = given[IDS]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or min(ids.shape) < 2:
        raise ExportError(
            f"kv_cache=True: input_ids must be integer [batch, source] with batch and source >= 2 (torch.export "
            f"fixes axes of size 0 or 1), got {_desc(ids)}"
        )
    return [(IDS, ids), (MASK, given.get(MASK, torch.ones_like(ids)))]


def _desc(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _split(pairs):
    return tuple(n for n, _ in pairs), tuple(t for _, t in pairs)


def _check_cache(model: nn.Module, cache, dec_len: int, source: int) -> int:
    """Number of layers of an ``EncoderDecoderCache`` of full-length key/value tensors; refuse others."""
    self_c, cross_c = getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None)
    if self_c is None or cross_c is None:
        raise ExportError(
            f"kv_cache=True: {type(model).__name__} returned a cache of type {type(cache).__name__}; only "
            "transformers' EncoderDecoderCache (self- and cross-attention DynamicCache) is exported"
        )
    for part, c, length in ((DECODER, self_c, dec_len), (ENCODER, cross_c, source)):
        bad = [
            i
            for i, la in enumerate(c.layers)
            if getattr(la, "keys", None) is None or la.keys.dim() != 4 or la.keys.shape[2] != length
        ]
        if bad or not c.layers:
            raise ExportError(
                f"kv_cache=True: {part} cache layers {bad} of {type(model).__name__} are not [batch, heads, length, "
                "head_dim] over every position (sliding-window layers are not exported)"
            )
    return len(self_c.layers)


def _check_states_unread(model: nn.Module, with_past: Seq2SeqGraph, hidden: torch.Tensor) -> None:
    """The with-past graph feeds zero encoder states (see the module docstring): refuse a model whose
    logits change when they do."""
    zeros = with_past.call(model)["logits"]
    real = _decode_with_past(model, with_past.feed(), with_past.layers, hidden).logits
    if not torch.equal(zeros, real):
        raise ExportError(
            f"kv_cache=True: {type(model).__name__}'s decoder reads the encoder states beyond its cross-attention "
            "cache (other states gave other logits with the same cache), so it cannot be split into decoder graphs"
        )


def seq2seq_manifest(base: dict, model: nn.Module, graphs: list[Seq2SeqGraph], written: list[dict]) -> dict:
    """The manifest of a seq2seq export: the mode's entries, ``graphs`` (per graph: file, inputs,
    outputs and the adapter inputs it takes) and ``seq2seq`` (what ``AdapterSession.generate`` needs)."""
    gen = getattr(model, "generation_config", None)
    eos, pad = getattr(gen, "eos_token_id", None), getattr(gen, "pad_token_id", None)
    layers = graphs[0].layers
    parts = ((DECODER, "self"), (ENCODER, "cross"))
    info = {
        "layers": layers,
        "encoder_inputs": list(graphs[0].names),
        "encoder_attention_mask": ENC_MASK in graphs[1].names,
        "cache": {
            kind: [[past_name(i, p, k), present_name(i, p, k)] for i in range(layers) for k in KINDS]
            for p, kind in parts
        },
        "decoder_start_token_id": decoder_start(model),
        "eos_token_id": [eos] if isinstance(eos, int) else eos,
        "pad_token_id": pad,
    }
    kept = {k: v for k, v in base.items() if k not in ("model", "inputs", "outputs")}
    return {
        **kept,
        "graphs": {g.graph: {"file": g.file, **w} for g, w in zip(graphs, written, strict=True)},
        "seq2seq": info,
    }
