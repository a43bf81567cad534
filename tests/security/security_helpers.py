"""Shared helpers for the hostile-input tests: build model folders, edit them, run the CLI, compare trees.

Everything is generated under ``tmp_path``; nothing here is a fixture file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import secateurs
from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.zoo import DigitsCNN

CNN = "secateurs.zoo:DigitsCNN"
SHAPE = [1, 1, 8, 8]
MANIFEST = "secateurs.json"
WEIGHTS = "model.safetensors"


# ---- model folders ---------------------------------------------------------------------------------

@pytest.fixture(name="model_dir")
def model_dir_fixture(tmp_path: Path) -> Path:
    """A saved DigitsCNN folder to edit (import this fixture into a test module to use it)."""
    return saved_model(tmp_path / "m")


@pytest.fixture(name="no_network")
def no_network_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails loudly: a download would be a hole."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the test forbids network access: a download was attempted")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket.socket, "connect_ex", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)


def saved_model(path: Path, *, seed: int = 0, **save_kwargs: Any) -> Path:
    """A valid secateurs folder holding a seeded DigitsCNN (input 1x1x8x8 recorded)."""
    torch.manual_seed(seed)
    save_kwargs.setdefault("input_shape", SHAPE)
    secateurs.save(DigitsCNN(), path, **save_kwargs)
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any] | None = None, **updates: Any) -> None:
    """Rewrite the manifest: ``edit`` may change it in place or return a new one; ``updates`` set keys."""
    manifest = read_manifest(folder)
    if edit is not None:
        result = edit(manifest)
        manifest = manifest if result is None else result
    if updates:
        manifest.update(updates)
    (folder / MANIFEST).write_text(json.dumps(manifest))


# ---- expecting refusals ----------------------------------------------------------------------------

def outcome_of(fn: Callable[[], Any]) -> Any:
    """What ``fn`` returned or raised, so side effects can be checked before the outcome."""
    try:
        return fn()
    except BaseException as exc:  # noqa: B036 - SystemExit from a hostile import is an outcome too
        return exc


def assert_refusal(outcome: Any, *fragments: str) -> SecateursError:
    """Require a SecateursError whose message holds every fragment.

    Any other outcome (a return value, another exception, even SystemExit or
    RecursionError) fails the test with a message saying what happened instead.
    """
    if isinstance(outcome, SecateursError):
        for fragment in fragments:
            assert fragment in str(outcome), f"{fragment!r} not in the error: {outcome}"
        return outcome
    if isinstance(outcome, BaseException):
        pytest.fail(f"expected SecateursError, got {type(outcome).__name__}: {str(outcome)[:300]}")
    pytest.fail(f"expected SecateursError, but it returned {type(outcome).__name__}")


def refused(fn: Callable[[], Any], *fragments: str) -> SecateursError:
    """Call ``fn`` and require a SecateursError holding every fragment (see :func:`assert_refusal`)."""
    return assert_refusal(outcome_of(fn), *fragments)


class TookTooLong(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Interrupt the block with TookTooLong after ``seconds`` (SIGALRM; main thread, POSIX)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- the CLI ---------------------------------------------------------------------------------------

def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``secateurs ARGV`` in-process; an exception escaping ``main`` fails the test."""
    argv = [str(a) for a in argv]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit 2 through SystemExit
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: B036 - report what escaped instead of exit 2
        out, err = capsys.readouterr()
        pytest.fail(f"secateurs {' '.join(argv)} raised {type(exc).__name__}: {str(exc)[:300]} "
                    f"(stderr: {err[-300:]!r})")
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit status 2 and exactly one non-empty ``secateurs: error:`` line on stderr."""
    assert code == 2, f"exit status {code}, stderr: {err[-500:]!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one stderr line, got {len(lines)}: {err[-500:]!r}"
    line = lines[0]
    assert line.startswith("secateurs: error:") and line[len("secateurs: error:"):].strip(), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def cli_command(*args: Any) -> list[str]:
    """``python -m secateurs.cli ARGS`` with the interpreter running the tests (the venv's)."""
    return [sys.executable, "-m", "secateurs.cli", *(str(a) for a in args)]


def subprocess_env() -> dict[str, str]:
    """One compute thread per child: two children share two cores without oversubscription."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_subprocess(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# ---- comparing folders -----------------------------------------------------------------------------

def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (``root`` itself too) -> content hash, ``dir`` or ``link -> target``.

    Symlinks are recorded, not followed; a missing ``root`` gives ``{}``.
    """
    if not root.exists() and not root.is_symlink():
        return {}
    entries: dict[str, str] = {}
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
    for p in paths:
        rel = str(p.relative_to(root.parent))
        if p.is_symlink():
            entries[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return entries


def new_entries(root: Path, before: set[str]) -> list[str]:
    """Entries of ``root`` not in ``before``, ignoring empty hidden lock files (``.NAME.lock``)."""
    found = []
    for p in root.iterdir():
        if p.name in before:
            continue
        if p.name.startswith(".") and p.name.endswith(".lock") and p.is_file() and p.stat().st_size == 0:
            continue
        found.append(p.name)
    return sorted(found)
