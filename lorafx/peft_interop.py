"""Plain-LoRA checkpoints to and from Hugging Face PEFT.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<site FQN>.lora_A.weight`` ``[r, d_in]`` and ``...lora_B.weight`` ``[d_out, r]``:
the same tensors as lorafx's ``lora_A``/``lora_B``. Rank and alpha patterns are resolved per site with
PEFT's own rule (the first key with ``re.match(rf"(.*\\.)?({key})$", fqn)``) and written into the spec
as exact per-site overrides, so both libraries build the same scales. Features lorafx's plain LoRA
does not have (DoRA, trained biases, ``modules_to_save``, layer selection) are refused by name rather
than dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from lorafx import site_kinds, state
from lorafx.adapter_files import load_prepared, read_safetensors
from lorafx.apply import commit, prepare
from lorafx.errors import AdapterFileError, SpecError
from lorafx.files import read_json_object, resolve_dir, write_together
from lorafx.plan import linear_sites, select
from lorafx.spec import Spec
from lorafx.variants.lora import LoRA

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Config fields that change the math; each must hold its neutral value for a plain-LoRA import.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


def _peft_pattern(patterns: dict, fqn: str):
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", fqn):
            return patterns[key]
    return None


def read_peft_config(directory: Path) -> dict:
    path = directory / PEFT_CONFIG
    cfg = read_json_object(path, AdapterFileError, f"a PEFT adapter directory holds {PEFT_CONFIG}")
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA; only plain LoRA (and UNILORA, with from_peft) converts"
        )
    for key, neutral in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in neutral:
            raise AdapterFileError(f"{path}: {key}={cfg[key]!r} is not supported by lorafx's plain LoRA import")
    return cfg


def spec_from_peft_config(model: nn.Module, cfg: dict) -> Spec:
    """The lorafx spec that builds what PEFT would build from ``cfg`` on ``model``."""
    targets = cfg.get("target_modules")
    if targets is None:
        raise SpecError(f"{PEFT_CONFIG}: target_modules is null (PEFT's per-architecture defaults are not imported)")
    targets = targets if isinstance(targets, str) else tuple(targets)
    exclude = cfg.get("exclude_modules") or ()
    exclude = exclude if isinstance(exclude, str) else tuple(exclude)
    base = LoRA(
        r=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
    )
    plain = Spec(base, targets=targets, exclude=exclude)
    overrides = {}
    sites = linear_sites(model)
    select(model, plain, sites)
    for fqn in [f for f, s in sites.items() if s.selected]:
        r = _peft_pattern(cfg.get("rank_pattern") or {}, fqn) or base.r
        alpha = _peft_pattern(cfg.get("alpha_pattern") or {}, fqn) or base.alpha
        if (r, alpha) != (base.r, base.alpha):
            overrides[re.escape(fqn)] = {"r": int(r), "alpha": float(alpha)}
    return Spec(base, targets=targets, exclude=exclude, overrides=overrides)


def from_peft(
    model: nn.Module,
    directory: str | Path,
    name: str = "default",
    activate: bool = True,
    *,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Apply a PEFT LoRA (or UNILORA) checkpoint directory to ``model`` (strictly) and return the model.

    Example:
        >>> model = lorafx.from_peft(AutoModelForCausalLM.from_config(cfg), "peft-run/checkpoint-100")
    """
    directory = Path(directory).expanduser()
    raw_cfg = read_json_object(
        directory / PEFT_CONFIG, AdapterFileError, f"a PEFT adapter directory holds {PEFT_CONFIG}"
    )
    if raw_cfg.get("peft_type") == "UNILORA":  # issue 15: Uni-LoRA both ways (lorafx.peft_unilora)
        from lorafx.peft_unilora import from_peft_unilora

        return from_peft_unilora(model, directory, raw_cfg, name, activate, allow_nonfinite)
    cfg = read_peft_config(directory)
    spec = spec_from_peft_config(model, cfg)
    weights = directory / PEFT_WEIGHTS
    if weights.is_file():
        raw = read_safetensors(weights)
    elif (directory / "adapter_model.bin").is_file():
        raw = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterFileError(f"{weights}: no such file (nor adapter_model.bin)")
    tensors = {}
    for key, t in raw.items():
        key = key.replace(".base_layer.out_proj.", ".out_proj.")  # PEFT wraps a MultiheadAttention's out_proj
        m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.(lora_[AB])(?:\.{re.escape(name)}|\.default)?\.weight", key)
        m = m or re.fullmatch(
            rf"{re.escape(_PREFIX)}(.+)\.lora_embedding_([AB])(?:\.{re.escape(name)}|\.default)?", key
        )
        tensors[f"{m.group(1)}.lora_{m.group(2)[-1]}" if m else key] = t
    with state.model_lock(model):  # see lorafx.regions: traces and requests in flight
        prep = prepare(model, spec, name)
        _flatten_conv_tensors(prep, tensors)
        load_prepared(prep, tensors, str(weights), allow_nonfinite)
        return commit(prep, activate)


