"""Atomic file and folder writes, and content hashes.

Every artefact (processed data, checkpoints, metrics) is written to a temporary name in the
same folder and renamed into place, so a crash or ``kill -9`` leaves either the old state or
the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary file next to ``path``; fsynced and renamed onto ``path`` when the block
    succeeds, removed when it fails. Write to the yielded path (streams, parquet writers...).

    Args:
        path: the file to produce.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates 0600; give the file the permissions a plain open() would.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Write JSON (sorted keys, indented, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to ``final`` on success.

    On an exception the temporary folder is removed and ``final`` is untouched. With
    ``overwrite`` an existing ``final`` is replaced (moved aside first, then deleted), so at
    every moment either the old or the new folder exists under ``final``.

    Args:
        final: the folder to produce.
        overwrite: replace an existing folder; otherwise it is an error to have one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        replace_directory(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(source: Path, final: Path, overwrite: bool = True) -> None:
    """Rename ``source`` to ``final``; an existing ``final`` is moved aside, then removed."""
    if final.exists():
        if not overwrite:
            raise FileExistsError(str(final))
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(source, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, final)
    _fsync_dir(final.parent)


def clean_stale_temporaries(folder: str | Path, name: str) -> None:
    """Tidy up after an interrupted atomic write of ``folder/name``.

    A kill between the two renames of :func:`replace_directory` leaves no ``name`` but a
    complete ``.name.old-PID``: that previous state is renamed back. Then unfinished
    temporaries (``.name.*.tmp``) and stale ``.old-`` copies are removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    final = folder / name
    if not final.exists():
        olds = sorted(folder.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)
    for child in folder.glob(f".{name}.*"):
        if child.name.endswith(".tmp") or ".old-" in child.name:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()
