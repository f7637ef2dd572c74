"""Folders and files the user names (``--out-dir``, ``--data``, ``--to`` ...): checked before
anything is written, and any ``OSError`` on them reported as one line naming the flag.

    check_out_dir("--out-dir", "out")           # a file there, or no right to create it: PathError
    with path_errors("--out-dir", "out"):       # FileExistsError, PermissionError ... -> PathError
        Path("out").mkdir(parents=True, exist_ok=True)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["PathError", "path_errors", "check_out_dir"]


class PathError(ValueError):
    """A user-named path that cannot be used; the message names the flag and the path."""


@contextmanager
def path_errors(flag: str, path) -> Iterator[None]:
    """Turns an ``OSError`` raised inside into a :class:`PathError` naming ``flag`` and ``path``."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and os.fspath(e.filename) != os.fspath(path) else ""
        raise PathError(f"{flag} {os.fspath(path)!r}: {reason}{where}") from None


def check_out_dir(flag: str, path) -> Path:
    """``path`` as a Path if it is a folder, or could be created as one, by this user; writes nothing.

    Refuses (PathError naming ``flag``) a path that is a file, sits below a file, or whose
    nearest existing folder is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{flag} {os.fspath(path)!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise PathError(f"{flag} {os.fspath(path)!r}: {os.fspath(existing)!r} is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {os.fspath(path)!r}: no permission to write in {os.fspath(existing)!r}")
    return path
