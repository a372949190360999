"""Who uses a weight: sharing found by tensor identity, and the explicit way out (:func:`untie`).

A site is a use of a weight. Two modules can hold one tensor (``b.weight = a.weight``; transformers'
tied ``lm_head``/``embed_tokens``; two Parameters viewing one storage), so adapting one module's call
would change what every other user computes the moment the adapter is merged. The plan asks
:func:`weight_users` for every selected site and either adapts every use with one adapter or refuses
(:mod:`lorafx.plan`); :func:`untie` gives a site its own copy when the user means to adapt one use.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lorafx.errors import SpecError


def _storage_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta":  # meta tensors have no storage to compare: identity only
        return ("id", id(t))
    if is_traceable_wrapper_subclass(t):  # torchao's quantized weights: storage of their first inner tensor
        return _storage_key(getattr(t, t.__tensor_flatten__()[0][0]))
    return ("storage", t.device.type, t.device.index, t.untyped_storage().data_ptr())


def weight_users(model: nn.Module) -> dict[tuple, list[str]]:
    """Storage of every parameter -> the ``"<module fqn>.<name>"`` of every holder, in model order
    (a tensor held twice, or two tensors viewing one storage, list every holder)."""
    users: dict[tuple, list[str]] = defaultdict(list)
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            holder = f"{fqn}.{name}" if fqn else name
            if holder not in users[_storage_key(p)]:
                users[_storage_key(p)].append(holder)
    return users


def other_users(model_users: dict[tuple, list[str]], weight: torch.Tensor, holder: str) -> list[str]:
    """The holders of ``weight``'s storage other than ``holder``."""
    return [u for u in model_users.get(_storage_key(weight), []) if u != holder]


@torch.no_grad()
def untie(model: nn.Module, sites: list[str]) -> list[str]:
    """Give each module in ``sites`` (FQNs) its own copy of its weight, so that an adapter at that
    site changes only that use. Returns the FQNs whose weight was shared and is now their own.

    On a transformers model whose output head was tied to the input embeddings, also sets
    ``config.tie_word_embeddings = False``, so that ``save_pretrained``/``from_pretrained`` keep them
    apart. Call it before :func:`lorafx.apply`.

    Example:
        >>> lorafx.untie(model, ["lm_head"])
        >>> model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=8), targets=["lm_head", "q_proj"]))
    """
    users = weight_users(model)
    modules = dict(model.named_modules())
    unknown = [
        s for s in sites if s not in modules or not isinstance(getattr(modules[s], "weight", None), nn.Parameter)
    ]
    if unknown:
        raise SpecError(f"untie: {unknown} name no module with a weight parameter in {type(model).__name__}")
    done = []
    for fqn in sites:
        module = modules[fqn]
        w = module.weight
        if other_users(users, w, f"{fqn}.weight"):
            module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            done.append(fqn)
    config = getattr(model, "config", None)
    if done and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return done
