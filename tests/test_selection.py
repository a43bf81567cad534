"""The selection resolver: include / ignore / filter_fn checked once against the model, answered for
weight tensors, channel groups and blocks alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from conftest import Residual
from secateurs import NM, Channels, Layers, SecateursError, Unstructured
from secateurs.graph import build_graph
from secateurs.methods.sensitivity import sensitivity
from secateurs.selection import Selection, matches
from secateurs.zoo import DigitsCNN


class TwoStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(*[Residual(8) for _ in range(3)])
        self.stage2 = nn.Sequential(*[Residual(8) for _ in range(3)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def _digits() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def _data() -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))]


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _unstructured(model, **sel):
    return secateurs.prune_(model, Unstructured(sparsity=0.5, **sel), example_inputs=X)


def _nm(model, **sel):
    return secateurs.prune_(model, NM(n=2, m=4, **sel), example_inputs=X)


def _channel(model, **sel):
    return secateurs.prune_(model, Channels(ratio=0.5, **sel), example_inputs=X)


def _layer(model, **sel):
    return secateurs.prune_(model, Layers(n=1, importance="magnitude", **sel), example_inputs=X)


def _scan_channels(model, **sel):
    return sensitivity(model, _data(), ratios=[0.5], config=Channels(ratio=0.5, **sel))


def _scan_weights(model, **sel):
    return sensitivity(model, _data(), method="unstructured", ratios=[0.5], config=Unstructured(sparsity=0.5, **sel))


METHODS = {"unstructured": _unstructured, "nm": _nm, "channel": _channel, "layer": _layer,
           "sensitivity-channel": _scan_channels, "sensitivity-unstructured": _scan_weights}


@pytest.mark.parametrize("kind", ["include", "ignore"])
@pytest.mark.parametrize("method", list(METHODS))
def test_an_unknown_name_is_refused_by_every_method_before_the_model_runs(method, kind):
    model = _digits()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SecateursError) as caught:
        METHODS[method](model, **{kind: ["nonexistent"]})
    message = str(caught.value)
    assert f"{kind} name 'nonexistent' matches no module" in message
    assert "secateurs analyze" in message and "\n" not in message
    assert forwards == []  # checked once, up front: no trace, no calibration, no scan
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_include_restricts_a_channel_sensitivity_scan_to_the_groups_it_touches():
    model, data = _digits(), _data()
    full = sensitivity(model, data, ratios=[0.5])
    assert len(full.curves) == 4
    only = sensitivity(model, data, ratios=[0.5], config=Channels(ratio=0.5, include=["features.0"]))
    assert [c.name for c in only.curves] == [full.curves[0].name]
    assert "features.0.weight" in only.curves[0].name
    assert only.curves[0].loss == pytest.approx(full.curves[0].loss, rel=1e-6)
    # a glob: the groups with a tensor of classifier.0 or classifier.2 (classifier.0 reads features.7's channels)
    by_glob = sensitivity(model, data, ratios=[0.5], config=Channels(ratio=0.5, include=["classifier.*"]))
    assert [c.name for c in by_glob.curves] == [c.name for c in full.curves if "classifier." in c.name]
    assert len(by_glob.curves) == 2


def test_ignore_leaves_a_layer_out_of_an_unstructured_scan():
    scan = _scan_weights(_digits(), ignore=["features.[03]"])
    assert [c.name for c in scan.curves] == ["features.7", "classifier.0"]


def test_matches_is_exact_a_dotted_prefix_or_a_glob():
    assert matches("features.0", "features.0") and matches("features.0.weight", "features.0")
    assert not matches("features.10", "features.1")  # a prefix ends at a dot
    assert not matches("features", "feat")
    assert matches("layer1.0.conv1", "*.conv1") and matches("features.7", "features.[37]")


def test_one_resolution_answers_for_tensors_groups_and_blocks():
    model = _digits()
    chosen = Channels(ratio=0.5, ignore=["features.[37]"],
                      filter_fn=lambda m, n: not isinstance(m, nn.Linear) or n != "classifier.2").resolve(model)
    frozen = chosen.frozen_tensors()
    assert frozen["features.3.weight"] == frozen["features.7.weight"] == "ignored"
    assert frozen["classifier.2.weight"] == frozen["classifier.2.bias"] == "filter_fn returned False"
    assert "features.0.weight" not in frozen and "classifier.0.weight" not in frozen
    assert chosen.refused("features.3") == "ignored" and chosen.refused("features.0") is None

    targets, skipped = Selection(include=["features.*"]).resolve(model).targets(example_inputs=X)
    assert [t.name for t in targets] == ["features.0", "features.3", "features.7"]

    graph = build_graph(model, X)
    picked = Selection(include=["features.3"]).resolve(model).groups(graph.groups)
    # features.3 writes its own channels and reads features.0's: both groups come with it
    assert [g.id for g in picked] == [0, 1]
    assert Selection().resolve(model).groups(graph.groups) == graph.groups


def test_an_include_that_names_no_prunable_layer_is_refused_for_weights():
    with pytest.raises(SecateursError, match="include name 'features.1' matches no prunable layer"):
        _unstructured(_digits(), include=["features.1"])  # a BatchNorm: a module, but no weight matrix


def test_a_glob_include_prunes_only_the_groups_it_touches():
    model = _digits()
    _channel(model, include=["features.?"])
    assert [model.features[i].out_channels for i in (0, 3, 7)] == [16, 32, 64]
    assert model.classifier[0].out_features == 128  # its own group is not touched by features.*
    assert model(X).shape == (2, 10)


def test_glob_ignore_and_include_choose_blocks():
    x = torch.randn(1, 3, 8, 8)
    report = secateurs.prune_(TwoStages(), Layers(n=1, importance="magnitude", ignore=["stage1.*.bn"]),
                              example_inputs=x)
    assert {c["name"] for c in report.plan["candidates"]} == {"stage2.0", "stage2.1", "stage2.2"}
    model = TwoStages()
    report = secateurs.prune_(model, Layers(n=1, importance="magnitude", include=["stage1.*"]), example_inputs=x)
    assert report.plan["drop"][0].startswith("stage1.") and len(model.stage1) == 2 and len(model.stage2) == 3
    assert model(x).shape == (1, 5)
