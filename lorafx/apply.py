"""``lorafx.apply``: plan, build, then commit — so a failure anywhere leaves the model untouched.

1. **Plan** (:func:`lorafx.plan.plan`): which sites, which configs, which regions. Once.
2. **Build** (:func:`build`): create each selected site's adapter off the model, run the variant's
   model-level ``finalize`` (Uni-LoRA assigns its projection here), and rewrite each region's graph
   into a *new* GraphModule (the ``insert_adapters`` pass) that shares the base weights.
3. **Commit** (:func:`commit`): swap the new regions in, attach adapters, activate, freeze the base,
   recording an undo for every change; if anything fails, the undo list puts the model back.
   :func:`swap_regions` is that mechanism on its own, for passes that run only for a while (export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorafx import moe, rows, site_kinds, state
from lorafx.adapter import Adapter, SiteAdapters
from lorafx.errors import SpecError
from lorafx.passes.insert_adapters import CONTAINER, carry_hooks, insert_adapters, site_key
from lorafx.plan import Plan, output_head, plan
from lorafx.quantized import compute_dtype, needs_own_forward
from lorafx.regions import is_region
from lorafx.saved_modules import SavedModule, frozen_head, iter_saved
from lorafx.spec import Spec


def _build_adapters(p: Plan) -> dict[str, Adapter]:
    adapters = {}
    for fqn, site in p.selected.items():
        if site.tied_to:  # shares the adapter of the weight's first holder
            continue
        r, limit = getattr(site.config, "r", None), min(site.in_features, site.out_features)
        if isinstance(r, int) and r > limit:
            raise SpecError(
                f"site {fqn!r}: rank r={r} is above min(d_in, d_out) = {limit} of its [{site.out_features}, "
                f"{site.in_features}] weight (BA could not have rank r); use r <= {limit} here (e.g. an override)"
            )
        try:
            if site.param:  # an expert tensor: one pair per expert (lorafx.moe)
                adapter = moe.ExpertLoRAAdapter(site.config, site.num_experts, site.in_features, site.out_features, fqn)
            else:
                adapter = site.config.make_adapter(site.in_features, site.out_features, fqn)
        except ValueError as e:
            raise SpecError(f"site {fqn!r}: {e}") from None
        w = site.weight
        # fp32 adapters for half-precision bases; a quantized base's compute dtype, not its storage's
        dtype = compute_dtype(site.module) if site.quantized and not is_region(site.module) else w.dtype
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        # A fresh module is in training mode; follow the site's mode so that adapting an eval() model
        # does not switch on dropout, DropLoRA's rank mask or CE-LoRA's approximate backward.
        adapters[fqn] = adapter.to(device=w.device, dtype=dtype).train(site.module.training)
        if site.kind == site_kinds.EMBEDDING:
            adapter.init_for_embedding()
        if not site.quantized:  # CE-LoRA (the one variant that reads W here) is refused on quantized bases
            adapter.attach(w.t() if site.fan_in_fan_out else w)
    return adapters


def _finalize(adapters: dict[str, Adapter], name: str) -> dict[str, nn.Module]:
    groups = defaultdict(dict)
    for fqn, a in adapters.items():
        groups[type(a.config)][fqn] = a
    shared = {}
    for cls, group in groups.items():
        module = cls.finalize(group, name)
        if module is not None:
            shared[state.shared_key(name, cls.name)] = module
    return shared


@dataclass
class Prepared:
    """A plan, built off the model and ready to commit (see the module docstring)."""

    plan: Plan
    adapters: dict[str, Adapter]  # site FQN -> adapter
    shared: dict[str, nn.Module]  # lorafx_shared key -> module
    new_regions: list[tuple[str, nn.Module]]
    additions: list[tuple[SiteAdapters, Adapter]]
    saved: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # modules_to_save FQN -> this adapter's copy
    new_saved: list[tuple[str, nn.Module]] = dataclasses.field(default_factory=list)  # SavedModules to swap in

    @property
    def model(self) -> nn.Module:
        return self.plan.model

    @property
    def spec(self) -> Spec:
        return self.plan.spec

    @property
    def name(self) -> str:
        return self.plan.name

    def state_modules(self) -> dict[str, nn.Module]:
        """Adapter-file prefix -> module, the layout :mod:`lorafx.adapter_files` saves and loads."""
        # files drop the adapter name from shared keys, so a file loads under any name
        shared = {f"{state.SHARED}.{state.split_shared_key(k)[1]}": m for k, m in self.shared.items()}
        return {**self.adapters, **shared, **self.saved}


def check_name(model: nn.Module, name: str) -> None:
    """An adapter name must pass :func:`lorafx.state.check_name` and not be used on ``model`` yet."""
    state.check_name(name)
    existing = state.find(model)
    if existing is not None and name in existing.specs:
        raise SpecError(f"adapter {name!r} already exists on this model; delete_adapter() it or choose another name")


def build(p: Plan) -> Prepared:
    """Step 2 of :func:`apply`: build the plan's adapters and rewritten regions, off the model."""
    adapters = _build_adapters(p)
    shared = _finalize(adapters, p.name)
    new_regions, additions = [], []
    made = dict(state.iter_sites(p.model))  # leader FQN -> SiteAdapters, for weights with several users
    for region in p.regions:
        have = getattr(region.module, CONTAINER, {}) if region.rewritten else {}
        fresh = {}
        for local in region.sites:
            fqn = f"{region.fqn}.{local}".strip(".") if local else region.fqn
            leader = p.sites[fqn].tied_to or fqn
            key = site_key(local)
            if key in have:
                if leader == fqn:
                    additions.append((have[key], adapters[fqn]))
            elif leader != fqn and leader in made and p.name in made[leader].adapters:
                fresh[local] = made[leader]
            else:
                a, site = adapters[leader], p.sites[fqn]
                sa = SiteAdapters(leader, a.in_features, a.out_features, site.fan_in_fan_out)
                sa.quantized = site.quantized
                sa.kind = site.adapter_kind
                sa.weight_shape = tuple(site.weight.shape) if site.kind == site_kinds.CONV else None
                sa.weight_name = site.weight_name
                if site.kind == site_kinds.MHA:  # lora_mha calls the module itself, on adapted weights
                    sa.set_base(site.module)
                if needs_own_forward(site.module):
                    sa.set_base(site.module)
                    if not local:  # the region is the quantized linear itself: keep bitsandbytes' state keys
                        sa.__dict__["_base_state_key"] = key
                sa.train(a.training)
                sa.adapters[p.name] = a
                fresh[local] = made[leader] = sa
        if fresh:
            gm = insert_adapters(region.graph_module, fresh, region.fqn).graph_module
            carry_hooks(region.module, gm)  # the traced copy has none; the user's module may
            new_regions.append((region.fqn, gm))
    saved, new_saved = _build_saved(p)
    return Prepared(p, adapters, shared, new_regions, additions, saved, new_saved)


