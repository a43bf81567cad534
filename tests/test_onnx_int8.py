"""Static int8 ONNX export (onnxruntime), checked against the float file on held-out images."""

from __future__ import annotations

import copy
import doctest
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from conftest import needs
from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.io.export import export_model, run_exported

pytestmark = [needs("onnx"), needs("onnxruntime"), needs("sklearn")]
ARCH = {"kind": "factory", "target": "secateurs.zoo:DigitsCNN", "kwargs": {"width": 16}}  # how to rebuild it


@pytest.fixture(scope="module")
def digits_model():
    """A DigitsCNN trained just enough (full-batch Adam, a few seconds) to tell digits apart:
    a random one predicts nearly one class everywhere, which any quantization would "agree" with."""
    from secateurs.data import load_dataset
    from secateurs.zoo import DigitsCNN

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a busy machine
    try:
        for _ in range(30):
            loss = F.cross_entropy(model(data.x_train[:600]), data.y_train[:600])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        assert (model(data.x_test).argmax(1) == data.y_test).float().mean() > 0.7
    return model, data


@pytest.fixture
def int8_data():
    from secateurs.io.quantize import Int8Config, int8_batches

    return int8_batches("digits", [1, 1, 8, 8], Int8Config(calib_batches=4, held_out_batches=2))


