"""Training-loop helpers that need only torch: call :func:`lorafx.step` after every optimizer step
(:func:`attach_step`), and the adapters' runtime state a checkpoint must carry to resume exactly
(:func:`runtime_state` / :func:`load_runtime_state`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from lorafx import state
from lorafx.errors import LorafxError

# What a stateful adapter changes while it trains, besides its parameters (which adapter files hold):
# CE-LoRA's step counter, its pending flag and its selection (the kept channels, the column norms
# gathered since the last choice). Its SVD is not here: it is recomputed from the same base weight.
_ATTRS = ("steps", "pending")
_BUFFERS = ("index", "col_sq")
_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # inner optimizer -> {id(model): handle}


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside ``optimizer``: itself, or what a wrapper holds as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, transformers' and DeepSpeed's wrappers)."""
    seen = 0
    while not hasattr(optimizer, "_optimizer_step_post_hooks"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            raise LorafxError(
                f"attach_step: {type(optimizer).__name__} is not a torch.optim.Optimizer and wraps none "
                "(.optimizer); call lorafx.step(model) after each of its steps yourself"
            )
        optimizer, seen = inner, seen + 1
    return optimizer


def attach_step(optimizer, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Call :func:`lorafx.step` ``(model)`` after every step of ``optimizer``; returns the hook's handle
    (``handle.remove()`` detaches it).

    The hook sits on the innermost ``torch.optim.Optimizer`` (``register_step_post_hook``), so it
    fires exactly when parameters were updated: accelerate's ``AcceleratedOptimizer`` (whose own
    ``register_step_post_hook`` raises AttributeError) skips its inner step on gradient-accumulation
    micro-steps and on fp16 overflow, and then ``step`` is not counted either. Attaching twice to
    one optimizer for one model is a no-op (the first handle is returned).

    Example:
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        >>> handle = lorafx.attach_step(opt, model)  # CE-LoRA now counts every opt.step()
    """
    state.get(model)  # a clear error for a model lorafx has not adapted
    inner = inner_optimizer(optimizer)
    handles = _HANDLES.setdefault(inner, {})
    known = handles.get(id(model))
    if known is not None and known.id in inner._optimizer_step_post_hooks:
        return known

    def hook(opt, args, kwargs) -> None:
        state.step(model)

    handle = inner.register_step_post_hook(hook)
    handles[id(model)] = handle
    return handle


def runtime_state(model: nn.Module) -> dict[str, dict]:
    """Site -> adapter name -> the runtime state of each stateful adapter (see ``_ATTRS``/``_BUFFERS``),
    tensors on CPU. Empty for models whose adapters keep none (LoRA, DoRA-free variants...)."""
    out = {}
    for site, sa in state.iter_sites(model).items():
        for name, adapter in sa.adapters.items():
            attrs = {k: getattr(adapter, k) for k in _ATTRS if hasattr(adapter, k)}
            buffers = {k: getattr(adapter, k).detach().cpu().clone() for k in _BUFFERS if hasattr(adapter, k)}
            if attrs or buffers:
                out.setdefault(site, {})[name] = {"attrs": attrs, "buffers": buffers}
    return out


def load_runtime_state(model: nn.Module, saved: dict[str, dict]) -> None:
    """Put back what :func:`runtime_state` returned (a site or adapter missing on ``model`` is an error)."""
    sites = state.iter_sites(model)
    for site, per_name in saved.items():
        for name, record in per_name.items():
            if site not in sites or name not in sites[site].adapters:
                raise LorafxError(f"runtime state for adapter {name!r} at site {site!r}, which this model lacks")
            adapter = sites[site].adapters[name]
            for k, v in record["attrs"].items():
                setattr(adapter, k, v)
            for k, t in record["buffers"].items():
                old = getattr(adapter, k)
                setattr(adapter, k, t.to(device=old.device, dtype=old.dtype))
