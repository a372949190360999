"""KV-cache export of decoder LMs: one graph for prefill and decode, the cache as flat tensors.

transformers 5.x decoders take and return a ``DynamicCache`` object, which no ONNX runtime can
feed. The exported graph instead takes the cache as flat tensors and returns the grown cache:

* inputs ``input_ids [batch, seq]``, ``attention_mask [batch, total]`` (total = past + seq),
  ``position_ids [batch, seq]`` when the model's ``forward`` takes them, and
  ``past_key_values.N.key`` / ``.value [batch, kv_heads, past, head_dim]`` for every layer N;
* outputs ``logits [batch, seq, vocab]`` and ``present.N.key`` / ``.value`` (past + seq long).

The traced call rebuilds a ``DynamicCache`` from the past tensors (``DynamicCache(ddp_cache_data=)``),
runs the model with it and flattens the cache it returns, so the attention code traced is the
model's own. Past length 0 (prefill) is the same graph fed ``[batch, kv_heads, 0, head_dim]`` tensors:
ONNX ``Concat`` takes empty inputs. The names follow the onnxruntime-genai / Optimum convention.

Position ids are what ``generate`` computes (``cumsum(mask) - 1``, 0 on padding; then the last + 1
per step), so a left-padded batch decodes as it does in transformers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from lorafx.errors import ExportError
from lorafx.export.inputs import ExampleInputs

IDS, MASK, POS = "input_ids", "attention_mask", "position_ids"
DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


def past_name(layer: int, kind: str) -> str:
    """Graph input of layer ``layer``'s past keys (``kind="key"``) or values."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Graph output of layer ``layer``'s grown keys or values."""
    return f"present.{layer}.{kind}"


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left-)padded batch, as ``transformers`` ``generate`` makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@dataclass(frozen=True)
class KVCacheInputs(ExampleInputs):
    """Example inputs of a KV-cache export: ids, mask, (positions,) then every layer's past key/value.

    :meth:`call` runs the model with a ``DynamicCache`` built from the past tensors and returns
    ``{"logits", "present.N.key", "present.N.value", ...}``."""

    layers: int = 0
    kv_shapes: tuple = ()  # per layer: (kv_heads, key head_dim, value head_dim)

    def call(self, model: nn.Module, tensors: tuple[torch.Tensor, ...] | None = None):
        from transformers import DynamicCache

        t = dict(zip(self.names, self.tensors if tensors is None else tensors, strict=True))
        past = [(t[past_name(i, "key")], t[past_name(i, "value")]) for i in range(self.layers)]
        kw = {k: t[k] for k in (IDS, MASK, POS) if k in t}
        out = model(**kw, past_key_values=DynamicCache(ddp_cache_data=past), use_cache=True)
        flat = {"logits": out.logits}
        for i, layer in enumerate(out.past_key_values.layers):
            flat[present_name(i, "key")], flat[present_name(i, "value")] = layer.keys, layer.values
        return flat

    def dynamic_shapes(self, dynamic: bool, fed_batched: list[bool], overrides: dict | None = None) -> tuple:
        if not dynamic:
            raise ExportError("kv_cache=True needs dynamic axes (batch, sequence, past length): drop dynamic=False")
        if overrides:  # the KV graph's axes follow its inputs' layout; a user table could only break it
            raise ExportError(
                f"kv_cache=True fixes the graph's axes itself (batch, sequence, past length); drop dynamic_shapes= "
                f"(given for {sorted(overrides)})"
            )
        batch, seq, past, total = (torch.export.Dim(n) for n in DIMS)
        by_name = {IDS: {0: batch, 1: seq}, MASK: {0: batch, 1: total}, POS: {0: batch, 1: seq}}
        specs = [by_name.get(n, {0: batch, 2: past}) for n in self.names]
        return (*specs, *({0: batch} if b else None for b in fed_batched))

    def manifest(self, model: nn.Module) -> dict:
        """The manifest's ``kv_cache`` entry: what :meth:`AdapterSession.generate` needs."""
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        pad = getattr(gen, "pad_token_id", None)
        return {
            "layers": self.layers,
            "past": [[past_name(i, "key"), past_name(i, "value")] for i in range(self.layers)],
            "present": [[present_name(i, "key"), present_name(i, "value")] for i in range(self.layers)],
            "kv_shapes": [list(s) for s in self.kv_shapes],
            "dtype": str(self.tensors[-1].dtype).removeprefix("torch."),
            "position_ids": POS in self.names,
            "eos_token_id": [eos] if isinstance(eos, int) else eos,
            "pad_token_id": pad,
        }


@torch.no_grad()
def kv_cache_inputs(model: nn.Module, example_inputs) -> KVCacheInputs:
    """Example inputs of a KV-cache export of decoder LM ``model`` from its example token ids.

    ``example_inputs``: token ids ``[batch, seq]`` (batch and seq >= 2), alone or as a dict with
    ``input_ids`` and optionally ``attention_mask``. The example past is the model's own cache of
    those ids (so the trace sees real shapes, past length = seq), and the new tokens are the same ids.
    """
    given = example_inputs.feed() if isinstance(example_inputs, ExampleInputs) else example_inputs
    if isinstance(given, torch.Tensor):
        given = {IDS: given}
    if not isinstance(given, dict) or not isinstance(given.get(IDS), torch.Tensor):
        raise ExportError("kv_cache=True takes token ids: a [batch, seq] tensor or a dict with 'input_ids'")
    extra = sorted(set(given) - {IDS, MASK})
    if extra:
        raise ExportError(f"kv_cache=True builds its own inputs from input_ids/attention_mask; got also {extra}")
    ids = given[IDS]
    if ids.dim() != 2 or ids.is_floating_point() or min(ids.shape) < 2:
        raise ExportError(
            f"kv_cache=True: input_ids must be integer [batch, seq] with batch and seq >= 2 (torch.export fixes "
            f"axes of size 0 or 1), got {tuple(ids.shape)} {ids.dtype}"
        )
    mask = given.get(MASK, torch.ones_like(ids))
    params = forward_params(model)
    if "past_key_values" not in params or "use_cache" not in params:
        raise ExportError(
            f"kv_cache=True exports decoder LMs whose forward takes past_key_values and use_cache; "
            f"{type(model).__name__}.forward does not"
        )
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(la, "keys", None) is None for la in layers):
        raise ExportError(
            f"kv_cache=True: {type(model).__name__} returned a cache of type {type(cache).__name__}; "
            "only transformers' DynamicCache of key/value tensors per layer is exported"
        )
    short = [i for i, la in enumerate(layers) if la.keys.dim() != 4 or la.keys.shape[2] != ids.shape[1]]
    if short:
        raise ExportError(
            f"kv_cache=True: layers {short} keep a cache that is not [batch, heads, seq, head_dim] over every token "
            "(sliding-window or linear-attention layers are not exported)"
        )
    full = torch.cat([mask, torch.ones_like(ids)], dim=1)
    names, tensors = [IDS, MASK], [ids, full]
    if POS in params:
        names.append(POS)
        tensors.append(position_ids(full)[:, ids.shape[1] :])
    for i, la in enumerate(layers):
        names += [past_name(i, "key"), past_name(i, "value")]
        tensors += [la.keys.contiguous(), la.values.contiguous()]
    shapes = tuple((la.keys.shape[1], la.keys.shape[3], la.values.shape[3]) for la in layers)
    return KVCacheInputs(tuple(names), tuple(tensors), True, len(layers), shapes)


def forward_params(model: nn.Module) -> set[str]:
    """Names of ``model.forward``'s parameters (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
