"""Uni-LoRA checkpoints to and from Hugging Face PEFT (``peft_type: UNILORA``).

PEFT's Uni-LoRA and lorafx's build the same model from the same numbers: PEFT's ``proj_seed`` is
lorafx's ``seed``, ``theta_d_length`` its ``vector_length``, ``init_theta_d_bound`` its ``init_bound``,
``unilora_dropout`` its ``dropout``; both assign the vector's entries to the sites' A then B entries,
in module order, with the same balanced shuffle (:func:`lorafx.variants.unilora.balanced_assignment`)
and scale each by ``1/√count``. A PEFT directory holds the vector as ``base_model.unilora_theta_d``
and, with ``save_indices=True``, every site's ``unilora_indices_A/B`` and ``unilora_scales_A/B``;
those are loaded when present (so a checkpoint from another index routine still loads as saved)
and rebuilt otherwise. :func:`to_peft_unilora` always writes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from lorafx import state
from lorafx.adapter_files import load_prepared, read_safetensors
from lorafx.apply import commit, prepare
from lorafx.errors import AdapterFileError, SpecError
from lorafx.files import resolve_dir, write_together
from lorafx.spec import Spec
from lorafx.variants.unilora import UniLoRA

PEFT_TYPE = "UNILORA"
THETA = "base_model.unilora_theta_d"
_PREFIX = "base_model.model."
_SHARED_KEY = f"{state.SHARED}.{UniLoRA.name}"
# PEFT buffer name -> lorafx buffer name
_BUFFERS = {
    "unilora_indices_A": "idx_A",
    "unilora_indices_B": "idx_B",
    "unilora_scales_A": "scale_A",
    "unilora_scales_B": "scale_B",
}
# Config fields that change the math; each must hold its neutral value to import.
_UNSUPPORTED = {
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "fan_in_fan_out": (False, None),
}


def spec_from_peft_unilora(cfg: dict, path: Path) -> Spec:
    """The lorafx spec of a PEFT ``UniLoraConfig`` (as a dict read from ``path``)."""
    for key, neutral in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in neutral:
            raise AdapterFileError(f"{path}: {key}={cfg[key]!r} is not supported by lorafx's Uni-LoRA import")
    targets = cfg.get("target_modules")
    if targets is None:
        raise SpecError(f"{path}: target_modules is null (PEFT's per-architecture defaults are not imported)")
    try:
        config = UniLoRA(
            r=int(cfg["r"]),
            vector_length=int(cfg["theta_d_length"]),
            seed=int(cfg.get("proj_seed", 0)),
            init_bound=float(cfg.get("init_theta_d_bound", 0.02)),
            dropout=float(cfg.get("unilora_dropout", 0.0)),
        )
    except KeyError as e:
        raise AdapterFileError(f"{path}: a UNILORA config needs {e.args[0]!r}") from None
    exclude = cfg.get("exclude_modules") or ()
    return Spec(
        config,
        targets=targets if isinstance(targets, str) else tuple(targets),
        exclude=exclude if isinstance(exclude, str) else tuple(exclude),
    )


def from_peft_unilora(
    model: nn.Module, directory: Path, cfg: dict, name: str, activate: bool, allow_nonfinite: bool
) -> nn.Module:
    """:func:`lorafx.from_peft` for a UNILORA directory (``cfg``: its adapter_config.json)."""
    spec = spec_from_peft_unilora(cfg, directory / "adapter_config.json")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: no such file")
    raw = read_safetensors(weights)
    theta = [k for k in raw if re.fullmatch(rf"{re.escape(THETA)}(\.{re.escape(name)}|\.default)?", k)]
    if len(theta) != 1:
        raise AdapterFileError(f"{weights}: expected one {THETA!r} tensor, found keys {sorted(raw)[:6]}")
    with state.model_lock(model):
        prep = prepare(model, spec, name)
        tensors = {f"{_SHARED_KEY}.theta": raw.pop(theta[0])}
        pattern = rf"{re.escape(_PREFIX)}(.+)\.({'|'.join(_BUFFERS)})(?:\.{re.escape(name)}|\.default)?"
        for key, t in raw.items():
            m = re.fullmatch(pattern, key)
            tensors[f"{m.group(1)}.{_BUFFERS[m.group(2)]}" if m else key] = t
        if not cfg.get("save_indices"):  # no buffers in the file: PEFT rebuilds them as lorafx did
            for site, adapter in prep.adapters.items():
                for buffer in _BUFFERS.values():
                    tensors.setdefault(f"{site}.{buffer}", getattr(adapter, buffer))
        load_prepared(prep, tensors, str(weights), allow_nonfinite)
        return commit(prep, activate)


def to_peft_unilora(model: nn.Module, name: str, sites: dict, directory: str | Path) -> Path:
    """:func:`lorafx.to_peft` for a Uni-LoRA adapter: a directory ``PeftModel.from_pretrained`` loads
    with ``UniLoraConfig`` (indices and scales saved, ``save_indices=True``)."""
    from safetensors.torch import save_file

    configs = {f: sa.adapters[name].config for f, sa in sites.items()}
    first = next(iter(configs.values()))
    odd = sorted(f for f, c in configs.items() if c != first)
    if odd:
        raise SpecError(f"to_peft: PEFT's UniLoraConfig has one r and dropout per adapter; sites {odd[:4]} differ")
    odd = sorted(f for f, sa in sites.items() if sa.adapters[name]._scale_value != 1.0)
    if odd:
        raise SpecError(f"to_peft: PEFT's Uni-LoRA has no scale; sites {odd[:4]} have lorafx.set_scale values")
    theta = state.shared_modules(model, name)[state.shared_key(name, UniLoRA.name)].theta
    tensors = {THETA: theta.detach().contiguous().cpu()}
    for f, sa in sites.items():
        a = sa.adapters[name]
        for peft_key, buffer in _BUFFERS.items():
            tensors[f"{_PREFIX}{f}.{peft_key}"] = getattr(a, buffer).detach().contiguous().cpu()
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": first.r,
        "theta_d_length": first.vector_length,
        "proj_seed": first.seed,
        "init_theta_d_bound": first.init_bound,
        "unilora_dropout": first.dropout,
        "target_modules": sorted(sites),
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "save_indices": True,
        "inference_mode": True,
    }
    directory = resolve_dir(directory, AdapterFileError, create=True)
    write_together(
        directory,
        {
            "adapter_model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            "adapter_config.json": lambda p: p.write_text(json.dumps(config, indent=2)),
        },
        AdapterFileError,
        last="adapter_config.json",
    )
    return directory