def _build_saved(p: Plan) -> tuple[dict[str, nn.Module], list[tuple[str, nn.Module]]]:
    """This adapter's trainable copy of each ``modules_to_save`` module, and the :class:`SavedModule`
    wrappers to swap in where the model has none yet."""
    copies, new = {}, []
    for fqn in p.saved:
        current = p.model.get_submodule(fqn)
        holder = current if isinstance(current, SavedModule) else SavedModule(current, fqn)
        copies[fqn] = holder.add(p.name)
        if holder is not current:
            new.append((fqn, holder))
    head = frozen_head(p.model, p.saved, p.selected)
    if head is not None:
        warnings.warn(
            f"{type(p.model).__name__}.{head} (the classification head, freshly initialised) stays frozen under "
            f"adapter {p.name!r} and will not learn; pass Spec(..., task='seq_cls') or modules_to_save=[{head!r}] "
            "to train and save it (PEFT's SEQ_CLS task does this)",
            stacklevel=3,
        )
    return copies, new


def prepare(model: nn.Module, spec: Spec, name: str = "default") -> Prepared:
    """Steps 1 and 2 of :func:`apply`: plan and build, without touching ``model``."""
    if not isinstance(spec, Spec):
        raise SpecError(f"apply() takes a lorafx.Spec, got {type(spec).__name__}")
    check_name(model, name)
    return build(plan(model, spec, name))