def _outlier(model: nn.Module) -> nn.Module:
    """The same function in float, broken in int8: one hidden unit of the classifier is always about 1e5
    and feeds nothing, so the per-tensor int8 range of that layer's outputs rounds every other unit to 0."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.classifier[0].bias[0] += 1e5
        model.classifier[2].weight[:, 0] = 0.0
    return model


def test_cli_int8_export_is_smaller_runs_agrees_and_analyzes(digits_model, tmp_path, capsys):
    import onnx

    model, data = digits_model
    saved = tmp_path / "trained"
    secateurs.save(model, saved, input_shape=[1, 1, 8, 8], arch=ARCH)
    out = tmp_path / "m.onnx"
    assert main(["export", str(saved), "--format", "onnx", "--int8", "--data", "digits", "--calib-batches", "4",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    q = result["int8"]
    assert q["check"] == "top1" and q["threshold"] == 0.9 and q["agreement"] >= 0.9
    assert q["calibration_examples"] == 128 and q["held_out_examples"] == 128 and q["int8_layers"] == 5
    assert result["size_bytes"] == out.stat().st_size < 0.5 * q["float_size_bytes"]
    graph = onnx.load(str(out)).graph  # really int8: quantized weights behind DequantizeLinear nodes
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= 5
    assert sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2 for i in graph.initializer) == 5
    x = data.x_test[:64]
    got = run_exported(out, (x,))  # onnxruntime runs it, at any batch size
    assert got.shape == (64, 10)
    with torch.no_grad():
        assert (got.argmax(1) == model(x).argmax(1)).float().mean() >= 0.9
    assert main(["analyze", str(out), "--json"]) == 0  # the latency of the int8 file
    stats = json.loads(capsys.readouterr().out)
    assert stats["input_shape"] == [1, 1, 8, 8] and stats["latency_ms"] > 0 and stats["size_bytes"] == result["size_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "trained"]  # no float or temporary file left


def test_cli_int8_below_min_agreement_is_refused_and_leaves_nothing(digits_model, tmp_path, capsys):
    model, _ = digits_model
    saved = tmp_path / "outlier"
    secateurs.save(_outlier(model), saved, input_shape=[1, 1, 8, 8], arch=ARCH)
    out = tmp_path / "m.onnx"
    args = ["export", str(saved), "--format", "onnx", "--int8", "--data", "digits", "--calib-batches", "2", "--out",
            str(out)]
    assert main(args) == 2  # the default --min-agreement 0.9
    err = capsys.readouterr().err
    assert "top-1 class on only" in err and "--min-agreement" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outlier"]
    assert main([*args, "--min-agreement", "0", "--json"]) == 0  # the user accepts the loss
    agreement = json.loads(capsys.readouterr().out)["int8"]["agreement"]
    assert agreement < 0.5 and out.is_file()


@pytest.mark.parametrize("extra, message", [
    (["--int8"], "pass --data"),
    (["--int8", "--data", "digits", "--format", "torchscript"], "use --format onnx"),
    (["--data", "digits"], "add --int8"),
    (["--int8", "--data", "digits", "--half"], "choose one"),
    (["--int8", "--data", "pydoc"], "not usable here"),
    (["--int8", "--data", "imagefolder:/no/such/folder"], "does not exist"),
    (["--int8", "--data", "digits", "--min-agreement", "1.5"], "min_agreement"),
])
def test_cli_int8_bad_input_is_one_line_before_loading_the_model(extra, message, tmp_path, capsys):
    args = ["export", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "m.onnx"), *extra]
    if "--format" not in extra:
        args += ["--format", "onnx"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-model" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_layer_onnxruntime_cannot_quantize_is_refused(int8_data, tmp_path):
    class ConvGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.gru = nn.GRU(32, 16, batch_first=True)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = self.conv(x).flatten(1, 2).transpose(1, 2)  # (N, 8 rows, 4 * 8 features)
            return self.head(self.gru(rows)[0][:, -1])

    from secateurs.io.quantize import Int8Config

    calib, held_out = int8_data
    torch.manual_seed(0)
    with pytest.raises(SecateursError, match="GRU") as info:
        export_model(ConvGRU().eval(), calib[0][:1], tmp_path / "g.onnx", int8=Int8Config(), data=calib,
                     held_out=held_out)
    assert "export without --int8" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_are_not_class_scores_get_the_relative_error_check(int8_data, tmp_path):
    from secateurs.io.quantize import Int8Config

    calib, held_out = int8_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1)).eval()
    result = export_model(model, calib[0][:1], tmp_path / "c.onnx", int8=Int8Config(), data=calib, held_out=held_out)
    q = result.int8
    assert q["check"] == "relative" and q["agreement"] is None and 0 < q["rel_error"] <= q["threshold"] == 0.2
    assert q["held_out_examples"] == sum(len(b) for b in held_out)
    out = run_exported(tmp_path / "c.onnx", (held_out[0],))
    assert out.shape == (len(held_out[0]), 2, 8, 8)
    with pytest.raises(SecateursError, match="relative"):
        export_model(model, calib[0][:1], tmp_path / "strict.onnx", int8=Int8Config(max_rel_error=1e-6),
                     data=calib, held_out=held_out)
    assert not (tmp_path / "strict.onnx").exists()


def test_int8_batches_are_disjoint_and_shaped(int8_data):
    calib, held_out = int8_data
    assert [len(b) for b in calib] == [32] * 4 and [len(b) for b in held_out] == [32] * 2
    assert all(b.shape[1:] == (1, 8, 8) for b in calib + held_out)
    a, b = torch.cat(calib).flatten(1), torch.cat(held_out).flatten(1)
    assert not (torch.cdist(a, b) == 0).any()  # no held-out image was calibrated on


def test_int8_config_and_arguments_are_checked(tmp_path):
    import secateurs.io.quantize as quantize
    from secateurs.io.quantize import Int8Config

    assert doctest.testmod(quantize).failed == 0
    for bad in (dict(calib_batches=0), dict(min_agreement=1.5), dict(max_rel_error=0.0), dict(format="qint"),
                dict(activations="int4"), dict(check="top5"), dict(calibration="mse")):
        with pytest.raises(SecateursError):
            Int8Config(**bad)
    model, x = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), torch.randn(2, 1, 8, 8)
    with pytest.raises(SecateursError, match="calibration and held-out"):
        export_model(model, x, tmp_path / "m.onnx", int8=Int8Config())
    with pytest.raises(SecateursError, match="--format onnx"):
        export_model(model, x, tmp_path / "m.ts", format="torchscript", int8=Int8Config(), data=[x], held_out=[x])
    with pytest.raises(SecateursError, match="int8=Int8Config"):
        export_model(model, x, tmp_path / "m.onnx", data=[x])
    with pytest.raises(SecateursError, match="the model takes"):  # batches at another input shape
        export_model(model, x, tmp_path / "m.onnx", int8=Int8Config(), data=[torch.randn(4, 1, 4, 4)], held_out=[x])
    assert list(tmp_path.iterdir()) == []
