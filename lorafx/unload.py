"""Take lorafx off a model: :func:`unload` (the base model back), :func:`merge_and_unload` (the base
model with the active adapter folded into its weights), and the trainable-parameter summary.

Un-rewriting puts back, at each rewritten region's FQN, the very module object that stood there
before the first ``lorafx.apply`` (recorded at commit time in the model's state, see
:class:`lorafx.state.AdapterState`): a ``LlamaMLP`` again, an ``nn.Linear`` again, or for a model
traced whole the original model object itself. Those originals share their children, parameters and
buffers with the regions, so merged weights, loaded checkpoints and ``.to()`` moves are already in
them; a tensor a region holds that its original does not share (a buffer ``.to()`` replaced) is
handed back to the original. The result has the base class, the base ``state_dict`` keys and no
lorafx attribute, ready for ``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

from torch import nn

from lorafx import rows, state
from lorafx.apply import RefusedEdit, _slow_path, swap_regions
from lorafx.errors import LorafxError, SpecError
from lorafx.merge import is_merged, merge, merge_dequantized, unmerge
from lorafx.quantized import quantized_kind
from lorafx.regions import is_region
from lorafx.saved_modules import iter_saved

_ADDED = ("resize_token_embeddings", "save_pretrained")  # instance attributes apply() may add


def _tensor_at(module: nn.Module, prefix: str, key: str):
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        return None
    return owner._parameters.get(key, owner._buffers.get(key))


def _adopt_tensors(original: nn.Module, region: nn.Module) -> None:
    """Make ``original`` hold the tensor objects ``region`` holds under the same names."""
    for prefix, m in original.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for key, t in list(store.items()):
                mine = _tensor_at(region, prefix, key)
                if t is not None and mine is not None and mine is not t:
                    store[key] = mine


def _strip(root: nn.Module) -> None:
    """Remove every trace of lorafx from ``root``'s tree: state records, shared modules, the
    instance attributes apply() added and its fast-path-off hooks."""
    for m in root.modules():
        state.put(m, None)
        m._modules.pop(state.SHARED, None)
        for attr in _ADDED:
            if isinstance(m.__dict__.get(attr), RefusedEdit):
                del m.__dict__[attr]
        for hid, hook in list(m._forward_pre_hooks.items()):
            if hook is _slow_path:
                del m._forward_pre_hooks[hid]
        rows.remove_adapter_names_hooks(m)


@state.locked
def _unload(model: nn.Module, keep_saved: bool = False) -> nn.Module:
    data = state.get(model)
    saved = iter_saved(model)
    regions = {fqn: m for fqn, m in model.named_modules() if is_region(m)}
    missing = sorted(f for f in regions if f not in data.originals)
    if missing:
        raise LorafxError(
            f"regions {missing[:4]} have no recorded original module (adapted by an older lorafx?); "
            "save_adapter(), rebuild the base model, and load_adapter() instead"
        )
    for fqn, region in regions.items():
        _adopt_tensors(data.originals[fqn], region)
    root = data.originals.get("", model)
    # outermost first, through the same swap commit uses (nothing to undo: unload is the undo)
    order = sorted((f for f in data.originals if f), key=lambda f: (f.count("."), f))
    swap_regions(root, [(fqn, data.originals[fqn]) for fqn in order], [])
    # modules_to_save: the original back, or (merge_and_unload, as PEFT) the active adapter's trained copy
    chosen = [(f, s.copies[s.active] if keep_saved and s.active in s.copies else s.original) for f, s in saved.items()]
    swap_regions(root, chosen, [])
    for m in (model, root):
        _strip(m)
    return root


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the base model (the original class and module objects).

    A merged adapter is unmerged first, so the weights are the base weights again (up to one
    rounding of the base dtype; see :func:`lorafx.unmerge`). Base parameters stay frozen
    (``requires_grad=False``), as ``apply`` left them. Use the return value: when ``apply`` traced
    the whole model, it is the original model object, not the GraphModule.

    Example:
        >>> base = lorafx.unload(model)  # LlamaForCausalLM again, base state_dict keys
    """
    if is_merged(model):
        unmerge(model)
    return _unload(model)


def merge_and_unload(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Fold the active adapter into the base weights (fp32 accumulate, one rounding, finite checks:
    :func:`lorafx.merge`) and return the plain base model holding the merged weights.

    The result has the base class and the base ``state_dict`` keys, so ``save_pretrained`` and
    ``from_pretrained`` round-trip it. Raises :class:`lorafx.NotMergeableError` (model unchanged) for
    input-dependent variants such as MoR, and for a quantized base unless ``dequantize=True``.

    Args:
        model: an adapted model.
        dequantize: for quantized bases (bitsandbytes, torchao): merge with
            :func:`lorafx.merge_dequantized` and return a model whose adapted quantized linears are
            plain ``nn.Linear`` in their compute dtype holding ``W = dequant(Wq) + ΔW`` (never the
            original high-precision W, which the adapter was not trained against). Their state-dict
            keys are the dense ones (``weight``, ``bias``; bitsandbytes' quant-state keys are gone).

    Example:
        >>> merged = lorafx.merge_and_unload(model)
        >>> merged.save_pretrained("runs/merged")  # an ordinary transformers checkpoint
        >>> dense = lorafx.merge_and_unload(qlora_model, dequantize=True)  # 4-bit base -> dense
    """
    sites = state.iter_sites(model).values()
    if not is_merged(model):  # merged already: it is the active adapter (set_adapter refuses to switch)
        if dequantize and any(sa.quantized for sa in sites):
            merge_dequantized(model)
        else:
            merge(model)
    # bitsandbytes bases: the merged module (dense, or requantized by merge_requantized) stands in the
    # rewritten region only; the original quantized module gets it back at its FQN after the unload.
    bases = {sa.site: sa.base for sa in sites if sa.quantized and sa.base is not None}
    still = sorted(fqn for fqn, m in bases.items() if quantized_kind(m))
    if dequantize and still:
        raise SpecError(
            f"merge_and_unload(dequantize=True): sites {still[:4]} were merged by merge_requantized and hold a "
            "quantized base; call lorafx.unmerge(model) first. The model is unchanged"
        )
    for sa in sites:
        sa.__dict__.pop("_lorafx_original", None)  # merge(keep_original=True)'s copy: not needed any more
        sa.__dict__.pop("_lorafx_quantized_base", None)  # merge_dequantized's undo: unloading ends it
    root = _unload(model, keep_saved=True)
    for fqn, module in bases.items():  # the original module adopted the merged tensors: replace it whole
        parent, _, child = fqn.rpartition(".")
        setattr(root.get_submodule(parent), child, module)
    return root


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model`` (each shared parameter counted once).

    Example:
        >>> trainable, total = lorafx.trainable_parameters(model)
    """
    params = list(model.parameters())  # parameters() yields each tensor once, however often it is shared
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts as PEFT's ``print_trainable_parameters`` does.

    Example:
        >>> lorafx.print_trainable_parameters(model)
        trainable params: 16,384 || all params: 123,200 || trainable%: 13.2987
    """
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
