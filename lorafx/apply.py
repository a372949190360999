"""``lorafx.apply``: plan, build, then commit — so a failure anywhere leaves the model untouched.

1. **Plan.** Select linear sites with the spec (``find_sites`` over each traced region), choose the
   regions (``regions.plan_regions``), check every target entry and override matched something.
2. **Build.** Create each site's adapter off the model, run the variant's model-level ``finalize``
   (Uni-LoRA assigns its projection here), and rewrite each region's graph into a *new* GraphModule
   (``passes.insert_adapters``) that shares the base weights.
3. **Commit.** Swap the new regions in, attach adapters, activate, freeze the base. Nothing in this
   step can fail on user input.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from lorafx.adapter import Adapter, SiteAdapters
from lorafx.errors import SpecError
from lorafx.passes.find_sites import is_linear_module
from lorafx.passes.insert_adapters import CONTAINER, insert_adapters, site_key
from lorafx.regions import is_region, plan_regions
from lorafx.spec import Spec

SHARED = "lorafx_shared"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class _Info:
    """Plain (non-Module) bookkeeping kept on the model root as ``model._lorafx``."""

    specs: dict  # adapter name -> Spec
    active: str | None = None


def info(model: nn.Module) -> _Info:
    """The lorafx bookkeeping of ``model``; a clear error if lorafx has not adapted it."""
    data = model.__dict__.get("_lorafx")
    if data is None:
        raise SpecError(f"{type(model).__name__} has no lorafx adapters; call lorafx.apply(model, spec) first")
    return data


def _is_leaf_region(m: nn.Module) -> bool:
    """A single linear that lorafx already rewrote into its own region."""
    container = getattr(m, CONTAINER, None)
    return is_region(m) and isinstance(container, nn.ModuleDict) and "self" in container


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> linear module (``nn.Linear``, Conv1D, or one already rewritten) for every linear, in order."""
    return {fqn: m for fqn, m in model.named_modules() if is_linear_module(m) or _is_leaf_region(m)}


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a linear module as returned by :func:`linear_modules`."""
    if _is_leaf_region(module):
        sa = getattr(module, CONTAINER)["self"]
        return sa.in_features, sa.out_features, sa.fan_in_fan_out
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    d_in, d_out = module.weight.shape  # Conv1D stores [d_in, d_out]
    return int(d_in), int(d_out), True


def output_head(model: nn.Module) -> str | None:
    """FQN of the output head (``get_output_embeddings()``), which ``"all-linear"`` skips as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((fqn for fqn, m in model.named_modules() if m is head), None)


def iter_sites(model: nn.Module) -> dict[str, SiteAdapters]:
    """Site FQN -> :class:`SiteAdapters` for every rewritten site of ``model``."""
    return {m.site: m for m in model.modules() if isinstance(m, SiteAdapters)}


def select_sites(model: nn.Module, spec: Spec) -> dict[str, str]:
    """Site FQN -> the rule that selects it. Raises :class:`SpecError` naming entries that match nothing."""
    linears = linear_modules(model)
    head = output_head(model)
    selected = {}
    for fqn in linears:
        rule = spec.match(fqn, is_output_head=fqn == head)
        if rule is not None:
            selected[fqn] = rule
    names = list(linears)
    if not selected:
        raise SpecError(
            f"spec targets {_describe(spec.targets)} match no linear site of {type(model).__name__}{_closest(spec, names)}"
        )
    unused = spec.unused_patterns(list(selected))
    if unused:
        raise SpecError(f"spec entries {unused} match no selected linear site{_closest(spec, names, unused)}")
    return selected


def _describe(targets) -> str:
    return repr(targets if isinstance(targets, str) else list(targets))


def _closest(spec: Spec, names: list[str], entries: list[str] | None = None) -> str:
    if entries is None:
        entries = [spec.targets] if isinstance(spec.targets, str) else list(spec.targets)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    hints = []
    for entry in entries:
        leaf = entry.rsplit(".", 1)[-1]
        if leaf in leaves:  # e.g. an override for v_proj while targets select q_proj only
            hints.append(f"{entry!r} names linear sites that the targets/exclude do not select")
            continue
        close = difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.5)
        if close:
            hints.append(f"{entry!r} -> did you mean {close}?")
    listed = ", ".join(leaves[:12]) + (" ..." if len(leaves) > 12 else "")
    return f" ({'; '.join(hints) + '; ' if hints else ''}linear names in the model: {listed or 'none'})"