def swap_regions(model: nn.Module, regions: list[tuple[str, nn.Module]], undo: list[Callable]) -> nn.Module:
    """Put each ``(fqn, module)`` at its FQN in ``model`` and append the undo of each swap to ``undo``.

    Returns the root (a new one when a region is the whole model, ``fqn == ""``)."""
    root = model
    for prefix, gm in regions:
        if prefix == "":
            root = gm
            continue
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        undo.append(lambda p=parent, c=child, old=old: setattr(p, c, old))
        setattr(parent, child, gm)
    return root


@contextlib.contextmanager
def swapped(model: nn.Module, regions: list[tuple[str, nn.Module]]) -> Iterator[nn.Module]:
    """:func:`swap_regions` for the duration of a block; the model is restored however it exits."""
    undo: list[Callable] = []
    try:
        yield swap_regions(model, regions, undo)
    finally:
        for fn in reversed(undo):
            fn()


def commit(prep: Prepared, activate: bool = True) -> nn.Module:
    """Step 3 of :func:`apply`: swap the rewritten regions in. Nothing here fails on user input, and
    if anything fails anyway (out of memory, an interrupt, a bug) every change made so far is undone,
    so the model is left exactly as it was."""
    with state.model_lock(prep.model):
        undo = [_restorer(prep.model)]
        try:
            return _commit(prep, activate, undo)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise


def _restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts back what :func:`_commit` may change besides the modules it swaps."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    actives = [(sa, sa.active) for sa in state.iter_sites(model).values()]
    actives += [(s, s.active) for s in iter_saved(model).values()]
    data = state.find(model)
    specs, active = (dict(data.specs), data.active) if data is not None else (None, None)
    shared = getattr(model, state.SHARED, None)
    shared_items = dict(shared) if shared is not None else None

    def restore():
        for p, flag in flags:
            p.requires_grad_(flag)
        for sa, name in actives:
            sa.active = name
        if data is None:
            state.put(model, None)
        else:
            data.specs.clear()
            data.specs.update(specs)
            data.active = active
        if shared_items is None:
            model._modules.pop(state.SHARED, None)
        else:
            shared.clear()
            shared.update(shared_items)

    return restore


def _commit(prep: Prepared, activate: bool, undo: list) -> nn.Module:
    model, name = prep.model, prep.name
    existing = state.find(model)
    data = existing or state.AdapterState()
    _keep_originals(model, prep.new_regions, data, undo)
    root = swap_regions(model, prep.new_regions, undo)
    for sa, adapter in prep.additions:
        undo.append(lambda sa=sa: sa.adapters.pop(name) if name in sa.adapters else None)
        sa.adapters[name] = adapter
    swap_regions(root, prep.new_saved, undo)
    for fqn, twin in prep.saved.items():
        holder = root.get_submodule(fqn)
        undo.append(lambda h=holder: h.copies.pop(name) if name in h.copies else None)
        holder.copies[name] = twin
    state.put(root, data)
    data.specs[name] = prep.spec
    if prep.shared:
        if not hasattr(root, state.SHARED):
            root.add_module(state.SHARED, nn.ModuleDict())
        getattr(root, state.SHARED).update(prep.shared)
    head = output_head(prep.model)
    if head is not None and head in prep.plan.selected and hasattr(root, "resize_token_embeddings"):
        _refuse_resize(root, head, undo)
    if hasattr(root, "save_pretrained"):
        _refuse_save_pretrained(root, undo)
    rows.install_adapter_names_hooks(root, undo)  # PEFT's adapter_names= keyword: per-row, never ignored
    for layer in sorted({s.slow_path for s in prep.plan.selected.values() if s.slow_path is not None}):
        _turn_off_fast_path(root.get_submodule(layer), undo)
    for p in root.parameters():
        p.requires_grad_(False)
    state.set_adapter(root, name if activate or data.active is None else data.active)
    return root


