"""Which axes of each example input are dynamic in the exported graph, and named errors when one cannot be.

Each input gets the axes its role allows, from its name (transformers' argument names):

* token ids and masks (``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``,
  ``inputs_embeds``): ``batch`` + ``seq``;
* decoder inputs (``decoder_input_ids``, ``decoder_attention_mask``, ...): ``batch`` +
  ``decoder_seq``, their own length, so a seq2seq graph runs any encoder and decoder lengths;
* ``encoder_hidden_states`` (cross-attention conditioning, e.g. a diffusers UNet): ``batch`` +
  ``encoder_seq``;
* pixel values, audio features (``input_features``: mel bins x frames, fixed by the model's
  positional table), diffusion latents and anything else named: ``batch`` only;
* unnamed (positional) inputs: ``batch``, plus ``seq`` on integer ``[b, T]`` and float ``[b, T, d]``.

Axis 0 is ``batch`` only where its size equals the first input's batch (a broadcast ``timestep`` of
size 1 stays static). Before this table, axis 1 of every input was one shared ``seq``: image
channels, mel bins and encoder/decoder lengths were tied together and torch.export failed with
guards on ``L['flat'][1].size()[1]``. ``dynamic_shapes=`` overrides the table per input. When
torch.export finds that a dynamic axis cannot be (the model specialises it, or ties it to another),
:func:`named_constraint_errors` re-raises as :class:`~lorafx.errors.ExportError` naming the inputs
and axes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from lorafx.errors import ExportError

_TOKENS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
ROLE_AXES: dict[str, dict[int, str]] = {
    **{n: {0: "batch", 1: "seq"} for n in _TOKENS},
    **{f"decoder_{n}": {0: "batch", 1: "decoder_seq"} for n in _TOKENS},
    "encoder_hidden_states": {0: "batch", 1: "encoder_seq"},
}


def role_axes(name: str, tensor: torch.Tensor, positional: bool, batch: int) -> dict[int, str]:
    """Axis -> dim name for one input, from its role (see the module docstring)."""
    if tensor.dim() == 0:
        return {}
    if name in ROLE_AXES:
        axes = dict(ROLE_AXES[name])
    elif positional and ((tensor.dim() == 2 and not tensor.is_floating_point()) or tensor.dim() == 3):
        axes = {0: "batch", 1: "seq"}
    else:
        axes = {0: "batch"}
    axes = {a: n for a, n in axes.items() if a < tensor.dim()}
    if axes.get(0) == "batch" and tensor.shape[0] != batch and name not in ROLE_AXES:
        del axes[0]  # not batched (e.g. a timestep broadcast over the batch)
    return axes


def dynamic_shapes(
    names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], positional: bool, dynamic: bool, overrides: dict | None
) -> tuple:
    """``torch.export`` dynamic shapes of the example inputs (one entry each, ``None`` = static).

    ``overrides`` maps an input name to ``{axis: dim}`` (``dim`` a name, shared by every axis that
    uses it, or a ``torch.export.Dim``) or to ``None`` (static); it replaces the role table for
    that input."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ExportError(f"dynamic_shapes names {unknown}, which are not inputs (inputs: {list(names)})")
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
    dims: dict[str, torch.export.Dim] = {}
    specs = []
    for name, v in zip(names, tensors, strict=True):
        if name in overrides:
            axes = _checked_override(name, v, overrides[name])
        else:
            axes = role_axes(name, v, positional, batch) if dynamic else {}
        spec = {}
        for a, d in axes.items():
            if v.shape[a] < 2:
                raise ExportError(
                    f"input {name!r} has size {v.shape[a]} on dynamic axis {a} ({_dim_name(d)}): torch.export "
                    "fixes axes of size 0 or 1, so use an example with batch and sequence >= 2 (or "
                    f"dynamic=False, or dynamic_shapes={{{name!r}: {{...}}}} without axis {a})"
                )
            spec[a] = d if not isinstance(d, str) else dims.setdefault(d, torch.export.Dim(d))
        specs.append(spec or None)
    return tuple(specs)


def _dim_name(d) -> str:
    return d if isinstance(d, str) else getattr(d, "__name__", str(d))


def _checked_override(name: str, v: torch.Tensor, axes) -> dict:
    if axes is None:
        return {}
    if not isinstance(axes, dict):
        raise ExportError(
            f"dynamic_shapes[{name!r}] must be a dict {{axis: dim name}} or None, got {type(axes).__name__}"
        )
    for a, d in axes.items():
        if not isinstance(a, int) or not -v.dim() <= a < v.dim():
            raise ExportError(f"dynamic_shapes[{name!r}]: axis {a!r} is not an axis of a {v.dim()}-d input")
        if not isinstance(d, (str, torch.export.Dim)) and type(d).__name__ not in ("Dim", "_Dim", "_DimHint"):
            raise ExportError(f"dynamic_shapes[{name!r}][{a}] must be a dim name (str) or torch.export.Dim, got {d!r}")
    return {a % v.dim(): d for a, d in axes.items()}


_SIZE = re.compile(r"L\['flat'\]\[(\d+)\]\.size\(\)\[(\d+)\]")


@contextlib.contextmanager
def named_constraint_errors(names: list[str], dyn: tuple) -> Iterator[None]:
    """Re-raise torch.export's dynamic-shape errors (``Constraints violated``, a guard on
    ``L['flat'][i].size()[j]``) as an :class:`ExportError` naming each input and axis involved."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:
        text = _full_text(e)
        hits = sorted({(int(i), int(j)) for i, j in _SIZE.findall(text)})
        if not hits and "Constraints violated" not in text:
            raise
        where = [f"input {names[i]!r} axis {j}" + _axis_dim(dyn, i, j) for i, j in hits if i < len(names)]
        reason = _first_reason(text)
        for i, j in hits:
            if i < len(names):
                reason = reason.replace(f"L['flat'][{i}].size()[{j}]", f"{names[i]}.shape[{j}]")
        raise ExportError(
            f"cannot export with these dynamic axes: {', '.join(where) or 'see below'}: {reason}. Make the axis "
            "static or give it the dim it must share with dynamic_shapes={input name: {axis: dim name}}"
        ) from e


def _axis_dim(dyn: tuple, i: int, j: int) -> str:
    spec = dyn[i] if i < len(dyn) else None
    return f" (dim {_dim_name(spec[j])!r})" if spec and j in spec else " (static)"


def _full_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _first_reason(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("-").strip()
        if _SIZE.search(line) or "specialized" in line or "not equal" in line:
            return line[:400]
    return "torch.export rejected the dynamic shapes"


def check_axes_kept(onnx_path, names: list[str], dyn: tuple) -> None:
    """Raise :class:`ExportError` naming each input axis that was asked dynamic but is a fixed size
    in the written graph. ``torch.onnx.export`` falls back to ``draft_export`` when torch.export
    refuses a dynamic axis, and draft_export specialises it to the example's size without an error:
    the graph would then reject (or mis-serve) other sizes while the manifest called them dynamic."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    shapes = {v.name: v.type.tensor_type.shape.dim for v in graph.input}
    fixed = []
    for name, spec in zip(names, dyn, strict=False):
        dims = shapes.get(name)
        for axis, d in (spec or {}).items():
            if dims is not None and axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"input {name!r} axis {axis} (dim {_dim_name(d)!r}) is fixed to {dims[axis].dim_value}")
    if fixed:
        raise ExportError(
            f"the model cannot keep these axes dynamic: {'; '.join(fixed)}. Make them static with "
            "dynamic_shapes={input name: {axis: dim name}} (leave the axis out) or dynamic=False"
        )
