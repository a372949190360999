"""Example inputs of an export, normalised once: names, tensors, and how the model takes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafx.errors import ExportError


@dataclass(frozen=True)
class ExampleInputs:
    """The model's example inputs: graph input ``names``, their ``tensors``, and whether the model
    takes them as keyword arguments (a dict was given) or positionally (a tensor or a tuple)."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    as_kwargs: bool

    @staticmethod
    def of(example_inputs) -> ExampleInputs:
        """Normalise a tensor, a tuple/list of tensors or a dict of tensors (keys become names)."""
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, dict):
            names, tensors, kw = tuple(example_inputs), tuple(example_inputs.values()), True
        elif isinstance(example_inputs, (tuple, list)):
            tensors, kw = tuple(example_inputs), False
            names = ("input",) if len(tensors) == 1 else tuple(f"input_{i}" for i in range(len(tensors)))
        else:
            raise ExportError(
                "example_inputs must be a tensor, a tuple of tensors or a dict of tensors, "
                f"got {type(example_inputs).__name__}"
            )
        bad = [k for k, v in zip(names, tensors, strict=True) if not isinstance(v, torch.Tensor)]
        if bad:
            raise ExportError(f"example inputs {bad} are not tensors")
        return ExampleInputs(names, tensors, kw)

    @property
    def batch(self) -> int:
        """Rows in the batch (the first input's leading axis)."""
        return self.tensors[0].shape[0]

    def feed(self) -> dict[str, torch.Tensor]:
        """Input name -> tensor, as onnxruntime takes them."""
        return dict(zip(self.names, self.tensors, strict=True))

    def call(self, model: nn.Module, tensors: tuple[torch.Tensor, ...] | None = None):
        """``model`` on these inputs (or on ``tensors`` in their place), keyword or positional."""
        tensors = self.tensors if tensors is None else tensors
        if self.as_kwargs:
            return model(**dict(zip(self.names, tensors, strict=True)))
        return model(*tensors)

    def dynamic_shapes(self, dynamic: bool, fed_batched: list[bool]) -> tuple:
        """``torch.export`` dynamic shapes: these inputs, then one entry per fed tensor (batch axis 0
        when ``fed_batched`` says so, as multi mode's ``adapter_ids``; the adapter tensors are static)."""
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        specs = []
        for i, v in enumerate(self.tensors):
            dims = {}
            if dynamic and v.dim() >= 1:
                dims[0] = batch
                if v.dim() == 3 or (v.dim() == 2 and not v.is_floating_point()):
                    dims[1] = seq  # token ids / masks [b, T], activations [b, T, d]
                # 4-D and 5-D inputs are pixels / volumes [b, C, *spatial]: C is a conv's fixed channel count
            small = [a for a in dims if v.shape[a] < 2]
            if small:
                raise ExportError(
                    f"example input {i} has size {v.shape[small[0]]} on dynamic axis {small[0]}: torch.export fixes "
                    "axes of size 0 or 1, so use an example with batch and sequence >= 2 (or dynamic=False)"
                )
            specs.append(dims or None)
        specs += [{0: batch} if dynamic and b else None for b in fed_batched]
        return tuple(specs)

    def meta(self, dyn: tuple) -> list[dict]:
        """Manifest entries: name, dtype and shape (dynamic axes by their ``Dim`` name)."""
        out = []
        for k, v, d in zip(self.names, self.tensors, dyn, strict=False):
            d = d or {}
            shape = [d[i].__name__ if i in d else int(s) for i, s in enumerate(v.shape)]
            out.append({"name": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": shape})
        return out


def flatten_output(out) -> tuple[list[str], list[torch.Tensor]]:
    """(names, tensors) of a model output: a tensor, a dict / ``ModelOutput``, or a tuple."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if hasattr(out, "items"):  # dict or transformers ModelOutput
        pairs = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in pairs], [v for _, v in pairs]
    if isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        return [f"output_{i}" for i in range(len(tensors))], tensors
    raise ExportError(f"model output of type {type(out).__name__} has no tensors to export")
