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

from lorafx import moe_peft, site_kinds, state
from lorafx.adapter_files import load_prepared, read_safetensors
from lorafx.apply import commit, prepare
from lorafx.errors import AdapterFileError, SpecError
from lorafx.files import read_json_object, resolve_dir, write_together
from lorafx.plan import linear_sites, select
from lorafx.saved_modules import TASK_HEADS, iter_saved
from lorafx.spec import Spec
from lorafx.variants.lora import LoRA

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Config fields that change the math; each must hold its neutral value for a plain-LoRA import.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "layers_to_transform": (None, []),
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
    targets, params = cfg.get("target_modules"), cfg.get("target_parameters") or []
    if targets is None and not params:
        raise SpecError(f"{PEFT_CONFIG}: target_modules is null (PEFT's per-architecture defaults are not imported)")
    if params and isinstance(targets, str):
        raise SpecError(
            f"{PEFT_CONFIG}: a regex target_modules with target_parameters is not imported; list the modules"
        )
    targets = targets if isinstance(targets, str) else tuple(targets or ())
    targets = targets if isinstance(targets, str) else targets + tuple(p.removesuffix(".weight") for p in params)
    exclude = cfg.get("exclude_modules") or ()
    exclude = exclude if isinstance(exclude, str) else tuple(exclude)
    base = LoRA(
        r=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
    )
    saved = tuple(cfg.get("modules_to_save") or ())
    task = "seq_cls" if cfg.get("task_type") == "SEQ_CLS" else None
    if task:  # PEFT's SEQ_CLS lists both head names, whichever the model has: lorafx's task says the same
        saved = tuple(s for s in saved if s not in TASK_HEADS[task])
    plain = Spec(base, targets=targets, exclude=exclude, modules_to_save=saved, task=task)
    overrides = {}
    sites = linear_sites(model)
    select(model, plain, sites)
    for fqn in [f for f, s in sites.items() if s.selected]:
        key = moe_peft.pattern_key(fqn, sites[fqn].adapter_kind)
        r = _peft_pattern(cfg.get("rank_pattern") or {}, key) or base.r
        alpha = _peft_pattern(cfg.get("alpha_pattern") or {}, key) or base.alpha
        if (r, alpha) != (base.r, base.alpha):
            overrides[re.escape(fqn)] = {"r": int(r), "alpha": float(alpha)}
    return Spec(base, targets=targets, exclude=exclude, overrides=overrides, modules_to_save=saved, task=task)


def _peft_tensors(raw: dict, plan, name: str, where: str) -> dict:
    """PEFT's keys -> lorafx's ``<site>.lora_A``/``lora_B``, expert pairs converted to lorafx's layout."""
    selected = plan.selected
    by_path = {path: f for f, path in moe_peft.peft_paths({f: s.adapter_kind for f, s in selected.items()}).items()}
    tensors = {}
    for key, t in raw.items():
        key = key.replace(".base_layer.out_proj.", ".out_proj.")  # PEFT wraps a MultiheadAttention's out_proj
        m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.(lora_[AB])(?:\.{re.escape(name)}|\.default)?\.weight", key)
        m = m or re.fullmatch(
            rf"{re.escape(_PREFIX)}(.+)\.lora_embedding_([AB])(?:\.{re.escape(name)}|\.default)?", key
        )
        if not m:  # a modules_to_save tensor (base_model.model.classifier.weight), or a key load reports
            tensors[key.removeprefix(_PREFIX)] = t
            continue
        fqn = by_path.get(m.group(1), m.group(1))
        site = selected.get(fqn)
        if site is not None and site.param:
            E = site.num_experts
            if t.dim() != 2 or t.shape[0 if m.group(2).endswith("A") else 1] % E:
                raise AdapterFileError(f"{where}: {key} {list(t.shape)} does not hold {E} experts' LoRA pairs")
            t = moe_peft.from_peft_A(t, E) if m.group(2).endswith("A") else moe_peft.from_peft_B(t, E)
        tensors[f"{fqn}.lora_{m.group(2)[-1]}"] = t
    return tensors


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
    with state.model_lock(model):  # see lorafx.regions: traces and requests in flight
        prep = prepare(model, spec, name)
        tensors = _peft_tensors(raw, prep.plan, name, str(weights))
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


def _site_tensors_for_peft(sa, adapter) -> dict[str, torch.Tensor]:
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
    order = list(linear_sites(model))  # model order: PEFT nests one module's parameter wrappers in it
    kinds = {f: sites[f].kind for f in sorted(sites, key=lambda f: order.index(f) if f in order else len(order))}
    params = sorted(p for f, k in kinds.items() if (p := moe_peft.target_parameter(f, k)))
    if params and base.dropout:
        raise SpecError(f"to_peft: PEFT's target_parameters (MoE sites {params[:3]}) do not support lora_dropout")
    paths = moe_peft.peft_paths(kinds)
    tensors = {}
    for f, sa in sites.items():
        a = sa.adapters[name]
        if sa.kind == "expert":
            A, B = moe_peft.to_peft_pair(a.lora_A.detach(), a.lora_B.detach())
            parts = {"lora_A.weight": A, "lora_B.weight": B}
        else:
            parts = _site_tensors_for_peft(sa, a)
        # PEFT adapts a MultiheadAttention as one module and keeps its out_proj under base_layer
        where = f"{f.rpartition('.')[0]}.base_layer.out_proj" if sa.kind == site_kinds.MHA_OUT else paths[f]
        for key, t in parts.items():
            tensors[f"{_PREFIX}{where}.{key}"] = t.contiguous().cpu()
    saved = {f: s.copies[name] for f, s in iter_saved(model).items() if name in s.copies}
    for f, twin in saved.items():  # modules_to_save: PEFT keys them without its wrapper's prefix
        tensors.update({f"{_PREFIX}{f}.{k}": t.detach().contiguous().cpu() for k, t in twin.state_dict().items()})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if data.specs[name].task == "seq_cls" else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": base.r,
        "lora_alpha": base.alpha,
        "lora_dropout": base.dropout,
        "use_rslora": base.rslora,
        "target_modules": sorted(
            f for f, k in kinds.items() if not moe_peft.target_parameter(f, k) and k != site_kinds.MHA_OUT
        )
        or None,
        "target_parameters": params or None,
        "rank_pattern": {moe_peft.pattern_key(f, kinds[f]): c.r for f, c in configs.items() if c.r != base.r},
        "alpha_pattern": {
            moe_peft.pattern_key(f, kinds[f]): c.alpha for f, c in configs.items() if c.alpha != base.alpha
        },
        "fan_in_fan_out": any(sa.fan_in_fan_out and sa.kind == site_kinds.LINEAR for sa in sites.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(saved) or None,
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
