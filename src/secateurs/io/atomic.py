"""Write outputs so that readers see either the old version or the complete new one, and never
delete or replace what secateurs did not write.

- :func:`output_lock` holds an exclusive lock on an output path for a whole run, so a
  second run writing the same path fails at once instead of racing.
- :func:`atomic_dir` builds a folder beside its target and swaps it in with one
  ``renameat2(RENAME_EXCHANGE)`` on Linux: the target is at every moment either the
  old model or the new one. Where the exchange is unavailable (other systems, some
  file systems) two renames are used; between them the target is missing for a
  moment and the old model sits in ``.NAME.old-PID``, which the next run restores.
- Temporary and backup folders an interrupted (killed) run left beside a target are
  recognised by their names and contents, and cleaned up by the next run that
  writes the same target, which says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SecateursError
from ..utils import first_line

__all__ = ["atomic_dir", "check_output_dir", "foreign_entries", "output_lock", "write_files_atomically"]

log = logging.getLogger(__name__)

# A directory holding this file was written by secateurs and may be replaced.
MARKER = "secateurs.json"
# Inside a temporary folder while it is being filled: an interrupted run's leftovers are recognisable.
PARTIAL = ".secateurs-partial"
# What folders saved before the manifest listed its files ("files") may hold besides the model.
_LEGACY_NAMES = {MARKER, "model.safetensors", "report.json", "report.html", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja", "tokenizer.model"}
_MAX_MARKER_BYTES = 64 * 2**20


def foreign_entries(path: Path) -> list[str]:
    """Names in the existing folder ``path`` that secateurs did not write there (all of them if it is not ours)."""
    names = sorted(entry.name for entry in path.iterdir())
    marker = path / MARKER
    if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > _MAX_MARKER_BYTES:
        return names
    try:
        manifest = json.loads(marker.read_bytes())
    except (ValueError, RecursionError):
        return names
    if not isinstance(manifest, dict) or manifest.get("format") != "secateurs":
        return names
    files = manifest.get("files")
    # report.html: `secateurs report DIR` adds it later
    ours = {MARKER, "report.html", *files} if isinstance(files, list) and all(isinstance(f, str) for f in files) else _LEGACY_NAMES
    return [name for name in names if not _ours(path / name, name, ours)]


def _ours(entry: Path, relative: str, ours: set[str]) -> bool:
    """A regular file the manifest lists, or a real folder (such as a sentence-transformers module's
    ``1_Pooling``) that holds only such files."""
    if entry.is_symlink():
        return False
    if entry.is_file():
        return relative in ours
    if not entry.is_dir() or not any(name.startswith(relative + "/") for name in ours):
        return False
    return all(_ours(child, f"{relative}/{child.name}", ours) for child in entry.iterdir())


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse targets we must not replace.

    A file, the current directory or one of its parents is never a target. A
    non-empty directory is replaced only with ``overwrite`` and only if it holds
    a model saved by secateurs and nothing else, so ``--overwrite`` cannot wipe
    files a user put there.
    """
    resolved = path.resolve()
    if path.is_symlink():
        raise SecateursError(f"output path '{path}' is a symlink: give the real path ('{resolved}')")
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
        foreign = foreign_entries(path)
        if foreign:
            raise SecateursError(
                f"output directory '{path}' holds {len(foreign)} file(s) secateurs did not write there "
                f"({', '.join(foreign[:3])}): move them out, or choose another --out"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finish_file(path: Path) -> None:
    """Flush a file to disk and give it the permissions a plain ``open`` would (``mkstemp`` makes it private)."""
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- the lock -----------------------------------------------------------------------------------

_held: dict[str, int] = {}  # paths this process holds the lock of -> nesting depth


def _lock_key(path: Path) -> Path:
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive right to write ``path`` while the block runs.

    The lock is ``flock`` on a file ``.NAME.lock`` beside ``path`` (removed on exit);
    it is re-entrant within a process, so the CLI can hold it for a whole run and
    :func:`atomic_dir` take it again. Missing parent folders are created for it and
    removed again if the run leaves them empty. Without ``fcntl`` (Windows) no lock
    is taken.

    Raises:
        SecateursError: another process holds the lock, or the location is not writable.
    """
    key = _lock_key(Path(path))
    if str(key) in _held:
        _held[str(key)] += 1
        try:
            yield
        finally:
            _held[str(key)] -= 1
        return
    try:
        import fcntl
    except ImportError:  # no flock here: the emptiness checks are all there is
        yield
        return
    for parent in key.parents:
        if parent.exists() and not parent.is_dir():
            raise SecateursError(f"'{parent}' is a file, so '{path}' cannot be created: choose another path")
    created = [p for p in reversed(key.parents) if not p.exists()]
    lock = key.parent / f".{key.name}.lock"
    fd = -1
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        while True:
            # never through a symlink, and never a file that is also reachable elsewhere (a hard link):
            # the pid written below would overwrite somebody's data
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o666 & ~_umask())
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise SecateursError(f"'{lock}' is not a lock file of ours (a link or special file): remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                raise SecateursError(f"'{path}' is being written by another secateurs run"
                                     f"{f' (pid {holder})' if holder.isdigit() else ''}: wait for it to finish "
                                     "or choose another output") from None
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(lock).st_ino == info.st_ino:
                    break  # not a file the previous holder unlinked before we locked it
            os.close(fd)
            fd = -1
        if info.st_size > 32:
            raise SecateursError(f"'{lock}' is not a lock file of ours (it holds data): remove it")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        _remove_empty(created)
        if not isinstance(exc, OSError):
            raise
        if exc.errno == errno.ELOOP:
            raise SecateursError(f"'{lock}' is a symlink, not a lock file of ours: remove it") from None
        raise SecateursError(f"cannot write to '{path}' ({first_line(exc)}): choose a writable location") from None
    _held[str(key)] = 1
    try:
        yield
    finally:
        del _held[str(key)]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: a waiting run re-checks the inode
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


# ---- leftovers of interrupted runs --------------------------------------------------------------

_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile's random part


def _dead(pid_text: str) -> bool:
    """Whether ``pid_text`` names a process that no longer runs (a backup's owner)."""
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        pass
    return False


def clean_stale(path: Path) -> None:
    """Restore or remove what an interrupted run of ours left beside ``path``, and say so.

    Call only while holding :func:`output_lock` on ``path``: then nobody else is
    writing these. Recognised, by exact name and content: ``.NAME.tmp-<8 random characters>``
    folders (tempfile's 8 random characters) holding our partial marker or a
    manifest, ``.NAME.tmp-<8 random characters>`` files, and ``.NAME.old-PID`` backups holding a
    manifest whose process is gone (restored when ``path`` itself is missing).
    """
    parent = path.parent
    if not parent.is_dir():
        return
    tmp_prefix, old_prefix = f".{path.name}.tmp-", f".{path.name}.old-"
    for entry in sorted(parent.iterdir()):
        if entry.is_symlink():
            continue
        name = entry.name
        is_tmp = name.startswith(tmp_prefix) and _RANDOM.fullmatch(name[len(tmp_prefix):]) is not None
        is_old = name.startswith(old_prefix) and _dead(name[len(old_prefix):])
        if not (is_tmp or is_old):
            continue
        ours_dir = entry.is_dir() and ((entry / PARTIAL).is_file() or (entry / MARKER).is_file())
        if is_old and ours_dir and (entry / MARKER).is_file():
            if not path.exists():
                os.rename(entry, path)
                log.warning("restored '%s' from '%s', left by an interrupted run", path, name)
                continue
            shutil.rmtree(entry, ignore_errors=True)
        elif is_tmp and ours_dir:
            shutil.rmtree(entry, ignore_errors=True)
        elif is_tmp and entry.is_file():
            entry.unlink(missing_ok=True)
        else:
            continue
        log.warning("removed '%s', left beside '%s' by an interrupted run", entry, path.name)


def make_temp_dir(target: Path) -> Path:
    """A private working folder beside ``target``, marked as partial (the caller removes the marker when done)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    (tmp / PARTIAL).touch()
    return tmp


# ---- replacing ----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    Holds :func:`output_lock` on ``path`` throughout, cleans up what interrupted runs
    left, and checks the target with :func:`check_output_dir`. On any error the
    temporary directory (and any parent directories created for it) is removed and
    an existing ``path`` is left as it was.
    """
    path = Path(path)
    with output_lock(path):
        clean_stale(path)
        check_output_dir(path, overwrite)
        try:
            tmp = make_temp_dir(path)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model is not
        except OSError as exc:
            raise SecateursError(f"cannot create '{path}' ({first_line(exc)}): choose a writable --out") from None
        backup: Path | None = None
        try:
            yield tmp
            (tmp / PARTIAL).unlink()
            for p in tmp.rglob("*"):
                if p.is_file():
                    finish_file(p)
            _fsync_dir(tmp)
            if not path.exists():
                os.rename(tmp, path)
            elif not _exchange(tmp, path):
                backup = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.rename(path, backup)  # from here until the next rename, path is missing
                os.rename(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as exc:
            if backup is not None and backup.exists() and not path.exists():
                os.rename(backup, path)  # put the previous model back
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise SecateursError(f"cannot write '{path}' ({first_line(exc)})") from None
            raise
        shutil.rmtree(backup if backup is not None else tmp, ignore_errors=True)  # the old model


def write_files_atomically(files: dict[Path, bytes]) -> None:
    """Write each file through a temporary file and a rename; readers never see half a file.

    All contents are written to temporaries first, so a failure while writing
    leaves every target as it was (the renames that follow are each atomic).
    Each target is locked with :func:`output_lock` meanwhile.
    """
    staged: list[tuple[Path, Path]] = []
    with contextlib.ExitStack() as locks:
        try:
            for path, data in files.items():
                path = Path(path)
                if not path.parent.is_dir():
                    raise SecateursError(f"directory '{path.parent}' does not exist: create it first")
                if path.is_dir():
                    raise SecateursError(f"'{path}' is a directory: give a file name (e.g. '{path / 'out'}{path.suffix}')")
                locks.enter_context(output_lock(path))
                clean_stale(path)
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
