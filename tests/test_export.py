"""BatchNorm folding and deployment export (ONNX, TorchScript, torch.export), checked by running the files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs
from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.io.export import export_model, run_exported
from secateurs.surgery.fold import fold_batchnorm_, foldable_pairs
from secateurs.zoo import DigitsCNN, SmallResNet


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics so folding has something to get wrong."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


def test_fold_keeps_outputs_and_removes_every_batchnorm():
    model = _randomize_bn(SmallResNet(width=8, blocks=2))
    x = torch.randn(3, 1, 28, 28)
    before = model(x).detach()
    pairs = fold_batchnorm_(model, x)
    assert len(pairs) == 15  # stem, two downsamples, and two per block
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.stem[0].bias is not None  # a bias-free conv gains the folded shift
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_fold_skips_a_norm_that_does_not_read_a_conv_output():
    class PreNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn0 = nn.BatchNorm2d(3)  # reads the input, not a conv
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()
            self.bn1 = nn.BatchNorm2d(4)  # reads ReLU's output: not foldable into the conv

        def forward(self, x):
            return self.bn1(self.act(self.conv(self.bn0(x))))

    model = _randomize_bn(PreNorm())
    assert foldable_pairs(model, torch.randn(1, 3, 8, 8)) == []
    model.act = nn.ReLU(inplace=True)  # same tensor object, changed in place: still not the conv's output
    assert foldable_pairs(model, torch.randn(1, 3, 8, 8)) == []


def test_fold_leaves_a_shared_conv_output_alone_and_folds_the_rest():
    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.conv2 = nn.Conv2d(3, 3, 1)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            y = self.bn(y) + y  # y is used twice: folding would change the bypass
            return self.bn2(self.conv2(y))

    model = _randomize_bn(Bypass())
    x = torch.randn(2, 3, 4, 4)
    before = model(x).detach()
    conv_weight = model.conv.weight.detach().clone()
    assert fold_batchnorm_(model, x) == [("conv2", "bn2")]
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    assert torch.equal(model.conv.weight, conv_weight)  # the unfoldable pair is as it was
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


@needs("onnx")
@needs("onnxruntime")
@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".ts"), ("pt2", ".pt2")])
def test_export_formats_run_with_the_same_outputs(fmt, suffix, tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(DigitsCNN())
    x = torch.randn(1, 1, 8, 8)  # a batch of one, as the CLI's example inputs usually are
    secateurs.prune_(model, secateurs.Channels(ratio=0.5), example_inputs=x)
    secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5))  # live masks are baked into the copy
    path = tmp_path / f"m{suffix}"
    result = export_model(model, x, path, format=fmt, fold_bn=True)
    assert result.folded and result.max_abs_diff <= result.tolerance
    assert secateurs.get_mask(model.features[3]) is not None  # the caller's model is untouched
    batch5 = torch.randn(5, 1, 8, 8)  # the batch dimension is dynamic
    torch.testing.assert_close(run_exported(path, (batch5,), trust_pickle=True), model(batch5).detach(),
                               rtol=1e-4, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any other file, not mkstemp's 0600


@needs("onnx")
@needs("onnxruntime")
def test_half_onnx_export_is_checked(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(DigitsCNN())
    x = torch.randn(2, 1, 8, 8)
    result = export_model(model, x, tmp_path / "h.onnx", format="onnx", fold_bn=True, half=True)
    assert result.half and result.max_abs_diff <= result.tolerance
    full = export_model(model, x, tmp_path / "f.onnx", format="onnx")
    assert result.size_bytes < 0.6 * full.size_bytes


def test_export_errors(tmp_path):
    model, x = DigitsCNN().eval(), torch.randn(1, 1, 8, 8)
    with pytest.raises(SecateursError, match="must end in .onnx"):
        export_model(model, x, tmp_path / "m.pt", format="onnx")
    (tmp_path / "m.ts").write_text("keep me")
    with pytest.raises(SecateursError, match="--overwrite"):
        export_model(model, x, tmp_path / "m.ts", format="torchscript")
    assert (tmp_path / "m.ts").read_text() == "keep me"
    with pytest.raises(SecateursError, match="unknown export format"):
        export_model(model, x, tmp_path / "m.x", format="tflite")


@needs("onnx")
@needs("onnxruntime")
def test_cli_export_and_analyze_the_file(tmp_path, capsys):
    saved = tmp_path / "pruned"
    torch.manual_seed(0)
    model = DigitsCNN()
    secateurs.prune_(model, secateurs.Channels(ratio=0.5), example_inputs=torch.randn(1, 1, 8, 8))
    secateurs.save(model, saved, input_shape=[1, 1, 8, 8])
    out = tmp_path / "m.onnx"
    assert main(["export", str(saved), "--format", "onnx", "--fold-bn", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folded_batchnorms"] == 3 and out.is_file()
    assert main(["analyze", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["input_shape"] == [1, 1, 8, 8] and stats["latency_ms"] > 0
    folded = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # each folded BatchNorm's scale and shift become one conv bias; a few shape constants may be stored too
    assert 0 <= stats["params"] - (sum(p.numel() for p in model.parameters()) - folded) <= 16
    assert main(["export", str(saved), "--format", "onnx", "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_pickled_exports_need_trust_and_corrupt_files_fail_cleanly(tmp_path, capsys):
    torch.manual_seed(0)
    model, x = DigitsCNN().eval(), torch.randn(2, 1, 8, 8)
    pt2 = tmp_path / "m.pt2"
    export_model(model, x, pt2, format="pt2")
    with pytest.raises(SecateursError, match="--trust-pickle"):
        run_exported(pt2, (x,))
    assert main(["analyze", str(pt2), "--json"]) == 2  # refused before anything is unpickled
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["analyze", str(pt2), "--trust-pickle", "--json"]) == 0  # the archive records its input shape
    assert json.loads(capsys.readouterr().out)["input_shape"] == [2, 1, 8, 8]
    for name in ("junk.onnx", "junk.ts", "junk.pt2"):
        (tmp_path / name).write_bytes(b"not a model at all")
        assert main(["analyze", str(tmp_path / name), "--trust-pickle", "--input-shape", "1,1,8,8"]) == 2
        err = capsys.readouterr().err
        assert "cannot read" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_export_with_inputs_the_model_cannot_take_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["export", "secateurs.zoo:DigitsCNN", "--input-shape", "1,3,8,8", "--format", "onnx",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("secateurs: error: the model's forward failed on the example inputs (RuntimeError: ")
    assert err.rstrip().endswith("check the example inputs (--input-shape)")
    assert not out.exists() and os.listdir(tmp_path) == []
