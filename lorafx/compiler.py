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
* a new per-row assignment (``lorafx.using_adapter(model, [names])`` with as many names as before, in
  eval mode): each site keeps one :class:`lorafx.rows.RowSlot` and only its index tensor's values change.

What does recompile, once each: disabling adapters (``set_adapter(model, None)``), merge/unmerge, a
switch to an adapter of another variant or rank at some site, a new combination of several active
adapters (``set_adapter(model, [names])``), entering or leaving per-row mode, and a new input shape
(use ``dynamic=True`` for varying sequence lengths).

:func:`compile` adds two whole-graph passes on top: the sibling shrink fusion
(``lorafx.passes.fuse_shrinks``) and the kernel choice (:func:`use_kernels`, through the
``lorafx.passes.lower_to_ops`` pass), which swaps lowered copies of the rewritten regions in and
records how to swap the originals back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorafx import state
from lorafx.apply import swap_regions
from lorafx.errors import SpecError
from lorafx.regions import is_region
from lorafx.state import iter_sites


def compile(
    model: nn.Module,
    *,
    kernels: str = "composite",
    fuse_shrinks: bool = False,
    fullgraph: bool = True,
    **kwargs,
):
    """``torch.compile`` an adapted model, optionally with lorafx's kernels and sibling fusion.

    Args:
        model: a model returned by :func:`lorafx.apply`.
        kernels: ``"composite"`` (plain PyTorch canonical evaluator, inductor fuses it), ``"ops"``
            (every eligible site is one ``torch.ops.lorafx.lora_linear`` node: Triton on CUDA, the
            composite on CPU; bitsandbytes 4-bit sites call ``torch.ops.lorafx.lora_linear_4bit``,
            the fused dequant + GEMM + expand kernel, on CUDA) or ``"auto"`` (``"ops"`` when the model is on CUDA and triton is
            installed, else ``"composite"``); ``"reference"`` and ``"triton"`` are aliases of the first
            two. Applied with :func:`use_kernels`: lowered copies of the regions are swapped in, never
            edited in place, and a later ``use_kernels(model, "composite")`` swaps the originals back.
        fuse_shrinks: concatenate the adapter shrinks (``x Aᵀ``) of sibling sites that read the same
            input (q/k/v, gate/up) into one matmul, in the Dynamo graph before inductor. Acts on
            op-lowered sites, so it needs ``kernels="ops"`` (or ``"auto"`` resolving to it).
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
    chosen = resolve(kernels, model)
    if fuse_shrinks and chosen == "composite":
        raise SpecError(
            f"fuse_shrinks=True fuses lorafx:: op nodes but kernels={kernels!r} resolved to 'composite'; "
            "pass kernels='ops' (on CPU the op runs the composite)"
        )
    use_kernels(model, chosen)
    _attach_missing(model)
    backend = kwargs.pop("backend", "inductor")
    if fuse_shrinks:
        from lorafx.passes.fuse_shrinks import fusing_backend

        backend = fusing_backend(backend)
    return torch.compile(model, fullgraph=fullgraph, backend=backend, **kwargs)


def resolve(kernels: str, model: nn.Module) -> str:
    """The kernel choice ``kernels`` stands for on ``model``: ``"composite"`` or ``"ops"``.

    ``"auto"`` is ``"ops"`` when a parameter of ``model`` is on CUDA and the Triton kernels import,
    else ``"composite"``; aliases resolve (``"reference"``, ``"triton"``); unknown names raise.
    """
    from lorafx.passes.lower_to_ops import kernel_name

    if kernels != "auto":
        return kernel_name(kernels)
    from lorafx.kernels import triton_on_cuda

    on_cuda = any(p.is_cuda for p in model.parameters())
    return "ops" if on_cuda and triton_on_cuda() else "composite"


# ---- use_kernels: swap lowered copies in, with records that swap the originals back ---------------
# The records are data, not closures: a deepcopy of the model copies them along with the modules
# they name (a closure would keep pointing at the original model), and they pickle.


@dataclass
class _Swapped:
    """Region ``fqn`` was ``original``; a lowered copy, ``lowered``, stands there now."""

    fqn: str
    original: nn.Module
    lowered: nn.Module


@dataclass
class _Retargeted:
    """The whole-model region (``fqn == ""``) cannot be swapped in place: the object the user holds
    *is* the region. Its site nodes were retargeted in place instead; ``targets`` maps each changed
    node's name to the function it called before."""

    targets: dict[str, Callable]


