"""Atomic replacement, the output lock and the cleanup of what interrupted runs left."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import secateurs
from secateurs.errors import SecateursError
from secateurs.io import atomic
from secateurs.io.atomic import MARKER, PARTIAL, atomic_dir, output_lock
from secateurs.zoo import DigitsCNN


def _arch(width):
    return {"kind": "factory", "target": "secateurs.zoo:DigitsCNN", "kwargs": {"width": width}}


def _saved(path, width=8):
    torch.manual_seed(width)
    model = DigitsCNN(width=width)
    secateurs.save(model, path, arch=_arch(width))
    return model


def test_overwrite_swaps_in_place_and_leaves_nothing_beside(tmp_path):
    _saved(tmp_path / "m", width=8)
    inode_parent = sorted(os.listdir(tmp_path))
    new = _saved(tmp_path / "other", width=4)
    secateurs.save(new, tmp_path / "m", arch=_arch(4), overwrite=True)
    assert secateurs.load(tmp_path / "m").features[0].out_channels == 4
    assert sorted(os.listdir(tmp_path)) == sorted([*inode_parent, "other"])  # no .tmp/.old/.lock left


def test_exchange_is_used_where_available(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_two_rename_fallback_replaces_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _saved(tmp_path / "m", width=8)
    secateurs.save(DigitsCNN(width=4), tmp_path / "m", arch=_arch(4), overwrite=True)
    assert secateurs.load(tmp_path / "m").features[0].out_channels == 4
    assert os.listdir(tmp_path) == ["m"]


def test_a_failure_while_writing_keeps_the_old_model(tmp_path):
    old = _saved(tmp_path / "m", width=8)
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(tmp_path / "m", overwrite=True) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(secateurs.load(tmp_path / "m")(x), old.eval()(x))
    assert os.listdir(tmp_path) == ["m"]


def test_leftovers_of_killed_runs_are_cleaned_and_reported(tmp_path, caplog):
    _saved(tmp_path / "m", width=8)
    partial = tmp_path / ".m.tmp-abc12345"  # killed while writing
    partial.mkdir()
    (partial / PARTIAL).touch()
    (partial / "model.safetensors").write_bytes(b"half")
    swapped = tmp_path / ".m.tmp-def45678"  # killed after the exchange: the old model
    swapped.mkdir()
    (swapped / MARKER).write_text("{}")
    stray_file = tmp_path / ".m.tmp-k3j4h5g6"  # a temporary file of write_files_atomically
    stray_file.write_bytes(b"x")
    unrelated = tmp_path / ".m.tmp-mine1234"  # not ours: no marker, no manifest
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep")
    named_like_ours = tmp_path / ".m.tmp-my backup"  # a model, but not a name tempfile makes
    _saved(named_like_ours)
    alive = tmp_path / f".m.old-{os.getpid()}"  # a backup whose process still runs is not stale
    _saved(alive)
    with caplog.at_level(logging.WARNING, logger="secateurs.io.atomic"):
        secateurs.save(DigitsCNN(width=4), tmp_path / "m", arch=_arch(4), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, ".m.tmp-mine1234", ".m.tmp-my backup", "m"])
    assert (unrelated / "notes.txt").read_text() == "keep"
    assert sum("interrupted run" in r.getMessage() for r in caplog.records) == 3


def test_a_backup_left_by_the_two_rename_fallback_is_restored(tmp_path, caplog):
    old = _saved(tmp_path / "m", width=8)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(tmp_path / "m", tmp_path / f".m.old-{gone.stdout.strip()}")  # killed between the two renames
    with caplog.at_level(logging.WARNING, logger="secateurs.io.atomic"), pytest.raises(SecateursError, match="--overwrite"):
        secateurs.save(DigitsCNN(width=4), tmp_path / "m", arch=_arch(4))  # refused: the restored model is there again
    assert "restored" in caplog.text
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(secateurs.load(tmp_path / "m")(x), old.eval()(x))


def test_overwrite_refuses_folders_with_files_we_did_not_write(tmp_path):
    _saved(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(SecateursError, match="notes.txt"):
        secateurs.save(DigitsCNN(width=8), tmp_path / "m", arch=_arch(8), overwrite=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    manifest = json.loads((tmp_path / "m" / MARKER).read_text())
    assert manifest["files"] == ["model.safetensors", "secateurs.json"]


def test_the_lock_is_exclusive_across_processes_and_reentrant_within_one(tmp_path):
    target = tmp_path / "out"
    holder = ("import time\nfrom secateurs.io.atomic import output_lock\n"
              f"with output_lock({str(target)!r}):\n    print('locked', flush=True)\n    time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(SecateursError, match=f"being written by another secateurs run \\(pid {proc.pid}\\)"):
            with output_lock(target):
                pass
    finally:
        proc.kill()
        proc.wait()
    with output_lock(target), output_lock(target):  # the holder died: the lock is free again
        assert (tmp_path / ".out.lock").exists()
    assert not (tmp_path / ".out.lock").exists()


def test_lock_never_writes_through_a_symlink_or_hard_link(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("user data")
    (tmp_path / ".out.lock").symlink_to(precious)
    with pytest.raises(SecateursError, match="symlink"), output_lock(tmp_path / "out"):
        pass
    (tmp_path / ".out.lock").unlink()
    os.link(precious, tmp_path / ".out.lock")
    with pytest.raises(SecateursError, match="not a lock file of ours"), output_lock(tmp_path / "out"):
        pass
    assert precious.read_text() == "user data"


def test_lock_creates_missing_parents_and_removes_them_when_unused(tmp_path):
    with output_lock(tmp_path / "a" / "b" / "out"):
        assert (tmp_path / "a" / "b").is_dir()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root writes into read-only folders")
def test_unwritable_location_is_one_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SecateursError, match="cannot write to"):
            with output_lock(ro / "out"):
                pass
    finally:
        ro.chmod(0o700)


def _cli_with_file_size_limit(args, cwd, limit_bytes):
    """Run the CLI in a child whose writes beyond ``limit_bytes`` fail with EFBIG, as on a full disk."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "secateurs.cli", *args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs preexec_fn and RLIMIT_FSIZE (POSIX)")
@pytest.mark.parametrize("command", [
    ["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "unstructured", "--sparsity", "0.5",
     "--no-latency", "--out", "out"],
    ["export", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--format", "torchscript", "--out", "out.ts"],
    ["export", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--format", "onnx", "--out", "out.onnx"],
], ids=["prune", "torchscript", "onnx"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, command):
    if command[-1] == "out.onnx":
        pytest.importorskip("onnx")
    result = _cli_with_file_size_limit(command, tmp_path, 64 * 1024)  # the model's weights take 430 KiB
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("secateurs: error:") and "Traceback" not in result.stderr
    assert "File too large" in lines[0]  # the write failed, and the message says which
    assert os.listdir(tmp_path) == []  # no output, no temporary file or folder, no lock
