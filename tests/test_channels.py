"""Structured channel pruning, the method: ratios, goals, selection, reports, importance, save/load, CLI."""

import copy
import json

import pytest
import torch

import secateurs
from conftest import Mixed, SeedConvNet, assert_same_model, needs
from secateurs import Channels, SecateursError
from secateurs.cli import main
from secateurs.zoo import DigitsCNN


def test_seed_convnet_conv1_to_32_channels():
    torch.manual_seed(0)
    model = SeedConvNet()
    x = torch.randn(1, 3, 16, 16)
    scores = model.conv1.weight.abs().sum(dim=(1, 2, 3))
    secateurs.prune_(model, Channels(ratio=0.5, importance="l1"), example_inputs=x)
    assert model.conv1.out_channels == 32 and model.conv1.weight.shape == (32, 3, 3, 3)
    assert model.conv2.in_channels == 32 and model.conv2.weight.shape == (128, 32, 3, 3)
    assert model.conv2.out_channels == 128  # coupled to the model output: kept
    assert model(x).shape == (1, 128, 16, 16)
    assert scores.numel() == 64


def test_ratio_round_to_and_never_zero_width(cnn, digits_input):
    secateurs.prune_(cnn, Channels(ratio=0.7, round_to=8), example_inputs=digits_input)
    widths = [cnn.features[0].out_channels, cnn.features[3].out_channels, cnn.features[7].out_channels,
              cnn.classifier[0].out_features]
    assert all(w % 8 == 0 and w > 0 for w in widths), widths
    cnn2 = DigitsCNN()
    secateurs.prune_(cnn2, Channels(ratio=0.99), example_inputs=digits_input)
    assert cnn2.features[0].out_channels >= 1 and cnn2(digits_input).shape == (4, 10)


def test_global_ranking_and_target_macs(cnn, digits_input):
    base = secateurs.analyze(cnn, digits_input, latency=False).macs
    report = secateurs.prune_(cnn, Channels(target_macs=0.5, scope="global"), example_inputs=digits_input)
    macs = secateurs.analyze(cnn, digits_input, latency=False).macs
    assert 0.35 * base <= macs <= 0.5 * base
    assert 0 < report.outcome["achieved_ratio"] < 0.9
    sizes = [layer.numel - layer.zeros for layer in report.layers]
    assert all(s >= 1 for s in sizes)


def test_reports_say_what_happened(cnn, digits_input):
    """achieved_ratio counts the channels really removed; a report of several steps spans all of them."""
    before = [layer.numel for layer in secateurs.prune_(
        copy.deepcopy(cnn), Channels(ratio=0.0), example_inputs=digits_input).layers]
    nothing = secateurs.prune_(copy.deepcopy(cnn), Channels(ratio=0.5, round_to=1000), example_inputs=digits_input)
    assert nothing.outcome["achieved_ratio"] == 0.0 and nothing.zeros == 0
    report = secateurs.prune_(cnn, Channels(ratio=0.5, steps=2), example_inputs=digits_input)
    assert [layer.numel for layer in report.layers] == before  # widths before the first step
    assert [layer.numel - layer.zeros for layer in report.layers] == [
        cnn.features[0].out_channels, cnn.features[3].out_channels, cnn.features[7].out_channels,
        cnn.classifier[0].out_features]  # and after the last
    assert report.outcome["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
    assert len(report.outcome["steps_detail"]) == 2 and all(0.2 < r < 0.4 for r in report.outcome["steps_detail"])


def test_ignore_keeps_a_layer_whole(cnn, digits_input):
    secateurs.prune_(cnn, Channels(ratio=0.5, ignore=["features.3"]), example_inputs=digits_input)
    assert cnn.features[3].weight.shape == (64, 32, 3, 3)  # its inputs and outputs both stay
    assert cnn.features[7].out_channels == 64


def test_include_prunes_only_the_named_layers_group(cnn, digits_input):
    secateurs.prune_(cnn, Channels(ratio=0.5, include=["features.0"]), example_inputs=digits_input)
    assert cnn.features[0].out_channels == 16 and cnn.features[3].in_channels == 16
    assert cnn.features[3].out_channels == 64 and cnn.features[7].out_channels == 128


@pytest.mark.parametrize("kwargs, fragment", [
    ({"ratio": 1.0}, "[0, 1)"), ({}, "exactly one"), ({"ratio": 0.5, "target_macs": 0.5}, "exactly one"),
    ({"target_macs": 0.0}, "(0, 1]"), ({"ratio": 0.5, "importance": "magic"}, "unknown importance"),
    ({"ratio": 0.5, "round_to": 0}, "round_to"),
    ({"ratio": 0.5, "prune_output_layer": True}, "output width"),
])
def test_bad_channel_configs(kwargs, fragment):
    with pytest.raises(SecateursError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Channels(**kwargs)


def test_example_inputs_are_required(cnn):
    with pytest.raises(SecateursError, match="example_inputs"):
        secateurs.prune_(cnn, Channels(ratio=0.5))


def test_pruned_model_saves_reloads_and_exports(cnn, digits_input, tmp_path):
    secateurs.prune_(cnn, Channels(ratio=0.5), example_inputs=digits_input)
    secateurs.prune_(cnn, secateurs.Unstructured(sparsity=0.5), example_inputs=digits_input)
    secateurs.save(cnn, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "secateurs.json").read_text())
    assert len(manifest["structure"]) == 1
    loaded = secateurs.load(tmp_path / "m")
    assert loaded.features[0].out_channels == 16
    assert_same_model(loaded, cnn, digits_input)
    secateurs.finalize_(loaded)
    exported = torch.export.export(loaded, (digits_input,))
    torch.testing.assert_close(exported.module()(digits_input), loaded(digits_input))


@needs("torchvision")
def test_resnet18_at_half_the_channels_is_physically_smaller_and_faster():
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 96, 96)
    before = secateurs.analyze(model, x, size=False)
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    after = secateurs.analyze(model, x, size=False)
    assert after.params < 0.3 * before.params and after.macs < 0.3 * before.macs
    assert model.conv1.out_channels == 32 and model.fc.in_features == 256 and model.fc.out_features == 1000
    assert model(x).shape == (1, 1000)


