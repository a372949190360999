"""Adapter files: ``lorafx_adapter.safetensors`` + ``lorafx_adapter.json`` in one directory.

Tensors are keyed ``<site FQN>.<adapter state key>`` (e.g. ``model.layers.0.mlp.up_proj.lora_A``),
shared state ``lorafx_shared.<variant>.<key>`` (no adapter name, so a file loads under any name). The JSON holds the spec, the adapter name and
a fingerprint of the base model (each adapted site's shape). Loading is strict and transactional:
every key, shape and dtype kind is checked against what the spec builds on this model *before* the
model is touched, and any mismatch is an :class:`AdapterFileError` naming the keys — a partial load
that leaves B at zero is the classic silent bug of this field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorafx import state
from lorafx.apply import Prepared, commit, prepare
from lorafx.errors import AdapterFileError, SpecError
from lorafx.plan import linear_sites
from lorafx.spec import Spec

WEIGHTS = "lorafx_adapter.safetensors"
CONFIG = "lorafx_adapter.json"
FILE_FORMAT_VERSION = 1


def _state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in modules.items():
        for key, t in module.state_dict().items():
            out[f"{prefix}.{key}"] = t
    return out


def _modules_of(model: nn.Module, name: str) -> dict[str, nn.Module]:
    mods = {sa.site: sa.adapters[name] for sa in state.iter_sites(model).values() if name in sa.adapters}
    for key, m in state.shared_modules(model, name).items():
        mods[f"{state.SHARED}.{state.split_shared_key(key)[1]}"] = m
    return mods


def fingerprint(model: nn.Module, sites: list[str]) -> dict[str, list[int]]:
    """Site FQN -> ``[d_out, d_in]`` of the base linear: what an adapter file must fit."""
    linears = linear_sites(model)
    return {fqn: [linears[fqn].out_features, linears[fqn].in_features] for fqn in sites}


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory``; returns the directory.

    Under FSDP2 (``fully_shard``) the adapter parameters are sharded DTensors: call this on *every*
    rank; each gathers the full tensors (a collective) and only rank 0 writes. With DDP or one
    process, call it on one rank as usual.

    Example:
        >>> lorafx.save_adapter(model, "runs/my-adapter")
    """
    from safetensors.torch import save_file

    name = name or state.get(model).active
    data = state.require(model, name)
    modules = _modules_of(model, name)
    tensors = _state(modules)
    sharded = any(hasattr(t, "full_tensor") for t in tensors.values())  # DTensor (FSDP2)
    full = {k: t.full_tensor() if hasattr(t, "full_tensor") else t for k, t in tensors.items()}  # collective
    tensors = {k: t.detach().contiguous().cpu() for k, t in full.items()}
    directory = Path(directory)
    if sharded and torch.distributed.get_rank() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    sites = [k for k in modules if not k.startswith(f"{state.SHARED}.")]
    meta = {
        "format": "lorafx.adapter",
        "format_version": FILE_FORMAT_VERSION,
        "name": name,
        "spec": data.specs[name].to_dict(),
        "base": {"sites": fingerprint(model, sites)},
    }
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def read_adapter_dir(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter directory, with clear errors for missing or broken files."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterFileError(f"{p}: no such file (an adapter directory holds {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "lorafx.adapter":
        raise AdapterFileError(f"{cfg_path}: not a lorafx adapter file (no 'format': 'lorafx.adapter')")
    if meta.get("format_version") != FILE_FORMAT_VERSION:
        raise AdapterFileError(
            f"{cfg_path}: format_version {meta.get('format_version')!r} is not supported (this lorafx reads {FILE_FORMAT_VERSION})"
        )
    return meta, read_safetensors(w_path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file is an :class:`AdapterFileError` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
        raise AdapterFileError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None


def _kind(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() else "complex" if t.is_complex() else str(t.dtype)


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    """Strict comparison of a file's tensors to the model's; one error listing every problem."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    for k in sorted(set(expected) & set(got)):
        e, g = expected[k], got[k]
        if tuple(e.shape) != tuple(g.shape):
            problems.append(f"key {k!r} has shape {list(g.shape)} in the file but {list(e.shape)} in the model")
        elif _kind(e) != _kind(g):
            problems.append(f"key {k!r} has dtype {g.dtype} in the file but {e.dtype} in the model")
    if problems:
        raise AdapterFileError(f"{source} does not fit the model: " + "; ".join(problems))


def _short(keys: list[str], n: int = 8) -> str:
    return repr(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


@torch.no_grad()
def load_prepared(prep: Prepared, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check ``tensors`` strictly against ``prep``'s adapters, then copy them in (model untouched)."""
    modules = prep.state_modules()
    check_state(_state(modules), tensors, source)
    for prefix, module in modules.items():
        sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        own = module.state_dict()
        module.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None, activate: bool = True) -> nn.Module:
    """Apply the adapter saved in ``directory`` to ``model`` and load its weights; returns the model.

    Strict: a file whose keys, shapes or dtypes do not fit what its spec builds on this model is an
    :class:`AdapterFileError` naming them, and the model is left unchanged.
    """
    meta, tensors = read_adapter_dir(directory)
    try:
        spec = Spec.from_dict(meta["spec"])
    except (KeyError, SpecError) as e:
        raise AdapterFileError(f"{Path(directory) / CONFIG}: bad spec ({e})") from None
    name = name or meta.get("name", "default")
    prep = prepare(model, spec, name)
    base = meta.get("base", {}).get("sites", {})
    mine = fingerprint(model, list(prep.adapters))
    diff = sorted(k for k in set(base) | set(mine) if base.get(k) != mine.get(k))
    if diff:
        raise AdapterFileError(
            f"{directory}: adapter was saved for a different base model; sites differ: "
            + ", ".join(f"{k} (file {base.get(k)}, model {mine.get(k)})" for k in diff[:6])
        )
    load_prepared(prep, tensors, str(Path(directory) / WEIGHTS))
    return commit(prep, activate)
