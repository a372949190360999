"""Per-row adapters in one PyTorch batch: ``lorafx.using_adapter(model, ["a", "b", None])``.

Row ``i`` of the batch runs with adapter ``names[i]`` (``None``: the base model). While an assignment
is active, every site's slot (what :meth:`lorafx.SiteAdapters.forward` reads) is a :class:`RowSlot`:
its ``lower`` stacks the site's adapters into ``[K, R, d_in]``/``[K, d_out, R]`` and returns a
:class:`~lorafx.canonical.Lowered` with per-token adapter indices (``rows``), which the site
implementations evaluate with ``torch.ops.lorafx.lora_linear_multi`` (segmented: each adapter's
products over its own rows only). The hot path of a model without an assignment is unchanged.

A batch of ``k·n`` rows for ``n`` names (``generate`` with ``num_beams`` or
``num_return_sequences``, which expand rows with ``repeat_interleave``) gives rows ``i·k .. i·k+k-1``
adapter ``names[i]``. The leading dimension of every adapted site's input must be the batch (true of
every transformers model; a ``batch_first=False`` PyTorch encoder is not): a site cannot tell a
sequence-first layout from a batch. A site's stack is every adapter of the site whose eval form is the canonical
form (the mergeable variants), in the site's order, and the assignment is an index tensor updated in
place: changing which rows use which adapters changes tensor values only, so a compiled model does
not recompile.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafx import state
from lorafx.adapter import Adapter, SiteAdapters
from lorafx.canonical import Lowered
from lorafx.errors import SpecError

BASE_NAMES = (None, "__base__")  # PEFT's adapter_names spells the base model "__base__"


class RowSlot:
    """Stands in a site's slot while a per-row assignment is active (see the module docstring).

    ``adapters`` are stacked in order; ``idx`` ``[n]`` is, per batch row of the assignment, the
    position of its adapter in ``adapters`` (-1: base only, or the site lacks that adapter)."""

    def __init__(self, site: str, adapters: list[Adapter], idx: torch.Tensor, used: tuple[int, ...]):
        self.site = site
        self.adapters = adapters
        self.idx = idx
        self.used = used  # positions in ``adapters`` that some row uses (checked in training mode)

    def lower(self, x: torch.Tensor) -> Lowered:
        n = self.idx.shape[0]
        if x.dim() < 2 or x.shape[0] % n:
            raise SpecError(
                f"site {self.site!r}: per-row adapters for {n} rows, but the batch has "
                f"{x.shape[0] if x.dim() > 1 else 1} rows (must be {n} or a multiple of it)"
            )
        if any(a.training for a in self.adapters):
            self._check_training_forms(x)
        A, B, s = self._stacks(x.device)
        tokens = x.numel() // x.shape[-1]  # leading rows are batch-major: rows i·k.. of n·k share names[i]
        return Lowered(x, A, B, s, rows=self.idx.repeat_interleave(tokens // n))

    def _stacks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A [K, R, d_in], B [K, d_out, R], s [K])`` of the site's adapters. Without autograd and
        outside torch.compile the last stacks are reused while every (Aᵉ, Bᵉ, s) the adapters return is
        the same tensor object at the same version (in-place updates bump ``_version``; variants that
        compute Aᵉ afresh never match), so a served model stacks once, not once per forward."""
        weights = [a.effective_weights() for a in self.adapters]  # mergeable: the eval form is (Aᵉ, Bᵉ, s)
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            key = [(t, t._version) if isinstance(t, torch.Tensor) else (t, None) for w in weights for t in w]
            hit = self.__dict__.get("_cache")
            if (
                hit is not None
                and len(hit[0]) == len(key)
                and all(a is b and u == v for (a, u), (b, v) in zip(hit[0], key, strict=True))
            ):
                return hit[1]
        R = max(A.shape[0] for A, _, _ in weights)
        dtype = functools.reduce(torch.promote_types, [A.dtype for A, _, _ in weights])
        # Ranks may differ between adapters (r = 8 beside r = 16, CapaBoost's d·r): zero rows/columns
        # pad the stack to the largest, and add nothing.
        A = torch.stack([F.pad(A.to(dtype), (0, 0, 0, R - A.shape[0])) for A, _, _ in weights])
        B = torch.stack([F.pad(B.to(dtype), (0, R - B.shape[1])) for _, B, _ in weights])
        s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        s = torch.stack([torch.as_tensor(s, dtype=s_dtype, device=device) for _, _, s in weights])
        if cacheable:
            self.__dict__["_cache"] = (key, (A, B, s))
        return A, B, s

    def _check_training_forms(self, x: torch.Tensor) -> None:
        """In training mode an adapter's forward may differ from its eval form (input dropout,
        DropLoRA's rank gate, CE-LoRA's approximated backward): refuse those the rows use."""
        for i in self.used:
            a = self.adapters[i]
            low = a.lower(x)
            if low.gate is not None or low.base is not None or low.h is not None or low.x is not x:
                raise SpecError(
                    f"site {self.site!r}: adapter of variant {a.config.name!r} does not run in its canonical "
                    "eval form in training mode (input dropout, a rank-dropout gate or an approximated "
                    "backward); per-row adapters need model.eval() or those options off"
                )


