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
import math
import struct
import uuid
from pathlib import Path

import torch
from torch import nn

from lorafx import state
from lorafx.adapter import Adapter
from lorafx.apply import Prepared, commit, prepare
from lorafx.errors import AdapterFileError
from lorafx.files import read_consistent, read_json_object, resolve_dir, write_together
from lorafx.plan import linear_sites
from lorafx.saved_modules import iter_saved
from lorafx.spec import Spec

WEIGHTS = "lorafx_adapter.safetensors"
CONFIG = "lorafx_adapter.json"
FILE_FORMAT_VERSION = 2  # 2: save ids in both files; each site's scale (set_scale) saved
READABLE_VERSIONS = (1, 2)
SAVE_ID = "lorafx_save_id"  # safetensors metadata key


SCALE_KEY = "scale_t"  # Adapter.scale's buffer: files keep scales in the JSON ("scales"), readable


def _state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in modules.items():
        for key, t in module.state_dict().items():
            if key != SCALE_KEY:
                out[f"{prefix}.{key}"] = t
    return out


def _modules_of(model: nn.Module, name: str) -> dict[str, nn.Module]:
    mods = {sa.site: sa.adapters[name] for sa in state.iter_sites(model).values() if name in sa.adapters}
    for key, m in state.shared_modules(model, name).items():
        mods[f"{state.SHARED}.{state.split_shared_key(key)[1]}"] = m
    for fqn, saved in iter_saved(model).items():  # modules_to_save: the copy under the module's FQN
        if name in saved.copies:
            mods[fqn] = saved.copies[name]
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
    if sharded and torch.distributed.get_rank() != 0:
        return Path(directory).expanduser()
    directory = resolve_dir(directory, AdapterFileError, create=True)
    sites = [k for k, m in modules.items() if isinstance(m, Adapter)]  # not shared state nor modules_to_save
    save_id = uuid.uuid4().hex  # in both files: a reader can tell whether they come from one save
    meta = {
        "format": "lorafx.adapter",
        "format_version": FILE_FORMAT_VERSION,
        "name": name,
        "save_id": save_id,
        "spec": data.specs[name].to_dict(),
        "base": {"sites": fingerprint(model, sites)},
        "scales": {k: m._scale_value for k, m in modules.items() if isinstance(m, Adapter)},
    }
    write_together(
        directory,
        {
            WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt", SAVE_ID: save_id}),
            CONFIG: lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
        },
        AdapterFileError,
        last=CONFIG,
    )
    return directory


