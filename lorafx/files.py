"""Writing a directory of files so that readers and other writers never see a mix.

Adapter directories (lorafx and PEFT) and export directories are several files that only make sense
together (the JSON that describes the tensors, and the tensors). :func:`write_together` writes each
file to a temporary name beside its final one, flushes it to disk, and only then renames each into
place (``os.replace``, atomic on POSIX), holding an exclusive lock on the directory while it does, so two writers to one directory are serialised and the last one wins whole. A failure
before the renames leaves the previous files untouched and no temporary file behind.

Readers cannot take part in the lock (``safetensors`` and ``json`` read by name), so the files carry
a common content hash (``content_sha256`` below): a reader that catches a writer between two renames
sees a JSON whose hash does not match the tensors, and retries (:func:`read_consistent`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # POSIX advisory locks; elsewhere writers are not serialised (the content hash still detects a mix)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def resolve_dir(path: str | os.PathLike, error: type[Exception], create: bool = False) -> Path:
    """``path`` with ``~`` expanded; an ``error`` naming it if it is a file (or, with ``create``, cannot
    be created)."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise error(f"{directory}: exists and is not a directory")
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise error(f"{directory}: cannot create the directory ({_why_not_mkdir(directory, e)})") from None
    return directory


def _why_not_mkdir(directory: Path, e: OSError) -> str:
    """The reason ``mkdir -p directory`` failed; names the file in the way, where mkdir's own reason
    ("File exists", "Not a directory") does not say which component it is."""
    for parent in [directory, *directory.parents]:
        if parent.exists():
            return f"{parent} is a file, not a directory" if not parent.is_dir() else str(e.strerror or e)
    return str(e.strerror or e)


def read_json_object(path: Path, error: type[Exception], missing_hint: str = "") -> dict:
    """The JSON object in ``path``; an ``error`` naming the file for every way it can be wrong (a
    directory, missing, unreadable, not JSON, not an object) instead of a raw OSError or TypeError."""
    if path.is_dir():
        raise error(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise error(f"{path}: no such file{f' ({missing_hint})' if missing_hint else ''}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB blocks (adapter files reach GBs at 70B scale)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``directory`` itself (flock on its file descriptor: Linux and
    macOS lock directories as they lock files), so no lock file is left behind."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_together(
    directory: Path, writers: dict[str, Callable[[Path], None]], error: type[Exception], last: str | None = None
) -> None:
    """Write every ``name -> writer(tmp_path)`` of ``writers`` into ``directory`` as one change.

    Each writer writes its file to the temporary path it is given. ``last`` is renamed into place
    after the others (the file readers look at first: the description of the rest). Any failure is an
    ``error`` naming the file, with the previous files left as they were.
    """
    token = uuid.uuid4().hex[:12]
    temps = {name: directory / f".{name}.tmp-{token}" for name in writers}
    order = [n for n in writers if n != last] + ([last] if last in writers else [])
    with _locked(directory):
        try:
            for name, write in writers.items():
                path = temps[name]
                try:
                    write(path)
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
                except OSError as e:
                    raise error(f"{directory / name}: cannot write ({e.strerror or e})") from None
            for name in order:
                try:
                    os.replace(temps[name], directory / name)
                except OSError as e:
                    raise error(f"{directory / name}: cannot write ({e.strerror or e})") from None
        finally:
            for path in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


@contextlib.contextmanager
def staged_directory(target: Path, error: type[Exception], marker: str) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target`` (a rename
    when ``target`` does not exist; else the old one is renamed aside, the new one renamed in, the
    old one deleted), on failure it is deleted and ``target`` is untouched.

    ``target`` may already exist only as an earlier output of the same writer (it holds ``marker``)
    or empty: a directory holding anything else is refused, never replaced (nothing lost).
    """
    if target.exists():
        if not target.is_dir():
            raise error(f"{target}: exists and is not a directory")
        if any(target.iterdir()) and not (target / marker).is_file():
            raise error(f"{target}: exists and holds other files (no {marker}); choose an empty or new directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{target.parent}: cannot create the directory ({_why_not_mkdir(target.parent, e)})") from None
    token = uuid.uuid4().hex[:12]
    stage = target.parent / f".{target.name}.tmp-{token}"
    stage.mkdir()
    try:
        yield stage
        with _locked(target.parent):
            if target.exists():
                old = target.parent / f".{target.name}.old-{token}"
                os.replace(target, old)
                os.replace(stage, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def read_consistent(read: Callable[[], tuple], consistent: Callable[[tuple], bool], tries: int = 20):
    """``read()`` until ``consistent(result)``, for readers racing a writer (:func:`write_together`
    renames files one by one: a reader can see the new JSON beside the old tensors for microseconds).
    Returns the last result, consistent or not, after ``tries`` attempts 10 ms apart."""
    result = read()
    for _ in range(tries - 1):
        if consistent(result):
            break
        time.sleep(0.01)
        result = read()
    return result


@contextlib.contextmanager
def staged_files(directory: Path, owned: list[str], error: type[Exception], last: str) -> Iterator[Path]:
    """Yield a temporary folder inside ``directory`` to fill; on success each entry written there
    replaces its namesake in ``directory`` (``last`` renamed in after the others), and every name of
    ``owned`` that this write did not produce is removed (a stale entry of the previous write). On
    failure the stage is deleted and ``directory`` is untouched. Other files in ``directory`` are
    never touched: the caller checks beforehand that the ``owned`` names are its own to replace.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{directory}: cannot create the directory ({_why_not_mkdir(directory, e)})") from None
    token = uuid.uuid4().hex[:12]
    stage = directory / f".{last}.tmp-{token}"
    stage.mkdir()
    try:
        yield stage
        written = sorted(p.name for p in stage.iterdir())
        order = [n for n in written if n != last] + ([last] if last in written else [])
        with _locked(directory):
            for name in order:
                dest, old = directory / name, directory / f".{name}.old-{token}"
                if dest.exists():
                    os.replace(dest, old)
                os.replace(stage / name, dest)
                _remove(old)
            for name in set(owned) - set(written):
                _remove(directory / name)
    finally:
        _remove(stage)


def _remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
