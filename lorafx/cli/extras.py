"""Which ``pip install 'lorafx[EXTRA]'`` brings a missing optional module: the one table the CLI reads
when a subcommand's import fails, so every subcommand says the same one line instead of a traceback."""

from __future__ import annotations

# top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "transformers": "hf",
    "peft": "hf",
    "accelerate": "hf",
    "rich": "cli",
    "yaml": "cli",
    "triton": "triton",
    "onnxruntime_genai": "genai",
    "bitsandbytes": "quant",
    "torchao": "quant",
    "diffusers": "diffusers",
}


ONNX = ("onnx", "onnxruntime", "onnxscript")


def require(*modules: str) -> None:
    """Import ``modules`` now, before a subcommand spends minutes on work that needs them later (the
    demo's ONNX check runs after training): a missing one raises the ImportError :func:`main` turns
    into the install line."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def missing_extra_message(error: ImportError) -> str | None:
    """``"needs onnx ...: pip install 'lorafx[onnx]'"`` when ``error`` is a missing optional module,
    else None (a missing core module or a broken import is a real bug and keeps its traceback)."""
    name = getattr(error, "name", None) or ""
    extra = EXTRA_OF.get(name.split(".")[0])
    if extra is None:
        return None
    return (
        f"this needs the optional module {name.split('.')[0]!r}, which is not installed: pip install 'lorafx[{extra}]'"
    )