def read_adapter_dir(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter directory, with clear errors for missing or broken files.

    Both files are read whole, once each; when both carry a save id (every file lorafx >= 0.2
    writes) and the ids differ, the pair is read again (a concurrent save may be between its two
    renames) and then refused: the JSON would describe other tensors than the file holds."""
    directory = Path(directory).expanduser()
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if p.is_dir():
            raise AdapterFileError(f"{p}: is a directory, not a file")
        if not p.is_file():
            raise AdapterFileError(f"{p}: no such file (an adapter directory holds {CONFIG} and {WEIGHTS})")

    def read() -> tuple[dict, dict[str, torch.Tensor], dict]:
        meta = _read_json(cfg_path)
        tensors, file_meta = read_safetensors_with_metadata(w_path)
        return meta, tensors, file_meta

    def consistent(result) -> bool:
        meta, _, file_meta = result
        return SAVE_ID not in file_meta or meta.get("save_id") == file_meta[SAVE_ID]

    meta, tensors, file_meta = read_consistent(read, consistent)
    if not consistent((meta, tensors, file_meta)):
        raise AdapterFileError(
            f"{cfg_path} and {w_path} do not belong together (save ids {meta.get('save_id')!r} and "
            f"{file_meta[SAVE_ID]!r}): they come from two different saves; save the adapter again"
        )
    return meta, tensors


def _read_json(path: Path) -> dict:
    meta = read_json_object(path, AdapterFileError)
    if meta.get("format") != "lorafx.adapter":
        raise AdapterFileError(f"{path}: not a lorafx adapter file (no 'format': 'lorafx.adapter')")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise AdapterFileError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (this lorafx reads {FILE_FORMAT_VERSION})"
        )
    return meta


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file is an :class:`AdapterFileError` naming it."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the header's ``__metadata__``) of a safetensors file, read from disk once."""
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        tensors = load(data)
        (size,) = struct.unpack("<Q", data[:8])  # the format: u64 header length, then a JSON header
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
        raise AdapterFileError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return tensors, metadata


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


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf in floating tensors: a diverged run's adapter would load and merge silently."""
    bad = {}
    for k, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[k] = n
    if bad:
        listed = ", ".join(f"{k!r} ({n} of {tensors[k].numel()})" for k, n in list(bad.items())[:6])
        raise AdapterFileError(
            f"{source}: non-finite values (NaN/Inf) in {listed}{' ...' if len(bad) > 6 else ''}; "
            "pass allow_nonfinite=True to load them anyway (for inspection)"
        )


@torch.no_grad()
def load_prepared(
    prep: Prepared,
    tensors: dict[str, torch.Tensor],
    source: str,
    allow_nonfinite: bool = False,
    scales: dict[str, float] | None = None,
) -> None:
    """Check ``tensors`` strictly against ``prep``'s adapters, then copy them in (model untouched).

    ``scales`` (site -> scale, from the file's JSON) replaces each site's configured scale; files
    without it (lorafx format 1, PEFT) keep the scales the spec defines."""
    load_modules(prep.state_modules(), tensors, source, allow_nonfinite, scales)


def load_modules(
    modules: dict[str, nn.Module],
    tensors: dict[str, torch.Tensor],
    source: str,
    allow_nonfinite: bool = False,
    scales: dict[str, float] | None = None,
) -> None:
    """:func:`load_prepared` for modules given as file prefix -> module (the layout of
    :func:`save_adapter`): check strictly, then copy in."""
    check_state(_state(modules), tensors, source)
    adapters = {k: m for k, m in modules.items() if isinstance(m, Adapter)}
    if scales is not None:
        _check_scales(scales, adapters, source)
    if not allow_nonfinite:
        check_finite(tensors, source)
    for prefix, module in modules.items():
        sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        own = module.state_dict()
        module.load_state_dict({k: sd[k].to(own[k].dtype) if k in sd else v for k, v in own.items()}, strict=True)
    for prefix, value in (scales or {}).items():
        adapters[prefix].scale = value


def _check_scales(scales: object, adapters: dict[str, Adapter], source: str) -> None:
    if not isinstance(scales, dict) or set(scales) != set(adapters):
        keys = sorted(scales) if isinstance(scales, dict) else scales
        raise AdapterFileError(
            f"{source}: 'scales' must map every site {sorted(adapters)[:4]} ... to a number, got {keys!r}"
        )
    bad = {
        k: v
        for k, v in scales.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    }
    if bad:
        raise AdapterFileError(f"{source}: 'scales' must be finite numbers, got {bad!r}")


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    activate: bool = True,
    *,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Apply the adapter saved in ``directory`` to ``model`` and load its weights; returns the model.

    Strict: a file whose keys, shapes or dtypes do not fit what its spec builds on this model, or that
    holds NaN/Inf (unless ``allow_nonfinite``), is an :class:`AdapterFileError` naming them, and the
    model is left unchanged.
    """
    meta, tensors = read_adapter_dir(directory)
    try:
        spec = Spec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError) as e:  # SpecError is a ValueError; config fields raise both
        raise AdapterFileError(f"{Path(directory).expanduser() / CONFIG}: bad spec ({e})") from None
    with state.model_lock(model):  # see lorafx.regions: traces and requests in flight
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
        source = str(Path(directory).expanduser() / WEIGHTS)
        scales = meta.get("scales") if meta["format_version"] >= 2 else None
        load_prepared(prep, tensors, source, allow_nonfinite, scales)
        return commit(prep, activate)


def reload_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> None:
    """Load the weights (and scales) in ``directory`` into adapter ``name`` (default: the active one)
    that ``model`` already holds, in place: the parameter objects stay, so an optimizer over them
    stays valid (a resumed training run). Strict like :func:`load_adapter`; nothing is re-traced."""
    meta, tensors = read_adapter_dir(directory)
    with state.model_lock(model):
        name = name or state.get(model).active
        state.require(model, name)
        scales = meta.get("scales") if meta["format_version"] >= 2 else None
        source = str(Path(directory).expanduser() / WEIGHTS)
        load_modules(_modules_of(model, name), tensors, source, scales=scales)