def check_names(model: nn.Module, names: Sequence) -> list[str | None]:
    """``names`` as a list of adapter names or None, after checking that every name is an adapter of
    ``model`` that can run per row at every site that has it; a :class:`SpecError` otherwise."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise SpecError(f"per-row adapters take a non-empty list of adapter names or None, got {names!r}")
    out = [None if n in BASE_NAMES else n for n in names]
    for name in dict.fromkeys(n for n in out if n is not None):
        state.require(model, name)
        for sa in state.iter_sites(model).values():
            adapter = sa.adapters[name] if name in sa.adapters else None
            if adapter is None:
                continue
            if not adapter.config.mergeable():
                raise SpecError(
                    f"adapter {name!r} (variant {adapter.config.name!r}) cannot run per row: at site {sa.site!r} "
                    "its gate depends on the input, so its eval form is not the canonical form that "
                    "lorafx::lora_linear_multi evaluates; run it alone with lorafx.using_adapter(model, name)"
                )
            if sa.quantized:
                raise SpecError(f"adapter {name!r} cannot run per row at site {sa.site!r}: its base is quantized")
            if sa.kind not in ("linear", "router"):  # conv, embedding, MHA and expert sites have their own evaluators
                raise SpecError(
                    f"adapter {name!r} cannot run per row at site {sa.site!r}: per-row adapters run on linear "
                    f"sites only, {sa.site!r} is a site of kind {sa.kind!r}"
                )
    merged = sorted({sa.merged for sa in state.iter_sites(model).values() if sa.merged is not None})
    if merged:
        raise SpecError(
            f"adapter {merged[0]!r} is merged into the base weights; lorafx.unmerge(model) before per-row adapters"
        )
    return out


def _site_slot(sa: SiteAdapters, names: list[str | None]) -> RowSlot | None:
    """The :class:`RowSlot` of site ``sa`` for ``names``, reused (index updated in place) when the site's
    stack and the row count are unchanged, so compiled graphs see the same objects."""
    adapters = [a for a in sa.adapters.values() if a.config.mergeable()]
    if not adapters:
        return None
    order = {name: i for i, name in enumerate(k for k, a in sa.adapters.items() if a.config.mergeable())}
    idx = torch.tensor([order.get(n, -1) if n is not None else -1 for n in names], dtype=torch.long)
    used = tuple(sorted({i for i in idx.tolist() if i >= 0}))
    slot = sa.__dict__.get("_row_slot")
    if slot is not None and slot.adapters == adapters and slot.idx.shape == idx.shape:
        slot.idx.copy_(idx)
        slot.used = used
        return slot
    device = next(iter(adapters[0].parameters()), torch.empty(0)).device
    slot = RowSlot(sa.site, adapters, idx.to(device), used)
    sa.__dict__["_row_slot"] = slot
    return slot


@contextlib.contextmanager
def per_row(model: nn.Module, names: Sequence) -> Iterator[nn.Module]:
    """Run the block with adapter ``names[i]`` on batch row ``i`` (see the module docstring), holding
    the model's lock. Every site's slot is restored after.

    In training mode (``model.training``) the named adapters, and only they, require grad in the
    block, so each one's gradients come from its own rows; the flags are restored after. In eval mode
    no flag changes: a ``requires_grad`` flip would make a compiled model recompile."""
    import lorafx.kernels.lora_linear_multi  # noqa: F401  (registers the op the sites call for Lowered.rows)

    with state.model_lock(model):
        names = check_names(model, names)
        sites = state.iter_sites(model).values()
        flags = []
        if model.training:
            used = set(names) - {None}
            shared = state.shared_modules(model)
            flags = [(p, p.requires_grad) for sa in sites for a in sa.adapters.values() for p in a.parameters()]
            flags += [(p, p.requires_grad) for m in shared.values() for p in m.parameters()]
            for sa in sites:
                for name, adapter in sa.adapters.items():
                    adapter.requires_grad_(name in used)
            for key, m in shared.items():
                m.requires_grad_(state.split_shared_key(key)[0] in used)
        try:
            for sa in sites:
                sa.__dict__["_slot"] = _site_slot(sa, names)
            yield model
        finally:
            for sa in sites:
                slot = sa.__dict__.get("_row_slot")
                if slot is not None:  # the stacks (and the adapter tensors they key on) go with the block
                    slot.__dict__.pop("_cache", None)
                sa._update_slot()
            for p, flag in flags:
                p.requires_grad_(flag)


# ---- PEFT's adapter_names= keyword ----------------------------------------------------------------
# PeftModel.forward/generate take adapter_names=[...] for a mixed batch. A transformers model's
# forward swallows unknown keywords (**kwargs), so an adapted model would silently ignore it: these
# hooks (installed by lorafx.apply on the root) run that forward under per_row(model, adapter_names).

_OPEN = "_lorafx_adapter_names"  # root.__dict__: the per_row context a pre-hook entered


def adapter_names_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is not None:
        if module.training:  # PEFT's rule too: mixed batches are inference only through this keyword
            raise SpecError("adapter_names= is for inference (model.eval()); to train per row use lorafx.using_adapter")
        ctx = per_row(module, names)
        ctx.__enter__()
        module.__dict__.setdefault(_OPEN, []).append(ctx)
    return args, kwargs


def adapter_names_post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    # always_call: runs when forward raises too. Only a forward whose pre-hook entered a context
    # finds the stack non-empty (forwards of the root do not nest).
    stack = module.__dict__.get(_OPEN)
    if stack:
        stack.pop().__exit__(None, None, None)
    return None


# The root runs both hooks eagerly under torch.compile too (torch.compiler.disable): entering per_row
# is Python state the compiled forward guards on, and Dynamo cannot enter it (fullgraph=True raised
# "Unsupported context manager"); left to Dynamo each hook was also a compiled frame of its own whose
# guards cost ~50 µs per call (0.35% of a compiled decode step of the benchmark Llama). The wrappers are
# built on first use (torch.compiler imports Dynamo and triton, which `import lorafx` must not) and
# carry a module-level name of their own, so that a pickled model finds them again (``__getattr__``).
_EAGER_HOOKS = {
    "eager_adapter_names_pre_hook": adapter_names_pre_hook,
    "eager_adapter_names_post_hook": adapter_names_post_hook,
}
_eager_built: dict[str, object] = {}


def _eager_hook(name: str):
    hook = _eager_built.get(name)
    if hook is None:
        hook = torch.compiler.disable(_EAGER_HOOKS[name])
        hook.__name__ = hook.__qualname__ = name
        _eager_built[name] = hook
    return hook


def __getattr__(name: str):
    if name in _EAGER_HOOKS:
        return _eager_hook(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class GenerateWithAdapterNames:
    """Stands in for ``root.generate`` (an instance attribute over the class's method, as
    :class:`lorafx.apply.RefusedEdit`): ``generate(..., adapter_names=[...])`` runs the class's
    ``generate`` under :func:`per_row` (transformers' own check refuses the unknown keyword before any
    forward sees it). Without the keyword it is the class's ``generate`` unchanged."""

    def __init__(self, root: nn.Module):
        self.root = root

    def __call__(self, *args, **kwargs):
        names = kwargs.pop("adapter_names", None)
        generate = type(self.root).generate
        if names is None:
            return generate(self.root, *args, **kwargs)
        if self.root.training:
            raise SpecError("adapter_names= is for inference (model.eval()); to train per row use lorafx.using_adapter")
        with per_row(self.root, names):
            return generate(self.root, *args, **kwargs)


