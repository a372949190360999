"""torch.compile for adapted models: ``lorafx.compile`` and ``lorafx.compile_check``.

An adapted model compiles with plain ``torch.compile(model, fullgraph=True)``; nothing lorafx does
breaks the graph. What lorafx adds is that the compiled code does not depend on *which* adapter is
active or on its values, so these never recompile:

* ``lorafx.set_adapter(model, name)`` between adapters of the same variant and shapes: each site's
  ``forward`` reads one slot (the active adapter module, see :class:`lorafx.SiteAdapters`) whose
  parameters Dynamo lifts as graph inputs; it guards the slot's type, not its identity or name.
* ``lorafx.load_adapter`` / copying into adapter parameters: parameters are inputs, guarded on
  shape, dtype and ``requires_grad`` only.
* ``lorafx.set_scale``: the scale is a 0-dim tensor buffer (``Adapter.scale``), not a Python float.

What does recompile, once each: disabling adapters (``set_adapter(model, None)``), merge/unmerge, a
switch to an adapter of another variant or rank at some site, and a new input shape (use
``dynamic=True`` for varying sequence lengths).

:func:`compile` adds two whole-graph passes on top: the sibling shrink fusion
(``lorafx.passes.fuse_shrinks``) and lowering of sites to the ``lorafx::`` op family
(``lorafx.kernels.use_kernels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorafx.errors import SpecError
from lorafx.state import iter_sites


def compile(
    model: nn.Module,
    *,
    kernels: str = "reference",
    fuse_shrinks: bool = False,
    fullgraph: bool = True,
    **kwargs,
):
    """``torch.compile`` an adapted model, optionally with lorafx's kernels and sibling fusion.

    Args:
        model: a model returned by :func:`lorafx.apply`.
        kernels: ``"reference"`` (plain PyTorch composite, inductor fuses it), ``"triton"`` (every
            eligible site calls ``torch.ops.lorafx.lora_linear``; Triton on CUDA) or ``"auto"``
            (``"triton"`` when CUDA and triton are available). Sites are lowered in place.
        fuse_shrinks: concatenate the adapter shrinks (``x Aᵀ``) of sibling sites that read the same
            input (q/k/v, gate/up) into one matmul, in the Dynamo graph before inductor. Acts on
            op-lowered sites, so it needs ``kernels="triton"`` (or ``"auto"`` resolving to it).
        fullgraph: passed to ``torch.compile``; True by default because an adapted model has no
            reason to break the graph.
        **kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ...; ``backend`` is the
            backend after lorafx's passes, default ``"inductor"``).

    Example:
        >>> model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=8), targets="all-linear"))
        >>> compiled = lorafx.compile(model)
        >>> lorafx.set_adapter(model, "other")   # no recompilation
    """
    if not iter_sites(model):
        raise SpecError(f"{type(model).__name__} has no lorafx sites; call lorafx.apply(model, spec) first")
    from lorafx.kernels.lowering import resolve, use_kernels

    chosen = resolve(kernels, model)
    if fuse_shrinks and chosen == "reference":
        raise SpecError(
            f"fuse_shrinks=True fuses lorafx:: op nodes but kernels={kernels!r} resolved to 'reference'; "
            "pass kernels='triton' (on CPU the op runs the reference composite)"
        )
    use_kernels(model, chosen)
    _attach_missing(model)
    backend = kwargs.pop("backend", "inductor")
    if fuse_shrinks:
        from lorafx.passes.fuse_shrinks import fusing_backend

        backend = fusing_backend(backend)
    return torch.compile(model, fullgraph=fullgraph, backend=backend, **kwargs)


def _attach_missing(model: nn.Module) -> None:
    """Give adapters that ``apply`` could not prepare (CE-LoRA applied to an eval-mode or meta model:
    no SVD yet) their base weight now, in eager, so that the compiled training graph never needs it."""
    for sa in iter_sites(model).values():
        for adapter in sa.adapters.values():
            if adapter.needs_attach:
                weight = model.get_submodule(sa.site).weight  # as merge reads it
                adapter.attach(weight.t() if sa.fan_in_fan_out else weight, force=True)


def compile_check(model: nn.Module, example_inputs: Sequence | dict, **compile_kwargs) -> float:
    """Max absolute difference between ``lorafx.compile(model)`` and eager on ``example_inputs``.

    Runs without grad. ``example_inputs`` is a tuple of positional arguments or a dict of keyword
    arguments; a model output with ``.logits`` (transformers) is compared on the logits.
    """
    args, kwargs = (tuple(), dict(example_inputs)) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    compiled = compile(model, **compile_kwargs)
    with torch.no_grad():
        eager = _tensor(model(*args, **kwargs))
        got = _tensor(compiled(*args, **kwargs))
    return float((got.float() - eager.float()).abs().max())


def _tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"compile_check compares tensors or .logits, got {type(out).__name__}")
