"""Where the CLI gets models and specs from.

Models (``MODEL`` argument of every subcommand):

* ``demo:NAME`` — a built-in model of :data:`lorafx.cli.models.BUILTIN` (``tiny-llama``, ``minilm``,
  ``mlp``, ``bench-llama``);
* a transformers directory (offline): with weights it is loaded, with only ``config.json`` it is built
  with seeded random weights (``from_config``);
* ``package.module:function`` or ``path/to/file.py:function`` — a factory called with no arguments;
* for ``inspect`` only, an exported ``.onnx`` file (see :mod:`lorafx.cli.onnx_info`).

Specs: ``--spec FILE`` (JSON, or YAML with pyyaml, in :meth:`lorafx.Spec.from_dict` form), inline
flags (``--variant lora --r 8 --targets q_proj,v_proj``), or ``--peft DIR`` (a PEFT LoRA adapter).
Every mistake is a :class:`SourceError` or :class:`lorafx.SpecError` with one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

from lorafx.cli.extras import missing_extra_message
from lorafx.cli.ui import add_repeatable
from lorafx.errors import LorafxError, SpecError

DEMO = "demo:"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class SourceError(LorafxError, ValueError):
    """A model source the CLI cannot load (unknown name, missing file, failing factory)."""


MODEL_HELP = (
    "demo:tiny-llama | demo:minilm | demo:mlp | demo:bench-llama, a transformers checkpoint or config "
    "directory, or a factory package.module:function"
)


def is_onnx(source: str) -> bool:
    return source.lower().endswith(".onnx")


def load_model(source: str, seed: int = 0):
    """The ``nn.Module`` named by ``source`` (see the module docstring), in eval mode."""
    import torch

    if source.startswith(DEMO):
        model = _builtin(source[len(DEMO) :], seed)
    elif Path(source).is_dir():
        model = _transformers_dir(Path(source), seed)
    elif is_onnx(source):
        raise SourceError(f"{source}: an .onnx file can only be inspected (lorafx inspect {source})")
    elif ":" in source:
        model = _factory(source)
    elif Path(source).exists():
        raise SourceError(f"{source}: not a model source ({MODEL_HELP})")
    else:
        raise SourceError(f"unknown model source {source!r}: expected {MODEL_HELP}")
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"{source}: returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _quiet_transformers() -> None:
    """No weight-loading bars or deprecation notices from transformers on the CLI's output."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _builtin(name: str, seed: int):
    from lorafx.cli.models import BUILTIN

    if name not in BUILTIN:
        raise SourceError(f"unknown built-in model {DEMO}{name}; built-ins: {', '.join(DEMO + n for n in BUILTIN)}")
    if name != "mlp":
        _quiet_transformers()
    factory = BUILTIN[name]
    try:
        # random-weight built-ins take a seed; the pretrained MiniLM does not
        return factory(seed=seed) if "seed" in inspect.signature(factory).parameters else factory()
    except ImportError as e:
        if missing_extra_message(e) is not None:
            raise  # the CLI names the extra to install (lorafx.cli.extras)
        raise SourceError(f"{DEMO}{name}: {e}") from None
    except RuntimeError as e:
        raise SourceError(f"{DEMO}{name}: {e}") from None


def _transformers_dir(path: Path, seed: int):
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: no config.json, so not a transformers checkpoint or config directory")
    try:
        import torch
        import transformers
    except ImportError:
        raise SourceError(
            f"{path}: loading a transformers directory needs transformers (pip install 'lorafx[hf]')"
        ) from None
    _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if any((path / f).is_file() for f in _WEIGHT_FILES):
            model = (cls or transformers.AutoModel).from_pretrained(str(path), local_files_only=True)
        else:
            torch.manual_seed(seed)  # config only: seeded random weights, reproducible across runs
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: transformers cannot load it: {str(e).splitlines()[0]}") from None
    if cls is None:  # say so: a user who meant a ForCausalLM would otherwise inspect a model without its head
        why = f"names {arch!r}, which transformers does not have" if arch else "names no `architectures`"
        print(
            f"lorafx: note: {path / 'config.json'} {why}: built the bare base model {type(model).__name__} "
            "(no task head)",
            file=sys.stderr,
        )
    return model


