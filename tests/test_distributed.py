"""The trainer under a real ``torchrun`` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import needs

pytestmark = [needs("sklearn"), pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch.utils.data import TensorDataset
    from secateurs.data import load_dataset
    from secateurs.masks import effective_state_dict
    from secateurs.train import FinetuneConfig, finetune
    from secateurs.zoo import DigitsCNN

    out = sys.argv[1]
    split = load_dataset("digits")
    train = TensorDataset(split.x_train[:640], split.y_train[:640])
    val = TensorDataset(split.x_test, split.y_test)
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    config = FinetuneConfig(epochs=2, batch_size=32, progress=False, checkpoint_dir=os.path.join(out, "ckpt"),
                            regularize="group-lasso", reg_strength=1e-4, gradual_sparsity=0.5)
    result = finetune(model, train, val=val, config=config)
    rank = result.rank
    # the test harness, not the trainer, records what each rank ended with
    torch.save(effective_state_dict(model)[0], os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": result.world_size, "final": result.final, "history": result.history}, f)
""")


# A rare abort while a gloo rank tears down at interpreter exit, after all work is done
# (upstream: pytorch/pytorch#190489). Seen once in ~50 runs; one retry keeps CI honest about
# everything else while any other failure, or the same one twice, still fails the test.
TEARDOWN_ABORT = "terminate called without an active exception"


def _torchrun(args: list[str], tmp_path: Path, outputs: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    for attempt in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or attempt == 1 or TEARDOWN_ABORT not in proc.stderr:
            return proc
        for pattern in outputs:  # start the retry from a clean directory
            for p in tmp_path.glob(pattern):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return proc


def test_two_process_ddp_ranks_end_identical(tmp_path):
    (tmp_path / "train_ddp.py").write_text(SCRIPT)
    proc = _torchrun(["train_ddp.py", str(tmp_path)], tmp_path, outputs=("rank*", "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["final"] == r1["final"]  # evaluation is all-reduced: both ranks see the whole held-out set
    assert r0["final"]["examples"] == 359
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # weights and BatchNorm statistics
    assert (w0["features.3.weight"] == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    # batch_size is the global batch: each rank took 16 of every 32, half of the 640 images per epoch, in the
    # 20 steps one process would take
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]] == [20, 40]
    assert r0["history"][0]["train_accuracy"] == r1["history"][0]["train_accuracy"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.pt"]  # rank 0 wrote, atomically


def test_cli_finetune_under_torchrun_writes_once(tmp_path):
    import secateurs
    from secateurs.zoo import DigitsCNN

    torch.manual_seed(0)
    secateurs.save(DigitsCNN(), tmp_path / "dense", input_shape=[1, 1, 8, 8])
    proc = _torchrun(["-m", "secateurs.cli", "finetune", str(tmp_path / "dense"), "--data", "digits",
                      "--epochs", "1", "--out", str(tmp_path / "ft"), "--json"], tmp_path,
                    outputs=("ft", "ft.ckpt", ".*"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # only rank 0 printed (one JSON object)
    assert summary["world_size"] == 2 and summary["final"]["examples"] == 359
    # 1438 training images at the default global batch of 64: the 23 steps of one process, told once
    assert summary["history"][0]["step"] == 23
    assert proc.stderr.count("epoch 1/1:") == 1, proc.stderr[-2000:]
    model = secateurs.load(tmp_path / "ft")
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert not (tmp_path / "ft.ckpt").exists()  # default checkpoints are removed once saved
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
