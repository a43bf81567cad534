"""Write a directory so that readers see either the old one or the complete new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SecateursError

__all__ = ["atomic_dir", "check_output_dir"]


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty directory without ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise SecateursError(f"output path '{path}' is a file: choose a directory for the model")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SecateursError(
            f"output directory '{path}' exists and is not empty: choose another --out or pass --overwrite"
        )


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    On any error the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            backup.rmdir()
            os.rename(path, backup)
            os.rename(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