def _build_adapters(model: nn.Module, spec: Spec, selected: dict[str, str], name: str) -> dict[str, Adapter]:
    linears = linear_modules(model)
    adapters = {}
    for fqn in selected:
        lin = linears[fqn]
        d_in, d_out, fan_in_fan_out = linear_shape(lin)
        cfg, _pattern = spec.config_for(fqn)
        try:
            adapter = cfg.make_adapter(d_in, d_out, fqn)
        except ValueError as e:
            raise SpecError(f"site {fqn!r}: {e}") from None
        w = lin.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        # A fresh module is in training mode; follow the site's mode so that adapting an eval() model
        # does not switch on dropout, DropLoRA's rank mask or CE-LoRA's approximate backward.
        adapters[fqn] = adapter.to(device=w.device, dtype=dtype).train(lin.training)
        adapter.attach(w.t() if fan_in_fan_out else w)
    return adapters


def _finalize(adapters: dict[str, Adapter], name: str) -> dict[str, nn.Module]:
    groups = defaultdict(dict)
    for fqn, a in adapters.items():
        groups[type(a.config)][fqn] = a
    shared = {}
    for cls, group in groups.items():
        module = cls.finalize(group, name)
        if module is not None:
            shared[f"{name}__{cls.name}"] = module
    return shared


@dataclass
class Prepared:
    """Everything ``apply`` built off the model, ready to commit (see the module docstring)."""

    model: nn.Module
    spec: Spec
    name: str
    adapters: dict[str, Adapter]  # site FQN -> adapter
    shared: dict[str, nn.Module]  # lorafx_shared key -> module
    new_regions: list[tuple[str, nn.Module]]
    additions: list[tuple[SiteAdapters, Adapter]]

    def state_modules(self) -> dict[str, nn.Module]:
        """Adapter-file prefix -> module, the layout :mod:`lorafx.adapter_files` saves and loads."""
        # shared keys are "<name>__<variant>"; files drop the name so they load under any name
        return {**self.adapters, **{f"{SHARED}.{k.split('__', 1)[1]}": m for k, m in self.shared.items()}}


def prepare(model: nn.Module, spec: Spec, name: str = "default") -> Prepared:
    """Steps 1 and 2 of :func:`apply`: plan and build, without touching ``model``."""
    if not isinstance(spec, Spec):
        raise SpecError(f"apply() takes a lorafx.Spec, got {type(spec).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"adapter name must be a Python identifier, got {name!r}")
    existing = model.__dict__.get("_lorafx")
    if existing is not None and name in existing.specs:
        raise SpecError(f"adapter {name!r} already exists on this model; delete_adapter() it or choose another name")
    selected = select_sites(model, spec)
    regions = plan_regions(model, list(selected))
    adapters = _build_adapters(model, spec, selected, name)
    shared = _finalize(adapters, name)
    new_regions, additions = [], []
    for region in regions:
        prefix = region.fqn
        have = getattr(region.module, CONTAINER, {}) if region.rewritten else {}
        fresh = {}
        for local in region.sites:
            fqn = f"{prefix}.{local}".strip(".") if local else prefix
            key = site_key(local)
            if key in have:
                additions.append((have[key], adapters[fqn]))
            else:
                a = adapters[fqn]
                sa = SiteAdapters(fqn, a.in_features, a.out_features, linear_shape(model.get_submodule(fqn))[2])
                sa.train(a.training)
                sa.adapters[name] = a
                fresh[local] = sa
        if fresh:
            new_regions.append((prefix, insert_adapters(region.graph_module, fresh, prefix).graph_module))
    return Prepared(model, spec, name, adapters, shared, new_regions, additions)


def commit(prep: Prepared, activate: bool = True) -> nn.Module:
    """Step 3 of :func:`apply`: swap the rewritten regions in. Nothing here fails on user input, and
    if anything fails anyway (out of memory, an interrupt, a bug) every change made so far is undone,
    so the model is left exactly as it was."""
    undo = [_restorer(prep.model)]
    try:
        return _commit(prep, activate, undo)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise


def _restorer(model: nn.Module):
    """A function that puts back what :func:`_commit` may change besides the modules it swaps."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    actives = [(sa, sa.active) for sa in iter_sites(model).values()]
    data = model.__dict__.get("_lorafx")
    specs, active = (dict(data.specs), data.active) if data is not None else (None, None)
    shared = getattr(model, SHARED, None)
    shared_items = dict(shared) if shared is not None else None

    def restore():
        for p, flag in flags:
            p.requires_grad_(flag)
        for sa, name in actives:
            sa.active = name
        if data is None:
            model.__dict__.pop("_lorafx", None)
        else:
            data.specs.clear()
            data.specs.update(specs)
            data.active = active
        if shared_items is None:
            model._modules.pop(SHARED, None)
        else:
            shared.clear()
            shared.update(shared_items)

    return restore


def _commit(prep: Prepared, activate: bool, undo: list) -> nn.Module:
    model, name = prep.model, prep.name
    existing = model.__dict__.get("_lorafx")
    root = model
    for prefix, gm in prep.new_regions:
        if prefix == "":
            root = gm
        else:
            parent_name, _, child = prefix.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            undo.append(lambda p=parent, c=child, old=old: setattr(p, c, old))
            setattr(parent, child, gm)
    for sa, adapter in prep.additions:
        undo.append(lambda sa=sa: sa.adapters.pop(name) if name in sa.adapters else None)
        sa.adapters[name] = adapter
    if root is not model and existing is not None:
        root.__dict__["_lorafx"] = existing
    data = root.__dict__.setdefault("_lorafx", existing or _Info(specs={}))
    data.specs[name] = prep.spec
    if prep.shared:
        if not hasattr(root, SHARED):
            root.add_module(SHARED, nn.ModuleDict())
        getattr(root, SHARED).update(prep.shared)
    for p in root.parameters():
        p.requires_grad_(False)
    set_adapter(root, name if activate or data.active is None else data.active)
    return root


def apply(model: nn.Module, spec: Spec, name: str = "default", activate: bool = True) -> nn.Module:
    """Rewrite the linear call sites ``spec`` selects into adapter subgraphs.

    The model is changed in place and returned; when the whole model traces, the returned object is a
    new ``GraphModule`` that shares the input's weights (use the return value). Base weights are
    frozen and shared, never copied; adapter parameters live on the model. On any error the model is
    left exactly as it was.

    Args:
        model: any ``nn.Module`` (plain PyTorch or transformers).
        spec: a :class:`lorafx.Spec`.
        name: adapter name; several named adapters can live on one model (see :func:`set_adapter`).
        activate: make this adapter the active one.

    Example:
        >>> model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=8), targets=["q_proj", "v_proj"]))
    """
    return commit(prepare(model, spec, name), activate)


def _adapter_modules(model: nn.Module, name: str) -> list[nn.Module]:
    mods = [sa.adapters[name] for sa in iter_sites(model).values() if name in sa.adapters]
    shared = getattr(model, SHARED, None)
    if shared is not None:
        mods += [m for k, m in shared.items() if k.split("__")[0] == name]
    return mods


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter at every site (sites without it run the base weight only).

    Switching changes no graph and re-traces nothing; ``None`` disables all adapters. Only the
    active adapter's parameters require grad.
    """
    data = info(model)
    if name is not None and name not in data.specs:
        raise SpecError(f"no adapter named {name!r}; adapters on this model: {sorted(data.specs)}")
    sites = iter_sites(model)
    merged = sorted({sa.merged for sa in sites.values() if sa.merged is not None})
    if merged and name != merged[0]:
        raise SpecError(
            f"adapter {merged[0]!r} is merged into the base weights; lorafx.unmerge(model) before switching"
        )
    # One pass over the sites (not one per adapter name): with 120 adapters on a 7-site Llama layer,
    # the per-name walk made a switch cost 0.77 s; this one takes milliseconds.
    for sa in sites.values():
        for other, adapter in sa.adapters.items():
            adapter.requires_grad_(other == name)
        sa.active = name if name in sa.adapters else None
    shared = getattr(model, SHARED, None)
    if shared is not None:
        for key, m in shared.items():
            m.requires_grad_(key.split("__")[0] == name)
    data.active = name


