"""Example inputs of an export, normalised once: names, tensors, and how the model takes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafx.errors import ExportError
from lorafx.export.axes import dynamic_shapes


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

    def dynamic_shapes(self, dynamic: bool, fed_batched: list[bool], overrides: dict | None = None) -> tuple:
        """``torch.export`` dynamic shapes: these inputs by role (:mod:`lorafx.export.axes`, ``overrides``
        by input name first), then one entry per fed tensor (batch axis 0 when ``fed_batched`` says
        so, as multi mode's ``adapter_ids``; the adapter tensors are static)."""
        specs = dynamic_shapes(self.names, self.tensors, not self.as_kwargs, dynamic, overrides)
        batch = next((s[0] for s in specs if s and 0 in s and s[0].__name__ == "batch"), None)
        if batch is None and dynamic and any(fed_batched):
            batch = torch.export.Dim("batch")
        return specs + tuple({0: batch} if dynamic and b else None for b in fed_batched)

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


def outputs_apart_from_inputs(outputs: list[str], inputs: tuple[str, ...]) -> list[str]:
    """``outputs`` with each name that is also an input's suffixed ``_output`` (a diffusers UNet takes
    ``sample`` and returns ``sample``; ONNX requires every value name to be unique, and onnxruntime
    refuses the graph with "Duplicate definition of name (sample)")."""
    return [f"{n}_output" if n in inputs else n for n in outputs]