def _factory(source: str):
    target, _, func = source.rpartition(":")
    if not target or not func.isidentifier():
        raise SourceError(f"unknown model source {source!r}: expected {MODEL_HELP}")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise SourceError(f"{source}: no such file {target}")
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SourceError:
        raise
    except ImportError as e:
        raise SourceError(f"{source}: cannot import {target!r} ({e})") from None
    except Exception as e:  # a user factory module failing at import: report it in one line
        raise SourceError(f"{source}: importing {target!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise SourceError(
            f"{source}: {target!r} has no function {func!r}; callables there: {', '.join(public[:12]) or 'none'}"
        )
    try:
        return fn()
    except Exception as e:
        raise SourceError(f"{source}: the factory raised {type(e).__name__}: {e}") from None


# -- specs ----------------------------------------------------------------------------------------


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """``--spec``, ``--peft`` and the inline spec flags, shared by the subcommands that adapt a model."""
    g = parser.add_argument_group(
        "spec (one of --spec, --peft, or the inline flags; default: --variant lora --targets all-linear)"
    )
    g.add_argument("--spec", metavar="FILE", help="spec file, JSON or YAML (lorafx.Spec.to_dict format)")
    g.add_argument("--peft", metavar="DIR", help="PEFT LoRA adapter directory (its adapter_config.json)")
    from lorafx.config import variant_names

    g.add_argument("--variant", help=f"one of {', '.join(variant_names())} (default lora)")
    g.add_argument("--r", type=int, help="rank r")
    g.add_argument("--alpha", type=float, help="scale numerator alpha")
    g.add_argument("--dropout", type=float, help="adapter input dropout")
    add_repeatable(g, "--set", "FIELD=VALUE", "any other config field (repeatable; VALUE is JSON or a string)")
    g.add_argument("--targets", help="comma-separated FQN suffixes, or all-linear (default)")
    g.add_argument("--targets-regex", metavar="REGEX", help="a regex that must match the whole site FQN")
    g.add_argument("--exclude", help="comma-separated FQN suffixes never adapted")


_INLINE = ("variant", "r", "alpha", "dropout", "targets", "targets_regex", "exclude")


def spec_from_args(args: argparse.Namespace, model):
    """The :class:`lorafx.Spec` the arguments describe (``model`` is needed for ``--peft``)."""
    inline = [f"--{k.replace('_', '-')}" for k in _INLINE if getattr(args, k) is not None] + (
        ["--set"] if args.set else []
    )
    chosen = [name for name, v in (("--spec", args.spec), ("--peft", args.peft)) if v is not None]
    if len(chosen) > 1 or (chosen and inline):
        raise SpecError(f"give one spec source: {' and '.join(chosen + inline)} cannot be combined")
    if args.spec is not None:
        return read_spec_file(Path(args.spec))
    if args.peft is not None:
        from lorafx.errors import AdapterFileError
        from lorafx.files import read_json_object
        from lorafx.peft_interop import PEFT_CONFIG, read_peft_config, spec_from_peft_config
        from lorafx.peft_unilora import PEFT_TYPE, spec_from_peft_unilora

        path = Path(args.peft) / PEFT_CONFIG
        cfg = read_json_object(path, AdapterFileError, f"a PEFT adapter directory holds {PEFT_CONFIG}")
        if cfg.get("peft_type") == PEFT_TYPE:
            return spec_from_peft_unilora(cfg, path)
        return spec_from_peft_config(model, read_peft_config(Path(args.peft)))
    return inline_spec(args)


def inline_spec(args: argparse.Namespace):
    from lorafx.config import AdapterConfig
    from lorafx.spec import ALL_LINEAR, Spec

    fields = {k: getattr(args, k) for k in ("r", "alpha", "dropout") if getattr(args, k) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set rslora=true")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    if args.targets is not None and args.targets_regex is not None:
        raise SpecError("give --targets or --targets-regex, not both")
    targets = args.targets_regex if args.targets_regex is not None else _names(args.targets) or ALL_LINEAR
    try:
        config = AdapterConfig.from_dict({"variant": args.variant or "lora", **fields})
    except (TypeError, ValueError) as e:  # a variant's __post_init__ check, e.g. r must be positive
        if isinstance(e, LorafxError):
            raise
        raise SpecError(str(e)) from None
    return Spec(config, targets=targets, exclude=_names(args.exclude) or ())


def _names(text: str | None):
    if text is None:
        return None
    if text.strip() == "all-linear":
        return "all-linear"
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise SpecError(f"empty name list {text!r}")
    return names


def read_spec_file(path: Path):
    """A :class:`lorafx.Spec` from a JSON or YAML file; errors name the file."""
    from lorafx.spec import Spec

    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpecError(
                f"{path}: reading YAML needs pyyaml (pip install pyyaml), or write the spec as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON: {e}") from None
    try:
        return Spec.from_dict(data)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise SpecError(f"{path}: {e}") from None
