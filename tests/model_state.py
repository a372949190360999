"""A bit-exact fingerprint of everything lorafx may change on a model, for "unchanged on failure" tests.

It covers the full ``state_dict`` as raw bytes (so ``-0.0`` vs ``0.0`` or one ulp counts), the module
tree (names, types, generated fx code of rewritten regions), every parameter's ``requires_grad`` and
identity, train/eval flags, and lorafx's own bookkeeping (adapter names, active adapter, per-site
active/merged).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lorafx import state
from lorafx.adapter import SiteAdapters


def tensor_bytes(t: torch.Tensor) -> tuple:
    t = t.detach().cpu().contiguous().reshape(-1)
    return (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes())


def snapshot(model: nn.Module) -> dict:
    info = state.find(model)
    return {
        "state": {k: tensor_bytes(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(n, type(m).__qualname__, m.training) for n, m in model.named_modules()],
        "code": {n: m.code for n, m in model.named_modules() if isinstance(m, fx.GraphModule)},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "sites": {
            n: (m.active, m.merged, list(m.adapters)) for n, m in model.named_modules() if isinstance(m, SiteAdapters)
        },
        "lorafx": None if info is None else (list(info.specs), info.active),
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    """Compare field by field so a failure says what changed."""
    after = snapshot(model)
    for key in before:
        if key == "state":
            assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
            changed = [k for k in before["state"] if after["state"][k] != before["state"][k]]
            assert not changed, f"tensors changed: {changed[:5]}"
        else:
            assert after[key] == before[key], f"{key} changed"