def install_adapter_names_hooks(root: nn.Module, undo: list) -> None:
    """Make ``root(..., adapter_names=[...])`` and ``root.generate(..., adapter_names=[...])`` run per
    row (once per model; ``undo`` removes both)."""
    pre_hook, post_hook = (_eager_hook(name) for name in _EAGER_HOOKS)
    if any(h in (pre_hook, adapter_names_pre_hook) for h in root._forward_pre_hooks.values()):
        return
    pre = root.register_forward_pre_hook(pre_hook, with_kwargs=True)
    post = root.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    undo.extend([pre.remove, post.remove])
    if callable(getattr(type(root), "generate", None)) and "generate" not in root.__dict__:
        root.__dict__["generate"] = GenerateWithAdapterNames(root)
        undo.append(lambda: root.__dict__.pop("generate", None))


def remove_adapter_names_hooks(root: nn.Module) -> None:
    """Undo :func:`install_adapter_names_hooks` (``lorafx.unload``)."""
    hooks = (root._forward_pre_hooks, root._forward_hooks)
    for store, name in zip(hooks, _EAGER_HOOKS, strict=True):
        fns = (_EAGER_HOOKS[name], _eager_hook(name))  # the plain function: models pickled before the wrappers
        for hid, hook in list(store.items()):
            if hook in fns:
                del store[hid]
                root._forward_hooks_with_kwargs.pop(hid, None)
                root._forward_pre_hooks_with_kwargs.pop(hid, None)
                root._forward_hooks_always_called.pop(hid, None)
    if isinstance(root.__dict__.get("generate"), GenerateWithAdapterNames):
        del root.__dict__["generate"]
    root.__dict__.pop(_OPEN, None)
