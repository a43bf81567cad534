"""One-shot recovery without training: bias compensation and BatchNorm recalibration."""

import copy

import pytest
import torch
from torch import nn

import secateurs
from secateurs import Channels, SecateursError
from secateurs.train import recalibrate_bn_


def _constant_channels(layer: nn.Module, count: int) -> None:
    """The first ``count`` output channels of ``layer`` output the constant 0.5 (zero weights, bias 0.5)."""
    with torch.no_grad():
        layer.weight[:count] = 0
        layer.bias[:count] = 0.5


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)  # 1x1: no padding, so the mean contribution is exact
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_compensation_makes_removing_constant_channels_exact():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        mlp[0].weight.mul_(10)
    _constant_channels(mlp[0], 4)
    x = torch.randn(32, 6)
    with torch.no_grad():
        before = mlp(x)

    plain = copy.deepcopy(mlp)
    secateurs.prune_(plain, Channels(ratio=0.25, importance="l1"), example_inputs=x)
    report = secateurs.prune_(mlp, Channels(ratio=0.25, importance="l1", compensate=True), example_inputs=x,
                              data=[x])
    assert mlp[2].in_features == 12 and report.outcome["compensated_layers"] == 1
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), before, rtol=1e-4, atol=1e-4)
        assert (plain(x) - before).abs().max() > 0.1  # without compensation the output moves


def test_compensation_goes_into_the_following_batchnorm_of_a_bias_free_conv():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.conv1.weight.mul_(10)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    _constant_channels(model.conv1, 2)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    secateurs.prune_(model, Channels(ratio=0.25, importance="l1", compensate=True, include=["conv1"]),
                     example_inputs=x, data=[x])
    assert model.conv2.in_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_recalibrated_batchnorm_holds_the_pruned_models_exact_statistics():
    torch.manual_seed(0)
    model = ConvBN().eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    secateurs.prune_(model, Channels(ratio=0.5, recalibrate_bn=True), example_inputs=data[0], data=data)
    seen = []
    hook = model.bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    with torch.no_grad():
        for x in data:
            model(x)
    hook.remove()
    inputs = torch.cat(seen).movedim(1, -1).reshape(-1, model.bn.num_features)
    torch.testing.assert_close(model.bn.running_mean, inputs.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, inputs.var(0), rtol=1e-3, atol=1e-4)
    assert model.bn.momentum == 0.1 and not model.training and not model.bn.training


def test_recalibration_without_data_fails_and_keeps_the_old_statistics():
    model = ConvBN()
    with torch.no_grad():
        model.bn.running_mean.fill_(3.0)
    with pytest.raises(SecateursError, match="at least one batch"):
        recalibrate_bn_(model, [])
    assert torch.equal(model.bn.running_mean, torch.full((8,), 3.0))
    with pytest.raises(SecateursError, match="pass data="):
        secateurs.prune_(model, Channels(ratio=0.5, compensate=True), example_inputs=torch.randn(1, 3, 6, 6))


def test_cli_compensate_and_recalibrate(tmp_path, capsys):
    import json

    from secateurs.cli import main

    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "channel",
                 "--ratio", "0.5", "--data", "digits", "--compensate", "--recalibrate-bn", "--calib-batches", "2",
                 "--no-latency", "--json", "--out", str(tmp_path / "c")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["config"]["compensate"] and result["config"]["recalibrate_bn"]
    assert result["outcome"]["compensated_layers"] >= 1
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "unstructured",
                 "--sparsity", "0.5", "--compensate", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--compensate does not apply" in capsys.readouterr().err
