"""One onnxruntime per environment: refuse clearly when two of its distributions are installed.

``onnxruntime`` (CPU), ``onnxruntime-gpu`` and the other builds (DirectML, OpenVINO, QNN, ROCm, ...)
all install the same ``onnxruntime`` Python package. With two installed, the files of the one
installed last overwrite the other's, and which execution providers exist depends on install order:
a GPU session silently falls back to CPU, or the import fails with an unrelated error. Same for
``onnxruntime-genai`` and ``onnxruntime-genai-cuda``. :func:`require_one_onnxruntime` names both and
says what to uninstall.
"""

from __future__ import annotations

from importlib import metadata

from lorafx.errors import ExportError

#: Distributions that each ship the ``onnxruntime`` package (one group), and ``onnxruntime_genai``.
GROUPS: tuple[tuple[str, ...], ...] = (
    (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-directml",
        "onnxruntime-openvino",
        "onnxruntime-qnn",
        "onnxruntime-rocm",
        "onnxruntime-training",
    ),
    ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"),
)


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def require_one_onnxruntime() -> None:
    """Raise :class:`~lorafx.errors.ExportError` if two distributions of one group are installed."""
    for group in GROUPS:
        found = [f"{n}=={v}" for n in group if (v := installed(n)) is not None]
        if len(found) > 1:
            raise ExportError(
                f"{' and '.join(found)} are installed in one environment; they ship the same Python "
                "package and overwrite each other's files. Keep exactly one: "
                f"pip uninstall -y {' '.join(n.split('==')[0] for n in found)}, then install one "
                "(lorafx[onnx] for CPU, lorafx[onnx-gpu] for CUDA)"
            )
