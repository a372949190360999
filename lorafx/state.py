"""Model-level adapter state: which adapters a model holds, which one is active, and the operations on
them (``set_adapter``, ``set_scale``, ``delete_adapter``, ``step``, ...).

The record is plain (non-Module) data kept on the model root as ``model.__dict__["_lorafx"]``, so it
is not a submodule, not in ``state_dict`` and survives ``.to()``. This module is its only reader and
writer. Per-site state (the adapters themselves, the active slot, merged flags) lives in each
:class:`~lorafx.adapter.SiteAdapters`; model-level shared modules (Uni-LoRA's one vector) live in
``model.lorafx_shared`` under keys built and parsed here only.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from lorafx.adapter import SiteAdapters
from lorafx.errors import SpecError
from lorafx.saved_modules import iter_saved
from lorafx.several import names_of

SHARED = "lorafx_shared"  # root submodule holding model-level shared modules
_KEY = "_lorafx"
_SEP = "__"  # shared key: "<adapter name>__<variant>"; variant names never contain it


@dataclass
class AdapterState:
    """What lorafx knows about a model: adapter name -> Spec (in apply order), the active name, and the
    kernel choice its sites call (``kernels``) with the records that undo it (``kernel_undo``, written
    and read by :func:`lorafx.compiler.use_kernels` only), and ``originals``: region FQN -> the module
    that stood there before lorafx first rewrote it (``""``: the whole model), written by
    :func:`lorafx.apply.commit`, read by :func:`lorafx.unload` (plain references, not submodules, so
    ``state_dict`` is unchanged)."""

    specs: dict = field(default_factory=dict)
    active: str | None = None
    kernels: str = "composite"
    kernel_undo: list = field(default_factory=list)
    originals: dict = field(default_factory=dict)


def find(model: nn.Module) -> AdapterState | None:
    """The state of ``model``, or None when lorafx has not adapted it."""
    return model.__dict__.get(_KEY)


def get(model: nn.Module) -> AdapterState:
    """The state of ``model``; a clear error if lorafx has not adapted it."""
    data = find(model)
    if data is None:
        raise SpecError(f"{type(model).__name__} has no lorafx adapters; call lorafx.apply(model, spec) first")
    return data


def put(model: nn.Module, data: AdapterState | None) -> None:
    """Set (or with None, remove) the state record of ``model``."""
    if data is None:
        model.__dict__.pop(_KEY, None)
    else:
        model.__dict__[_KEY] = data


def require(model: nn.Module, name: str) -> AdapterState:
    """The state of ``model``, after checking that it holds an adapter called ``name``. A tuple (what
    ``active`` holds while several adapters are active) is refused: the caller wants one adapter."""
    data = get(model)
    if isinstance(name, tuple):
        raise SpecError(f"adapters {list(name)} are active together; name the one adapter meant (name=...)")
    if name not in data.specs:
        raise SpecError(f"no adapter named {name!r}; adapters on this model: {sorted(data.specs)}")
    return data


# ---- names and locks ----------------------------------------------------------------------------

_PROBE = nn.ModuleDict()  # adapters live in ModuleDicts keyed by name: a name must not be one of its attributes


def check_name(name: object) -> str:
    """The one rule for adapter names: a Python identifier that is not an attribute of the module
    containers adapters live in (``training``, ``forward``, ``to``, ``cuda``, ``_modules`` ...)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"adapter name must be a Python identifier, got {name!r}")
    if hasattr(_PROBE, name):
        raise SpecError(f"adapter name {name!r} is an attribute of torch.nn.Module; choose another name")
    return name


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The per-model re-entrant lock that every change of adapter state takes (``apply``,
    ``set_adapter``, ``set_scale``, ``delete_adapter``) and that ``using_adapter`` holds for a request."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def locked(fn: Callable) -> Callable:
    """Run ``fn(model, ...)`` holding :func:`model_lock` of ``model``."""

    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs):
        with model_lock(model):
            return fn(model, *args, **kwargs)

    return run


# ---- shared-module keys ---------------------------------------------------------------------------


def shared_key(name: str, variant: str) -> str:
    """Key of adapter ``name``'s shared module of ``variant`` in ``model.lorafx_shared``."""
    return f"{name}{_SEP}{variant}"


def split_shared_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`shared_key`: (adapter name, variant). Split at the last separator, so an
    adapter named ``a__b`` is never mistaken for adapter ``a``."""
    name, _, variant = key.rpartition(_SEP)
    return name, variant


def shared_modules(model: nn.Module, name: str | None = None) -> dict[str, nn.Module]:
    """Shared key -> module on ``model`` (all, or only adapter ``name``'s)."""
    shared = getattr(model, SHARED, None)
    if shared is None:
        return {}
    return {k: m for k, m in shared.items() if name is None or split_shared_key(k)[0] == name}


# ---- sites ---------------------------------------------------------------------------------------


def iter_sites(model: nn.Module) -> dict[str, SiteAdapters]:
    """Site FQN -> :class:`SiteAdapters` for every rewritten site of ``model``."""
    return {m.site: m for m in model.modules() if isinstance(m, SiteAdapters)}


def adapter_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """Every module of adapter ``name``: its per-site adapters, then its shared modules."""
    mods = [sa.adapters[name] for sa in iter_sites(model).values() if name in sa.adapters]
    saved = [s.copies[name] for s in iter_saved(model).values() if name in s.copies]
    return mods + list(shared_modules(model, name).values()) + saved


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block; each one's own flag restored after (submodules
    may differ from the root, e.g. a frozen encoder kept in eval inside a training model)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ---- the user-facing operations ------------------------------------------------------------------