def set_scale(model: nn.Module, scale: float, name: str | None = None) -> None:
    """Set the scale ``s`` of adapter ``name`` (default: the active one) at every site, in place.

    The scale is a 0-dim tensor (``Adapter.scale``), so a compiled model does not recompile. Merged
    adapters must be unmerged first (their ΔW is already in the weights).
    """
    data = info(model)
    name = data.active if name is None else name
    if name not in data.specs:
        raise SpecError(f"no adapter named {name!r}; adapters on this model: {sorted(data.specs)}")
    sites = [sa for sa in iter_sites(model).values() if name in sa.adapters]
    if any(sa.merged == name for sa in sites):
        raise SpecError(f"adapter {name!r} is merged; lorafx.unmerge(model) before changing its scale")
    for sa in sites:
        sa.adapters[name].scale = scale


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter (None when disabled)."""
    return info(model).active


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were applied."""
    return list(info(model).specs)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its parameters (the rewritten graphs stay; sites fall back to base)."""
    data = info(model)
    if name not in data.specs:
        raise SpecError(f"no adapter named {name!r}; adapters on this model: {sorted(data.specs)}")
    if any(sa.merged == name for sa in iter_sites(model).values()):
        raise SpecError(f"adapter {name!r} is merged; lorafx.unmerge(model) before deleting it")
    for sa in iter_sites(model).values():
        if name in sa.adapters:
            del sa.adapters[name]
            if sa.active == name:
                sa.active = None
    shared = getattr(model, SHARED, None)
    if shared is not None:
        for k in [k for k in shared if k.split("__")[0] == name]:
            del shared[k]
    del data.specs[name]
    if data.active == name:
        data.active = None


def step(model: nn.Module) -> None:
    """Tell stateful adapters that an optimizer step happened (CE-LoRA counts steps, not forwards)."""
    for sa in iter_sites(model).values():
        for adapter in sa.adapters.values():
            adapter.on_step()