class RefusedEdit:
    """Stands in for a model-editing method that would drop an adapter (an instance attribute, so it
    pickles and is removed by the commit's undo): raises before anything changes."""

    def __init__(self, method: str, message: str):
        self.method, self.message = method, message

    def __call__(self, *args, **kwargs):
        raise SpecError(f"{self.method}: {self.message}")


def _refuse(root: nn.Module, method: str, message: str, undo: list) -> None:
    """Shadow ``root.<method>`` with a :class:`RefusedEdit` (an instance attribute wins over the
    class's method); the commit's undo removes it."""
    root.__dict__[method] = RefusedEdit(method, message)
    undo.append(lambda: root.__dict__.pop(method, None))


def _refuse_resize(root: nn.Module, head: str, undo: list) -> None:
    # transformers' resize_token_embeddings resizes the input embeddings first, then rebuilds the head
    # as a new nn.Linear: on an adapted head it raised a TypeError with the embeddings already resized,
    # and a head it could rebuild would silently drop the adapter.
    message = (
        f"the output head {head!r} carries a lorafx adapter, which resizing would drop; resize before "
        "lorafx.apply (or save_adapter, resize a fresh model, load_adapter)"
    )
    _refuse(root, "resize_token_embeddings", message, undo)


def _keep_originals(model: nn.Module, regions: list[tuple[str, nn.Module]], data: state.AdapterState, undo: list):
    """Record the module each new region replaces, the first time its FQN is rewritten (a region
    rewritten again for a second adapter keeps the very first original): :func:`lorafx.unload`
    puts these back."""
    added = [fqn for fqn, _ in regions if fqn not in data.originals]
    for fqn in added:
        data.originals[fqn] = model.get_submodule(fqn) if fqn else model
    undo.append(lambda: [data.originals.pop(fqn, None) for fqn in added])


SAVE_PRETRAINED_MESSAGE = (
    "this model carries lorafx adapters, which from_pretrained would silently drop (it loads the base "
    "class, and the adapter keys are unexpected); save the adapter with lorafx.save_adapter(model, dir) "
    "(or lorafx.to_peft for plain LoRA), or fold it in with lorafx.merge_and_unload(model) and save that; "
    "under transformers.Trainer use lorafx.integrations.transformers.LorafxTrainer"
)


def _refuse_save_pretrained(root: nn.Module, undo: list) -> None:
    # transformers' save_pretrained writes the whole state_dict, adapters included, under keys the
    # base class does not know: from_pretrained then warns about UNEXPECTED keys and returns the
    # base model. Refusing is the one behaviour that never loses an adapter silently.
    _refuse(root, "save_pretrained", SAVE_PRETRAINED_MESSAGE, undo)


def _slow_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence turns off the eval fast path of
    ``nn.TransformerEncoderLayer``, which reads the adapted linears' weights without calling them."""


def _turn_off_fast_path(layer: nn.Module, undo: list) -> None:
    if any(hook is _slow_path for hook in layer._forward_pre_hooks.values()):
        return
    handle = layer.register_forward_pre_hook(_slow_path)
    undo.append(handle.remove)


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
    with state.model_lock(model):  # a request in flight (using_adapter) finishes before the trace
        return commit(prepare(model, spec, name), activate)