@locked
def set_adapter(model: nn.Module, name: str | None | list[str]) -> None:
    """Make ``name`` the active adapter at every site (sites without it run the base weight only).

    Switching changes no graph and re-traces nothing; ``None`` disables all adapters. Only the
    active adapter's parameters require grad. A list activates several adapters at once, their deltas
    summed (PEFT's ``set_adapter([...])``; see :mod:`lorafx.several`): all of them require grad, and
    :func:`lorafx.merge` folds their sum.
    """
    if isinstance(name, list | tuple):
        names = tuple(dict.fromkeys(name))
        if not names:
            raise SpecError("set_adapter: an empty list of adapter names (None disables all adapters)")
        for n in names:
            require(model, n)
        name = names[0] if len(names) == 1 else names
    data = get(model) if name is None or isinstance(name, tuple) else require(model, name)
    active = set(names_of(name))
    sites = iter_sites(model)
    merged = sorted({sa.merged for sa in sites.values() if sa.merged is not None}, key=str)
    if merged and name != merged[0]:
        raise SpecError(
            f"adapter {merged[0]!r} is merged into the base weights; lorafx.unmerge(model) before switching"
        )
    if isinstance(name, tuple):  # several active adapters sum in the canonical form of linear sites only
        mixed = [
            sa.site
            for sa in sites.values()
            if sa.kind not in ("linear", "router") and len(set(name) & set(sa.adapters)) > 1
        ]
        if mixed:
            raise SpecError(
                f"set_adapter: adapters {list(name)} cannot be active together at sites {mixed[:3]} (conv, embedding, "
                "MultiheadAttention or expert sites take one adapter at a time). Nothing was changed"
            )
    # modules_to_save: one copy runs per saved module, so several active adapters may own at most one
    owner = {}
    for fqn, saved in iter_saved(model).items():
        owners = [n for n in names_of(name) if n in saved.copies]
        if len(owners) > 1:
            raise SpecError(
                f"set_adapter: adapters {owners} each have their own copy of {fqn!r} (modules_to_save) and only "
                "one copy can run; activate them one at a time. Nothing was changed"
            )
        owner[id(saved)] = owners[0] if owners else None
    # One pass over the sites (not one per adapter name): with 120 adapters on a 7-site Llama layer,
    # the per-name walk made a switch cost 0.77 s; this one takes milliseconds.
    for sa in sites.values():
        for other, adapter in sa.adapters.items():
            adapter.requires_grad_(other in active)
        if isinstance(name, tuple):
            sa.active = name
        else:
            sa.active = name if name in sa.adapters else None
    for key, m in shared_modules(model).items():
        m.requires_grad_(split_shared_key(key)[0] in active)
    for saved in iter_saved(model).values():  # modules_to_save: the adapter's own copy runs and trains
        for other, twin in saved.copies.items():
            twin.requires_grad_(other == owner.get(id(saved)))
        saved.active = owner.get(id(saved))
    data.active = name


@locked
def set_scale(model: nn.Module, scale: float, name: str | None = None) -> None:
    """Set the scale ``s`` of adapter ``name`` (default: the active one) at every site, in place.

    The scale is a 0-dim tensor (``Adapter.scale``), so a compiled model does not recompile. Merged
    adapters must be unmerged first (their ΔW is already in the weights).
    """
    name = get(model).active if name is None else name
    require(model, name)
    sites = [sa for sa in iter_sites(model).values() if name in sa.adapters]
    if any(name in names_of(sa.merged) for sa in sites):
        raise SpecError(f"adapter {name!r} is merged; lorafx.unmerge(model) before changing its scale")
    for sa in sites:
        sa.adapters[name].scale = scale


def active_adapter(model: nn.Module) -> str | None | list[str]:
    """Name of the active adapter (None when disabled; a list when several are active)."""
    active = get(model).active
    return list(active) if isinstance(active, tuple) else active


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were applied."""
    return list(get(model).specs)


@locked
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its parameters (the rewritten graphs stay; sites fall back to base)."""
    data = require(model, name)
    sites = iter_sites(model).values()
    if any(name in names_of(sa.merged) for sa in sites):
        raise SpecError(f"adapter {name!r} is merged; lorafx.unmerge(model) before deleting it")
    for sa in sites:
        if name in sa.adapters:
            del sa.adapters[name]
            if sa.active == name:
                sa.active = None
        if isinstance(sa.active, tuple):  # several active: the others stay active
            sa.active = _without(sa.active, name)
    for saved in iter_saved(model).values():
        if name in saved.copies:
            del saved.copies[name]
            saved.active = saved.active
    shared = getattr(model, SHARED, None)
    for key in shared_modules(model, name):
        del shared[key]
    del data.specs[name]
    if data.active == name:
        data.active = None
    elif isinstance(data.active, tuple):
        data.active = _without(data.active, name)


def _without(active: tuple[str, ...], name: str) -> str | tuple[str, ...] | None:
    rest = tuple(n for n in active if n != name)
    return rest if len(rest) > 1 else (rest[0] if rest else None)


def step(model: nn.Module) -> None:
    """Tell stateful adapters that an optimizer step happened (CE-LoRA counts steps, not forwards)."""
    for sa in iter_sites(model).values():
        for adapter in sa.adapters.values():
            adapter.on_step()
