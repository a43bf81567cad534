"""``secateurs finetune`` and ``secateurs prune --steps --finetune-epochs``."""

import json

import pytest
import torch

import secateurs
from conftest import needs
from secateurs.cli import main
from secateurs.zoo import DigitsCNN

pytestmark = needs("sklearn")


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks (e.g. counts of at least 1)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "sparse"
    torch.manual_seed(0)
    model = DigitsCNN()
    secateurs.prune_(model, secateurs.Unstructured(sparsity=0.7))
    secateurs.save(model, path, input_shape=[1, 1, 8, 8])
    return path


def test_finetune_trains_saves_and_keeps_masks(sparse_model, tmp_path, capsys):
    out_dir = tmp_path / "ft"
    code, out, err = run(["finetune", str(sparse_model), "--data", "digits", "--epochs", "3", "--lr", "0.05",
                          "--out", str(out_dir), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert summary["final"]["accuracy"] > 0.75 and summary["before"]["accuracy"] < 0.3
    report = json.loads((out_dir / "report.json").read_text())
    assert report["final"] == summary["final"]
    model = secateurs.load(out_dir)
    manifest = secateurs.read_manifest(out_dir)
    assert manifest["history"][-1]["method"] == "finetune"
    w = model.features[3].weight
    assert (w == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)  # masks survived training
    assert not (tmp_path / "ft.ckpt").exists()


def test_finetune_with_teacher_and_regulariser_and_resume(sparse_model, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = ["finetune", str(sparse_model), "--data", "digits", "--epochs", "1", "--teacher", str(sparse_model),
            "--regularize", "group-lasso", "--reg-strength", "1e-4", "--checkpoint-dir", str(ckpt)]
    code, _, err = run([*argv, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert (ckpt / "last.pt").is_file()  # an explicit checkpoint directory is kept
    # resuming a finished run trains nothing more and gives the same weights
    code, out, err = run([*argv, "--out", str(tmp_path / "b"), "--resume", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == 1
    a, b = secateurs.load(tmp_path / "a"), secateurs.load(tmp_path / "b")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_prune_in_steps_with_finetuning(tmp_path, capsys):
    code, out, err = run(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "channel",
                          "--ratio", "0.5", "--steps", "2", "--finetune-epochs", "2", "--data", "digits",
                          "--teacher", "dense", "--no-latency", "--out", str(tmp_path / "p"), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    steps = result["finetune_steps"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["accuracy"] > 0.3 for s in steps)
    assert result["pruning"]["config"]["steps"] == 2
    model = secateurs.load(tmp_path / "p")
    assert model.features[0].out_channels == 16  # two steps of 1 - sqrt(0.5) reach half the channels


ERRORS = [
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "imagefolder:/no/such/folder"], "does not exist"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "cifar"], "unknown data"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "digits", "--kd-weight", "0.5"], "--teacher"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "digits", "--teacher", "torch.nn:Linear"], "needs no"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "digits", "--epochs", "0"], "at least 1"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "digits", "--gradual-sparsity", "1.0"], "(0, 1)"),
    (["prune", "secateurs.zoo:DigitsCNN", "--method", "channel", "--ratio", "0.5", "--finetune-epochs", "1"],
     "labelled images"),
    (["prune", "secateurs.zoo:DigitsCNN", "--method", "nm", "--nm", "2:4", "--finetune-epochs", "1",
      "--data", "digits"], "channel method"),
    (["prune", "secateurs.zoo:DigitsCNN", "--method", "channel", "--ratio", "0.5", "--teacher", "dense"],
     "--finetune-epochs"),
]


@pytest.mark.parametrize("argv, fragment", ERRORS, ids=[" ".join(a[2:6]) for a, _ in ERRORS])
def test_bad_training_input_exits_2_with_one_line(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run([*argv, "--out", "out"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("secateurs") and "error:" in err and fragment in err, err
    assert out == "" and list(tmp_path.iterdir()) == []


def test_teacher_with_other_classes_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    torch.save(teacher, tmp_path / "teacher.pt")
    code, out, err = run(["finetune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--data", "digits",
                          "--teacher", str(tmp_path / "teacher.pt"), "--trust-pickle", "--out", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and "teacher outputs 3 classes but the model outputs 10" in err
    assert not (tmp_path / "o").exists()


@needs("torchvision")
def test_finetune_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, base in (("dark", 40), ("bright", 200)):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (base + torch.randint(-30, 30, (12, 12, 3), generator=gen)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    code, out, err = run(["finetune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--data",
                          f"imagefolder:{tmp_path / 'images'}", "--epochs", "3", "--batch-size", "8",
                          "--out", str(tmp_path / "ft"), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["final"]["examples"] == 8  # the val/ split
    assert summary["final"]["accuracy"] == 1.0  # dark vs bright is learnable in a few steps


def test_batch_size_is_the_global_batch_split_over_processes():
    from secateurs.errors import SecateursError
    from secateurs.train.trainer import _per_process, _World

    assert _per_process(32, _World(), given=True) == 32  # one process takes it all
    assert _per_process(32, _World(rank=1, size=2), given=True) == 16
    assert _per_process(64, _World(rank=0, size=4), given=False) == 16
    with pytest.raises(SecateursError, match="multiple of 2.*--batch-size"):
        _per_process(33, _World(rank=0, size=2), given=True)
    with pytest.raises(SecateursError, match="multiple of 8"):
        _per_process(4, _World(rank=0, size=8), given=True)
    assert _per_process(4, _World(rank=0, size=8), given=False) == 1  # a default shares what it can
    assert _per_process(64, _World(rank=0, size=3), given=False) == 21