def test_cli_channel_method(tmp_path, capsys):
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "channel",
                 "--ratio", "0.5", "--round-to", "4", "--json", "--out", str(tmp_path / "c")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["after"]["params"] < 0.35 * result["before"]["params"]
    assert "plan" in result["pruning"]
    model = secateurs.load(tmp_path / "c")
    assert model.features[3].in_channels == 16
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--method", "channel", "--ratio", "1.2",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and not (tmp_path / "bad").exists()
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--method", "channel", "--sparsity", "0.2",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "does not apply" in capsys.readouterr().err


@needs("sklearn")
@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_driven_importance(importance, tmp_path, capsys):
    from secateurs.data import batches
    from secateurs.importance.stats import ActivationStats, TaylorStats

    torch.manual_seed(0)
    model = DigitsCNN()
    data = batches("digits", batch_size=32, input_shape=[1, 1, 8, 8], max_batches=4)
    stats = (TaylorStats(model).run(data, 4).scores if importance == "taylor"
             else ActivationStats(model).run(data, 4).per_channel())
    assert stats["features.0.weight"].shape[0] == 32 and bool((stats["features.0.weight"] >= 0).all())
    x = data[0][0][:2]
    before = [p.detach().clone() for p in model.parameters()]
    secateurs.prune_(model, Channels(ratio=0.5, importance=importance), example_inputs=x, data=data)
    assert model.features[0].out_channels == 16 and model(x).shape == (2, 10)
    assert len(before) == len(list(model.parameters()))
    with pytest.raises(SecateursError, match="data"):
        secateurs.prune_(DigitsCNN(), Channels(ratio=0.5, importance=importance), example_inputs=x)
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "channel",
                 "--ratio", "0.5", "--importance", importance, "--data", "digits", "--calib-batches", "2",
                 "--no-latency", "--out", str(tmp_path / "m")])
    assert code == 0 and secateurs.load(tmp_path / "m").features[0].out_channels == 16


@needs("onnx")
@needs("onnxruntime")
def test_pruned_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = Mixed(group_stats=False).eval()
    x = torch.randn(2, 3, 8, 8)
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_iterative_steps_reach_the_ratio(cnn, digits_input):
    report = secateurs.prune_(cnn, Channels(ratio=0.75, steps=3), example_inputs=digits_input)
    assert len(report.outcome["steps_detail"]) == 3
    assert cnn.features[0].out_channels == 8  # 32 * (1 - 0.75), reached in three re-scored steps
    assert cnn(digits_input).shape == (4, 10)


def test_a_macs_target_in_steps_reports_the_share_of_the_dense_model(cnn, digits_input):
    from secateurs.surgery.rehearsal import model_macs

    dense = model_macs(cnn, digits_input)
    report = secateurs.prune_(cnn, Channels(target_macs=0.4, steps=2), example_inputs=digits_input)
    achieved = report.outcome["achieved_macs"]
    assert achieved == pytest.approx(model_macs(cnn, digits_input) / dense, rel=1e-6)
    assert achieved <= 0.4 and report.outcome["target_met"]
