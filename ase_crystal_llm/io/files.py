"""The one way the package writes a whole file, and the one numpy-to-JSON conversion.

:func:`atomic_write` is used by every writer that replaces a file (run
records, metrics and reports, model cards, training logs, cached
fingerprints, data manifests): readers, and a run killed at any moment, see
the old file or the new one, never half of one.  Streaming writers append
and call :func:`fsync` after each record instead (``outputs.StructureWriter``,
downloads).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "fsync", "json_default", "plain", "sha256_file"]


def fsync(handle: IO) -> None:
    """Flush ``handle`` and ask the OS to put its file on disk (it survives a crash)."""
    handle.flush()
    os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` in one step, durably.

    The data goes to a hidden temporary file in the same folder, is synced
    to disk and renamed over ``path``; an error (or Ctrl-C) removes the
    temporary file and leaves ``path`` as it was.

    Parameters
    ----------
    path : str or path-like
        The file to write; its folder must exist.
    data : str or bytes
        The whole content; text is written as UTF-8, newlines as given.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file is as readable as any other
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            fsync(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain(value: Any) -> Any:
    """A numpy scalar as the Python scalar it holds (for JSON and ase.db); anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars as Python scalars.

    Anything else json cannot write stays a :class:`TypeError`.
    """
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
