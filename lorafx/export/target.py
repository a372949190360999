"""Where an export is written: a directory of its own, or a ``.onnx`` path with its files beside it.

``to_onnx(model, x, "out")`` writes ``out/model.onnx``, ``out/lorafx_export.json`` and
``out/adapters/`` and replaces ``out`` whole (an earlier export there, or an empty folder).
``to_onnx(model, x, "out/llama.onnx")`` follows ``torch.onnx.export``: it writes that file, with the
manifest, external data (``llama.onnx.data``, if the exporter writes one) and ``adapters/`` beside
it, and replaces only those names: any other file in ``out`` is left alone. A manifest or
``adapters/`` there that belongs to something else (another export's manifest, a folder of the user's
adapters) is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorafx.errors import ExportError
from lorafx.export.modes import MODEL_FILE
from lorafx.files import staged_directory, staged_files

MANIFEST = "lorafx_export.json"
ADAPTERS = "adapters"


@dataclass(frozen=True)
class ExportTarget:
    """The folder an export lands in and its graph file's name there."""

    directory: Path
    model_file: str
    file_mode: bool  # a ``.onnx`` path was given: replace only the export's own names

    @staticmethod
    def of(path) -> ExportTarget:
        """A directory path, or a path ending in ``.onnx`` that is not an existing directory."""
        target = Path(path).expanduser()
        if target.suffix != ".onnx" or target.is_dir():
            return ExportTarget(target, MODEL_FILE, False)
        if target.name == MANIFEST:
            raise ExportError(f"{target}: that name is the export's manifest; choose another .onnx name")
        out = ExportTarget(target.parent, target.name, True)
        out._check_owned()
        return out

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.model_file

    def owned(self) -> list[str]:
        """The names in :attr:`directory` this export writes (and may replace)."""
        return [self.model_file, f"{self.model_file}.data", MANIFEST, ADAPTERS]

    def _check_owned(self) -> None:
        """Refuse before the (slow) trace if the manifest or ``adapters/`` beside the file belong to
        something other than an earlier export to this same file."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise ExportError(f"{d}: exists and is not a directory")
        manifest = d / MANIFEST
        ours = False
        if manifest.exists():
            try:
                ours = json.loads(manifest.read_text()).get("model") == self.model_file
            except (OSError, ValueError, AttributeError):
                ours = False
            if not ours:
                raise ExportError(
                    f"{manifest}: belongs to another export (not of {self.model_file}); writing {self.onnx_path} "
                    "would replace it: export into another folder"
                )
        if (d / ADAPTERS).exists() and not ours:
            raise ExportError(
                f"{d / ADAPTERS}: exists and is not an earlier export's adapters; writing {self.onnx_path} "
                "would replace it: export into another folder"
            )

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A temporary folder to write the export into; moved into place if the block succeeds."""
        if self.file_mode:
            with staged_files(self.directory, self.owned(), ExportError, last=MANIFEST) as stage:
                yield stage
        else:
            with staged_directory(self.directory, ExportError, MANIFEST) as stage:
                yield stage
