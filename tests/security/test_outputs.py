"""Never delete what secateurs did not write: --overwrite, finetune's checkpoints, races and kills."""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from security_helpers import (
    CNN,
    assert_one_line_error,
    cli_command,
    run_cli,
    run_subprocess,
    saved_model,
    subprocess_env,
    tree_digest,
)

import secateurs
from conftest import has, needs

PRUNE = ["prune", CNN, "--input-shape", "1,1,8,8", "--method", "unstructured", "--sparsity", "0.5", "--no-latency"]
FINETUNE = ["--data", "digits", "--epochs", "1", "--batch-size", "256"]


@pytest.fixture
def one_thread():
    """Training tests run on one thread: two cores are shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- B1: --overwrite replaces our model, never the user's files ------------------------------------

def test_overwrite_refuses_a_folder_of_user_files(tmp_path, capsys):
    out = tmp_path / "documents"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("\\chapter{Years of work}\n")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = tree_digest(out)
    code, _, err = run_cli([*PRUNE, "--out", out, "--overwrite"], capsys)
    assert tree_digest(out) == before
    assert_one_line_error(code, err)


def test_overwrite_keeps_a_file_the_user_added_to_a_model_folder(tmp_path, capsys):
    out = saved_model(tmp_path / "m")
    notes = out / "notes.txt"
    notes.write_text("my notes about this model\n")
    before = tree_digest(out)
    code, _, err = run_cli([*PRUNE, "--out", out, "--overwrite"], capsys)
    assert notes.is_file() and notes.read_text() == "my notes about this model\n", "the user's notes.txt is gone"
    if code == 2:
        assert_one_line_error(code, err)
        assert tree_digest(out) == before
    else:
        assert code == 0, err
        secateurs.load(out)


# ---- B2: finetune's output and checkpoint folders --------------------------------------------------

def finetune(capsys, model: Path, out: Path, *extra):
    return run_cli(["finetune", model, *FINETUNE, "--out", out, *extra], capsys)


@needs("sklearn")
@pytest.mark.usefixtures("one_thread")
def test_finetune_never_deletes_an_input_named_like_its_default_checkpoint_folder(tmp_path, capsys):
    ckpt_named = tmp_path / "f.ckpt"
    shutil.copytree(saved_model(tmp_path / "src"), ckpt_named)
    before = tree_digest(ckpt_named)
    code, _, err = finetune(capsys, ckpt_named, tmp_path / "f")
    assert tree_digest(ckpt_named) == before, "the input model f.ckpt was changed or deleted"
    assert_one_line_error(code, err)
    assert not (tmp_path / "f").exists()


@needs("sklearn")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_finetune_out_equal_to_the_teacher_is_refused(tmp_path, capsys, overwrite):
    model = saved_model(tmp_path / "student")
    teacher = saved_model(tmp_path / "teacher", seed=1)
    before = tree_digest(teacher)
    code, _, err = finetune(capsys, model, teacher, "--teacher", teacher, *(["--overwrite"] if overwrite else []))
    assert tree_digest(teacher) == before, "the teacher was changed"
    assert_one_line_error(code, err)


@needs("sklearn")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_finetune_checkpoint_dir_overlapping_the_model_is_refused(tmp_path, capsys, where):
    model = saved_model(tmp_path / "models" / "m")
    ckpt = {"equal": model, "inside": model / "ckpt", "containing": model.parent}[where]
    before = tree_digest(model.parent)
    out = tmp_path / "out"
    code, _, err = finetune(capsys, model, out, "--checkpoint-dir", ckpt)
    assert tree_digest(model.parent) == before, "the model folder (or its parent) was written to"
    assert_one_line_error(code, err)
    assert not out.exists()


@needs("sklearn")
@pytest.mark.usefixtures("one_thread")
def test_finetune_keeps_user_files_in_an_existing_default_checkpoint_folder(tmp_path, capsys):
    model = saved_model(tmp_path / "src")
    mine = tmp_path / "out.ckpt" / "mine.txt"
    mine.parent.mkdir()
    mine.write_text("not a checkpoint\n")
    code, _, err = finetune(capsys, model, tmp_path / "out")
    assert mine.is_file() and mine.read_text() == "not a checkpoint\n", "the user's file in out.ckpt/ is gone"
    if code == 2:
        assert_one_line_error(code, err)
    else:
        assert code == 0, err
        secateurs.load(tmp_path / "out")


# ---- B3: two writers of one --out ------------------------------------------------------------------

# --report renders an HTML page while the output is being written: a wide window for the race and the kills.
REPORT = ["--report"] if has("matplotlib") else []


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], REPORT], ids=["plain", "with-report"])
def test_two_concurrent_prunes_to_one_out_never_both_succeed(tmp_path, extra):
    out = tmp_path / "same"
    args = cli_command(*PRUNE, *extra, "--out", out)
    procs = [subprocess.Popen(args, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        results.append((p.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], f"exit statuses {codes}: {[err[-300:] for _, err in results]}"
    assert_one_line_error(2, next(err for code, err in results if code == 2))
    secateurs.load(out)


# ---- B4: SIGKILL at random moments -----------------------------------------------------------------

def weight_of(folder: Path) -> torch.Tensor:
    return secateurs.load(folder).features[3].weight.detach().clone()


def timed_run(args: list, cwd: Path, out: Path) -> tuple[float, float]:
    """Run to completion; return (seconds until ``out`` appeared, seconds in all)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err)
        appeared = None
        while proc.poll() is None:
            if appeared is None and out.exists():
                appeared = time.perf_counter() - start
            time.sleep(0.005)
        err.seek(0)
        assert proc.returncode == 0, err.read()[-1000:]
    total = time.perf_counter() - start
    return (appeared if appeared is not None else total), total


@pytest.mark.slow
def test_a_prune_killed_at_any_moment_leaves_the_old_or_the_new_model(tmp_path):
    src = saved_model(tmp_path / "src", seed=1)
    target = saved_model(tmp_path / "D", seed=0)
    prune_args = [*PRUNE[:1], src, *PRUNE[2:], *REPORT]  # the saved folder as MODEL
    # One full run gives the new model and the moment its folder appears (the end of the writing).
    written, duration = timed_run(cli_command(*prune_args, "--out", tmp_path / "ref"), tmp_path, tmp_path / "ref")
    old, new = weight_of(target), weight_of(tmp_path / "ref")
    assert not torch.equal(old, new)

    rng = random.Random(0)
    # One kill anywhere before the writing; the others around it, when the files are being written.
    delays = [rng.uniform(0.0, written), *(rng.uniform(written - 1.0, written + 0.1) for _ in range(3))]
    for delay in delays:
        proc = subprocess.Popen(cli_command(*prune_args, "--out", target, "--overwrite"), cwd=tmp_path,
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(max(delay, 0.0))
        proc.kill()
        proc.wait(timeout=60)
        where = f"killed after {delay:.2f} s (the output appears after {written:.2f} s of {duration:.2f} s)"
        assert target.is_dir(), f"{where}: the output folder is gone"
        now = weight_of(target)
        assert torch.equal(now, old) or torch.equal(now, new), f"{where}: neither the old nor the new model"

    done = run_subprocess(cli_command(*prune_args, "--out", target, "--overwrite"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert torch.equal(weight_of(target), new)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".D.tmp-", ".D.old-"))]
    assert leftovers == [], f"an interrupted run's folders were not cleaned up: {leftovers}"