def _flatten_conv_tensors(prep, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT stores a conv site's ``lora_A`` as ``[r, C_in, *k]`` and ``lora_B`` as ``[C_out, r, 1, ...]``;
    lorafx as the canonical ``[r, C_in·∏k]`` and ``[C_out, r]``. Reshaped in place; a tensor whose size
    does not fit is left for the strict check to name."""
    for fqn, adapter in prep.adapters.items():
        if prep.plan.sites[fqn].kind != site_kinds.CONV:
            continue
        for key in ("lora_A", "lora_B"):
            t, own = tensors.get(f"{fqn}.{key}"), getattr(adapter, key, None)
            if t is not None and own is not None and t.dim() > 2 and t.numel() == own.numel():
                tensors[f"{fqn}.{key}"] = t.reshape(own.shape)


def _peft_tensors(sa, adapter) -> dict[str, torch.Tensor]:
    """One site's tensors under PEFT's names and shapes (``lora_embedding_A/B`` for embeddings, conv kernels)."""
    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    if sa.kind == site_kinds.EMBEDDING:
        return {"lora_embedding_A": A, "lora_embedding_B": B}
    if sa.kind == site_kinds.CONV:
        A = A.reshape(A.shape[0], *sa.weight_shape[1:])
        B = B.reshape(*B.shape, *[1] * (len(sa.weight_shape) - 2))
    return {"lora_A.weight": A, "lora_B.weight": B}


def _with_current_scale(adapter) -> LoRA:
    """The adapter's config with ``alpha`` such that PEFT's scale equals the adapter's current one
    (``lorafx.set_scale`` changes the scale, and PEFT files hold alpha, not the scale)."""
    cfg = adapter.config
    if adapter._scale_value == cfg.scale:
        return cfg
    return dataclasses.replace(cfg, alpha=adapter._scale_value * (math.sqrt(cfg.r) if cfg.rslora else cfg.r))


def to_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: active) as a PEFT LoRA directory ``PeftModel.from_pretrained`` loads.

    Plain LoRA and Uni-LoRA adapters convert (:mod:`lorafx.peft_unilora`); any other variant is a
    :class:`SpecError` naming it.
    """
    from safetensors.torch import save_file

    name = name or state.get(model).active
    data = state.require(model, name)
    sites = {sa.site: sa for sa in state.iter_sites(model).values() if name in sa.adapters}
    if sites and all(sa.adapters[name].config.name == "unilora" for sa in sites.values()):
        from lorafx.peft_unilora import to_peft_unilora

        return to_peft_unilora(model, name, sites, directory)
    bad = sorted(f for f, sa in sites.items() if type(sa.adapters[name].config) is not LoRA)
    if bad:
        raise SpecError(f"to_peft converts plain LoRA only; adapter {name!r} has other variants at {bad[:5]}")
    configs = {f: _with_current_scale(sa.adapters[name]) for f, sa in sites.items()}
    base = data.specs[name].config
    if not isinstance(base, LoRA):
        base = next(iter(configs.values()))
    for f, c in configs.items():
        if (c.rslora, c.dropout) != (base.rslora, base.dropout):
            raise SpecError(
                f"to_peft: site {f!r} has rslora/dropout different from the rest; PEFT has one value per adapter"
            )
    tensors = {}
    for f, sa in sites.items():
        # PEFT adapts a MultiheadAttention as one module and keeps its out_proj under base_layer
        where = f"{f.rpartition('.')[0]}.base_layer.out_proj" if sa.kind == site_kinds.MHA_OUT else f
        for key, t in _peft_tensors(sa, sa.adapters[name]).items():
            tensors[f"{_PREFIX}{where}.{key}"] = t.contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": base.r,
        "lora_alpha": base.alpha,
        "lora_dropout": base.dropout,
        "use_rslora": base.rslora,
        "target_modules": sorted(f for f, sa in sites.items() if sa.kind != site_kinds.MHA_OUT),
        "rank_pattern": {f: c.r for f, c in configs.items() if c.r != base.r},
        "alpha_pattern": {f: c.alpha for f, c in configs.items() if c.alpha != base.alpha},
        "fan_in_fan_out": any(sa.fan_in_fan_out and sa.kind == site_kinds.LINEAR for sa in sites.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    directory = resolve_dir(directory, AdapterFileError, create=True)
    write_together(
        directory,
        {
            PEFT_WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            PEFT_CONFIG: lambda p: p.write_text(json.dumps(config, indent=2)),
        },
        AdapterFileError,
        last=PEFT_CONFIG,
    )
    return directory
