"""Channel pruning to a measured latency target (never slower than the dense model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
import secateurs.analysis
from secateurs.errors import SecateursError


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()


def _fake_clock(monkeypatch, per_param: float) -> None:
    """Latency as a function of the parameter count: a deterministic stand-in for a device."""
    def measure(model, inputs, **_):
        n = sum(p.numel() for p in model.parameters())
        return per_param * n if per_param > 0 else 1e9 / n

    monkeypatch.setattr(secateurs.analysis, "measure_latency", measure)


def test_target_latency_is_met_with_the_least_pruning(monkeypatch):
    _fake_clock(monkeypatch, 1e-4)
    model = _wide_mlp()
    dense = 1e-4 * sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, secateurs.Channels(target_latency=0.4 * dense),
                              example_inputs=torch.randn(8, 256))
    log = report.outcome["latency_ms"]
    assert log["dense"] == pytest.approx(dense) and log["achieved"] <= 0.4 * dense
    assert log["achieved"] > 0.3 * dense  # the bisection does not over-prune
    assert 1e-4 * sum(p.numel() for p in model.parameters()) == pytest.approx(log["achieved"])


def test_a_model_is_never_left_slower_than_dense(monkeypatch, caplog):
    _fake_clock(monkeypatch, -1)  # a device where narrower layers are slower
    model = _wide_mlp()
    before = sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, secateurs.Channels(target_latency=1e-9), example_inputs=torch.randn(8, 256))
    assert sum(p.numel() for p in model.parameters()) == before  # undone
    assert report.outcome["latency_ms"]["achieved"] == report.outcome["latency_ms"]["dense"]
    assert "nothing was pruned" in caplog.text and "pruned as far as allowed" not in caplog.text


def test_real_cpu_latency_target():
    model = _wide_mlp()
    x = torch.randn(1, 256)
    config = secateurs.Channels(target_latency=1e6, latency_batch_size=64)  # always met: prunes nothing more
    report = secateurs.prune_(model, config, example_inputs=x)
    log = report.outcome["latency_ms"]
    assert log["achieved"] <= 1e6 and log["dense"] > 0 and log["device"] == "cpu"
    assert model[0].out_features >= 1000  # the smallest ratio of the bisection


def test_latency_target_with_sensitivity_allocation(monkeypatch):
    _fake_clock(monkeypatch, 1e-4)
    model = _wide_mlp()
    dense = 1e-4 * sum(p.numel() for p in model.parameters())
    data = [(torch.randn(16, 256), torch.randint(0, 10, (16,))) for _ in range(2)]
    report = secateurs.prune_(model, secateurs.Channels(target_latency=0.5 * dense, allocate="sensitivity",
                                                        calib_batches=2), example_inputs=torch.randn(8, 256),
                              data=data)
    log = report.outcome["latency_ms"]
    assert 0.3 * dense < log["achieved"] <= 0.5 * dense
    curves = report.sensitivity["curves"]
    assert len(curves) == 2 and all(c["macs_saved"][-1] > 0 for c in curves)  # steps priced by MACs saved
    assert model[0].out_features != model[2].out_features  # each group got its own share


def test_latency_target_in_steps(monkeypatch):
    """Each step meets a geometric share of the way; the last meets the target itself."""
    from secateurs.methods.channels import channel_steps

    _fake_clock(monkeypatch, 1e-4)
    model = _wide_mlp()
    dense = 1e-4 * sum(p.numel() for p in model.parameters())
    x = torch.randn(8, 256)
    goals, achieved = [], []
    for step in channel_steps(model, secateurs.Channels(target_latency=0.3 * dense, steps=3), x):
        goals.append(step.target_latency)
        achieved.append(secateurs.prune_(model, step, example_inputs=x).outcome["latency_ms"]["achieved"])
    assert goals == pytest.approx([dense * 0.3 ** (1 / 3), dense * 0.3 ** (2 / 3), 0.3 * dense])
    assert all(a <= g for a, g in zip(achieved, goals, strict=True))
    assert achieved[0] > 0.5 * dense  # the first step does not jump to the target
    assert 1e-4 * sum(p.numel() for p in model.parameters()) <= 0.3 * dense


def test_latency_target_steps_through_prune(monkeypatch):
    _fake_clock(monkeypatch, 1e-4)
    model = _wide_mlp()
    dense = 1e-4 * sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, secateurs.Channels(target_latency=0.4 * dense, steps=2),
                              example_inputs=torch.randn(8, 256))
    assert len(report.outcome["steps_detail"]) == 2
    assert report.outcome["latency_ms"]["achieved"] <= 0.4 * dense  # the last step's measurement is kept
    assert report.outcome["latency_ms"]["dense"] == pytest.approx(dense)  # and the dense model's, before step 1
    assert 0.3 * dense < 1e-4 * sum(p.numel() for p in model.parameters()) <= 0.4 * dense


def test_latency_target_errors():
    with pytest.raises(SecateursError, match="exactly one of"):
        secateurs.Channels(ratio=0.5, target_latency=3.0)
    with pytest.raises(SecateursError, match="positive number"):
        secateurs.Channels(target_latency=-1.0)


def test_an_unreachable_target_is_reported(monkeypatch, caplog):
    _fake_clock(monkeypatch, 1e-4)
    model = _wide_mlp()
    report = secateurs.prune_(model, secateurs.Channels(target_latency=1e-9), example_inputs=torch.randn(8, 256))
    assert report.outcome["target_met"] is False and "out of reach" in caplog.text
    caplog.clear()
    report = secateurs.prune_(_wide_mlp(), secateurs.Channels(target_macs=1e-4), example_inputs=torch.randn(8, 256))
    assert report.outcome["target_met"] is False and "out of reach" in caplog.text and "--max-ratio" in caplog.text
    assert 1e-4 < report.outcome["achieved_macs"] < 0.2
    reached = secateurs.prune_(_wide_mlp(), secateurs.Channels(target_macs=0.5), example_inputs=torch.randn(8, 256))
    assert reached.outcome["target_met"] is True and 0.4 < reached.outcome["achieved_macs"] <= 0.5