def use_kernels(model: nn.Module, kernels: str = "auto") -> int:
    """Make every rewritten site of ``model`` call the ``kernels`` implementation (see :func:`compile`).

    Each region whose sites call another implementation is replaced, at its FQN, by a lowered copy
    (:func:`lorafx.passes.lower_to_ops.lower_to_ops`; the copy shares weights and adapters), and a
    record of the swap is kept in the model's state. Choosing another implementation first undoes
    those records, so ``use_kernels(model, "composite")`` after ``"ops"`` puts back the very region
    objects, with the same generated code, that were there before. Numerics are the same either way
    (the op's CPU kernel is the canonical composite); what changes is that each site is one opaque op
    node in compiled graphs. No ``forward`` is ever assigned on a module.

    Returns the number of sites that call the chosen implementation (quantized sites included: with
    ``"ops"`` they call :func:`lorafx.kernels.quantized_site.quantized_op_lora_linear`).
    """
    import lorafx.kernels  # noqa: F401  (registers the "ops" site implementation)
    from lorafx.canonical import QUANTIZED_SITE_IMPLEMENTATIONS, SITE_IMPLEMENTATIONS
    from lorafx.passes.lower_to_ops import lower_to_ops

    data = state.get(model)
    chosen = resolve(kernels, model)
    if chosen != data.kernels:
        _undo(model, data.kernel_undo)
        data.kernel_undo.clear()
        data.kernels = chosen
    target = SITE_IMPLEMENTATIONS[chosen]
    swaps = []
    for fqn, region in [(n, m) for n, m in model.named_modules() if is_region(m)]:
        if fqn == "":
            changed = _retarget_root(region, chosen)
            if changed:
                data.kernel_undo.append(_Retargeted(changed))
            continue
        result = lower_to_ops(region, chosen)
        if result.modified:
            swaps.append((fqn, result.graph_module))
            data.kernel_undo.append(_Swapped(fqn, region, result.graph_module))
    _swap(model, swaps)
    quantized = QUANTIZED_SITE_IMPLEMENTATIONS.get(chosen)
    return sum(n.target in (target, quantized) for m in model.modules() if is_region(m) for n in m.graph.nodes)


def _swap(model: nn.Module, regions: list[tuple[str, nn.Module]]) -> None:
    # the undo is kept as _Swapped records (see above), not as swap_regions' closures
    swap_regions(model, regions, [])


def _retarget_root(gm: nn.Module, implementation: str) -> dict[str, Callable]:
    from lorafx.passes.retarget_sites import site_target

    changed = {}
    for node in gm.graph.nodes:
        new = site_target(node, implementation)
        if new is not None and node.target is not new:
            changed[node.name] = node.target
            node.target = new
    if changed:
        gm.recompile()
    return changed


def _undo(model: nn.Module, records: list) -> None:
    """Undo ``records``, last first. A swap is undone only where its copy still stands (a later
    ``lorafx.apply`` may have replaced the region; its new region is then left as it is)."""
    for rec in reversed(records):
        if isinstance(rec, _Retargeted):
            nodes = {n.name: n for n in model.graph.nodes} if isinstance(model, torch.fx.GraphModule) else {}
            for name, fn in rec.targets.items():
                if name in nodes:
                    nodes[name].target = fn
            if nodes:
                model.recompile()
        elif _at(model, rec.fqn) is rec.lowered:
            _swap(model, [(rec.fqn, rec.original)])


def _at(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def _attach_missing(model: nn.Module) -> None:
    """Give adapters that ``apply`` could not prepare (CE-LoRA applied to an eval-mode or meta model:
    no SVD yet) their base weight now, in eager, so that the compiled training graph never needs it."""
    for sa in iter_sites(model).values():
        for adapter in sa.adapters.values():
            if adapter.needs_attach:
                weight = sa.weight_in(model)  # as merge reads it
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
