"""Sensitivity scans and sensitivity-based allocation of a channel budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import secateurs
from conftest import needs
from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.graph import build_graph
from secateurs.importance.stats import task_loss
from secateurs.methods.channels import Channels, plan_channels, plan_for, score_groups
from secateurs.methods.sensitivity import (
    Curve,
    allocate,
    allocation_order,
    channel_curves,
    sensitivity,
)
from secateurs.surgery import apply_plan_
from secateurs.zoo import DigitsCNN

CNN = "secateurs.zoo:DigitsCNN"
pytestmark = needs("sklearn")


@pytest.fixture(scope="module")
def trained():
    from secateurs.data import load_dataset
    from secateurs.train import fit

    split = load_dataset("digits")
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    fit(model, split.x_train, split.y_train, epochs=8)
    batches = [(split.x_test[i : i + 90], split.y_test[i : i + 90]) for i in range(0, 360, 90)]
    return model.eval(), batches


def test_channel_scan_has_one_sane_curve_per_group_and_leaves_the_model_alone(trained):
    model, batches = trained
    state = copy.deepcopy(model.state_dict())
    result = sensitivity(model, batches, ratios=[0.25, 0.5, 0.9], batches=4)
    graph = build_graph(model, batches[0][0][:1])
    assert len(result.curves) == len(graph.groups) == 4
    assert result.metric == "accuracy" and result.baseline["accuracy"] > 0.9
    for c in result.curves:
        assert c.ratios == [0.0, 0.25, 0.5, 0.9] and len(c.accuracy) == len(c.loss) == 4
        assert c.accuracy[0] == result.baseline["accuracy"]
        assert c.loss[-1] >= c.loss[0] - 1e-3  # removing 90% of a group never helps much
    assert min(c.accuracy[-1] for c in result.curves) < result.baseline["accuracy"] - 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_zeroing_in_the_scan_equals_physical_removal(trained):
    model, batches = trained
    graph = build_graph(model, batches[0][0][:1])
    config = Channels(ratio=0.5)
    scores = score_groups(model, graph, config, None)
    result = channel_curves(model, graph, scores, batches, ratios=[0.5], batches=2)
    with torch.no_grad():
        reference = [model(x) for x, _ in batches[:2]]
    for curve in result.curves:
        pruned = copy.deepcopy(model)
        removed = plan_channels(graph, scores, config, 0.0, {curve.group: 0.5})
        apply_plan_(pruned, plan_for(graph, removed))
        with torch.no_grad():
            loss = sum(float(task_loss(pruned(x), (x, y), ref)) for (x, y), ref in zip(batches, reference,
                                                                                      strict=False)) / 2
        assert loss == pytest.approx(curve.loss[1], rel=1e-4, abs=1e-6)


def test_allocation_takes_the_cheapest_steps_first():
    fragile = Curve("fragile", 10, [0.0, 0.5, 0.9], loss=[1.0, 3.0, 9.0], macs_saved=[0, 100, 180], group=0)
    robust = Curve("robust", 10, [0.0, 0.5, 0.9], loss=[1.0, 1.1, 1.3], macs_saved=[0, 100, 180], group=1)
    order = allocation_order([fragile, robust])
    assert order == [(1, 1), (1, 2), (0, 1), (0, 2)]
    assert allocate([fragile, robust], 0.5, order) == {0: 0.0, 1: 0.9}
    assert allocate([fragile, robust], 1.0, order) == {0: 0.9, 1: 0.9}
    assert allocate([fragile, robust], 0.625, order) == pytest.approx({0: 0.25, 1: 0.9})  # half of the third step


def test_sensitivity_allocation_beats_uniform_at_equal_macs(trained):
    model, batches = trained
    x = batches[0][0][:1]
    losses, macs = {}, {}
    for allocate_ in ("uniform", "sensitivity"):
        pruned = copy.deepcopy(model)
        report = secateurs.prune_(pruned, Channels(target_macs=0.3, allocate=allocate_, calib_batches=4),
                                  example_inputs=x, data=batches)
        macs[allocate_] = secateurs.analyze(pruned, x, latency=False, size=False).macs
        with torch.no_grad():
            losses[allocate_] = sum(float(task_loss(pruned(xb), (xb, yb))) for xb, yb in batches)
        assert report.config["allocate"] == allocate_
    dense_macs = secateurs.analyze(model, x, latency=False, size=False).macs
    assert macs["sensitivity"] <= 0.3 * dense_macs and macs["uniform"] <= 0.3 * dense_macs
    assert macs["sensitivity"] >= 0.27 * dense_macs  # the last greedy step is taken in part: no overshoot
    assert losses["sensitivity"] < losses["uniform"]


def test_sensitivity_allocation_needs_data():
    with pytest.raises(SecateursError, match="pass data="):
        secateurs.prune_(DigitsCNN(), Channels(ratio=0.5, allocate="sensitivity"), example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(SecateursError, match="drop scope='global'"):
        Channels(ratio=0.5, allocate="sensitivity", scope="global")


def test_unstructured_sensitivity_allocation_hits_the_sparsity_and_beats_uniform_and_global(trained):
    model, batches = trained
    losses, reports = {}, {}
    settings = {"layer": {}, "global": {"scope": "global"}, "sensitivity": {"allocate": "sensitivity"}}
    for label, kwargs in settings.items():
        pruned = copy.deepcopy(model)
        reports[label] = secateurs.prune_(pruned, secateurs.Unstructured(sparsity=0.7, **kwargs), data=batches)
        with torch.no_grad():
            losses[label] = sum(float(task_loss(pruned(xb), (xb, yb))) for xb, yb in batches)
    report = reports["sensitivity"]
    total = sum(layer.numel for layer in report.layers)
    assert sum(layer.zeros for layer in report.layers) == round(0.7 * total)  # exactly the target
    sparsities = [layer.sparsity for layer in report.layers]
    assert max(sparsities) - min(sparsities) > 0.3  # layers really get different shares
    assert [c["name"] for c in report.sensitivity["curves"]] == [layer.name for layer in report.layers]
    assert losses["sensitivity"] < losses["global"] < losses["layer"]


def test_unstructured_sensitivity_allocation_rejects_what_it_cannot_do():
    with pytest.raises(SecateursError, match="pass data="):
        secateurs.prune_(DigitsCNN(), secateurs.Unstructured(sparsity=0.5, allocate="sensitivity"))
    with pytest.raises(SecateursError, match="not threshold"):
        secateurs.Unstructured(threshold=0.1, allocate="sensitivity")
    with pytest.raises(SecateursError, match="drop scope='global'"):
        secateurs.Unstructured(sparsity=0.5, scope="global", allocate="sensitivity")
    with pytest.raises(SecateursError, match="at most 0.98"):
        secateurs.Unstructured(sparsity=0.99, allocate="sensitivity")


def test_cli_unstructured_sensitivity_allocation(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", CNN, "--input-shape", "1,1,8,8", "--method", "unstructured",
                 "--sparsity", "0.6", "--allocate", "sensitivity", "--data", "digits", "--calib-batches", "1",
                 "--no-latency", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pruning"]["config"]["allocate"] == "sensitivity"
    assert len(result["pruning"]["sensitivity"]["curves"]) == len(result["pruning"]["layers"])
    assert abs(result["pruning"]["sparsity"] - 0.6) < 1e-3
    assert main(["prune", CNN, "--input-shape", "1,1,8,8", "--method", "unstructured",
                 "--sparsity", "0.6", "--allocate", "sensitivity", "--no-latency", "--out", str(tmp_path / "x")]) == 2
    assert "pass data=" in capsys.readouterr().err


def test_unstructured_scan_also_on_a_masked_model(trained):
    model, batches = trained
    result = sensitivity(model, batches, method="unstructured", ratios=[0.5, 0.95], batches=2)
    assert [c.name for c in result.curves] == ["features.0", "features.3", "features.7", "classifier.0"]
    assert all(len(c.loss) == 3 for c in result.curves)
    masked = copy.deepcopy(model)
    secateurs.prune_(masked, secateurs.Unstructured(sparsity=0.3))
    state = {k: v.clone() for k, v in masked.state_dict().items()}
    again = sensitivity(masked, batches, method="unstructured", ratios=[0.95], batches=2)
    assert all(c.loss[1] > c.loss[0] for c in again.curves)  # the scan really prunes through the mask
    assert all(torch.equal(v, state[k]) for k, v in masked.state_dict().items())


def test_channel_scan_with_a_data_driven_importance(trained):
    model, batches = trained
    result = sensitivity(model, batches, ratios=[0.5], importance="taylor", batches=2)
    assert len(result.curves) == 4


@needs("matplotlib")
def test_cli_sensitivity_writes_json_csv_and_a_png(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    secateurs.save(DigitsCNN(), tmp_path / "m", input_shape=[1, 1, 8, 8])
    out = tmp_path / "sens.json"
    argv = ["sensitivity", str(tmp_path / "m"), "--data", "digits", "--ratio", "0.5,0.8", "--batches", "1",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "units" in printed and "most sensitive" in printed
    result = json.loads(out.read_text())
    assert len(result["curves"]) == 4 and result["metric"] == "accuracy"
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("unit,size,ratio") and len(rows) == 1 + 4 * 3
    with Image.open(out.with_suffix(".png")) as image:
        assert image.size[0] > 300
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
