"""Write a directory so that readers see either the old one or the complete new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SecateursError
from ..utils import first_line

__all__ = ["atomic_dir", "check_output_dir", "write_files_atomically"]

# A directory holding this file was written by secateurs and may be replaced.
MARKER = "secateurs.json"


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse targets we must not replace.

    A file, the current directory or one of its parents is never a target. A
    non-empty directory is replaced only with ``overwrite`` and only if it holds
    a model saved by secateurs, so ``--overwrite`` cannot wipe unrelated files.
    """
    resolved = path.resolve()
    if path.exists() and not path.is_dir():
        raise SecateursError(f"output path '{path}' is a file: choose a directory for the model")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise SecateursError(f"output directory '{path}' is the current directory or above it: choose a new one")
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise SecateursError(f"'{parent}' is a file, so '{path}' cannot be created: choose another path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise SecateursError(
                f"output directory '{path}' exists and is not empty: choose another --out or pass --overwrite"
            )
        if not (path / MARKER).is_file():
            raise SecateursError(
                f"output directory '{path}' holds files that are not a secateurs model: "
                "--overwrite only replaces saved models; choose another --out"
            )


def _finish_files(root: Path) -> None:
    """Flush every file to disk and give it the permissions a plain ``open`` would."""
    for p in root.rglob("*"):
        if p.is_file():
            finish_file(p)


def finish_file(path: Path) -> None:
    """Flush a file to disk and give it the permissions a plain ``open`` would (``mkstemp`` makes it private)."""
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    On any error the temporary directory (and any parent directories created
    for it) is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    created = [p for p in reversed(path.absolute().parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model is not
    except OSError as exc:
        raise SecateursError(f"cannot create '{path}' ({first_line(exc)}): choose a writable --out") from None
    backup: Path | None = None
    try:
        yield tmp
        _finish_files(tmp)
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, backup)
        os.rename(tmp, path)
    except BaseException as exc:
        if backup is not None and backup.exists() and not path.exists():
            os.rename(backup, path)  # put the previous model back
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(exc, OSError):
            raise SecateursError(f"cannot write '{path}' ({first_line(exc)})") from None
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_files_atomically(files: dict[Path, bytes]) -> None:
    """Write each file through a temporary file and a rename; readers never see half a file.

    All contents are written to temporaries first, so a failure while writing
    leaves every target as it was (the renames that follow are each atomic).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            if not path.parent.is_dir():
                raise SecateursError(f"directory '{path.parent}' does not exist: create it first")
            if path.is_dir():
                raise SecateursError(f"'{path}' is a directory: give a file name (e.g. '{path / 'out'}{path.suffix}')")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        raise SecateursError(f"cannot write output files ({first_line(exc)})") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
