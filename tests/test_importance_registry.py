"""Importance criteria as objects: one class per criterion, a registry of names, built-ins unchanged."""

import json

import pytest
import torch
from torch import nn

import secateurs
from secateurs import NM, Channels, SecateursError, Unstructured
from secateurs.graph import build_graph
from secateurs.importance import (
    CHANNEL_IMPORTANCE,
    ELEMENT_IMPORTANCE,
    ChannelImportance,
    ElementImportance,
    channel_importance,
    element_importance,
    register_channel_importance,
    register_element_importance,
)
from secateurs.importance.channel import NEEDS_DATA, channel_scores
from secateurs.importance.stats import ActivationStats, InputActivationStats, TaylorStats
from secateurs.masks import get_mask
from secateurs.methods.channels import calibration_stats, score_groups
from secateurs.methods.common import make_generator
from secateurs.zoo import DigitsCNN


@pytest.fixture(autouse=True)
def registries():
    """Each test registers what it needs; the registries are restored afterwards."""
    saved = dict(CHANNEL_IMPORTANCE), dict(ELEMENT_IMPORTANCE)
    yield
    for registry, before in zip((CHANNEL_IMPORTANCE, ELEMENT_IMPORTANCE), saved, strict=True):
        registry.clear()
        registry.update(before)


class FirstChannels(ChannelImportance):
    """Data-free: the lower a channel's position in its group, the more it matters."""

    name = "first_channels"

    def score(self, group, context):
        return -torch.arange(group.size, dtype=torch.float32)


class MeanOutput(ChannelImportance):
    """Data-driven: a channel scores the mean (signed) output of the layers that produce it."""

    name = "mean_output"
    needs_data = True

    def __init__(self):
        self.seen = []  # (batches asked for, batches used) per collect

    def collect(self, model, graph, data, batches):
        sums, used = {}, 0
        hooks = [m.register_forward_hook(
            lambda mod, inp, out, key=f"{n}.weight": sums.__setitem__(
                key, sums.get(key, 0) + out.detach().movedim(1, -1).reshape(-1, out.shape[1]).mean(0)))
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            for x, _ in data[:batches]:
                model(x)
                used += 1
        for h in hooks:
            h.remove()
        self.seen.append((batches, used))
        return {k: v / used for k, v in sums.items()}

    def score(self, group, context):
        votes = [context.stats[m.tensor][group.indices[m]].sum(1) for m in group.members
                 if m.dim == 0 and m.tensor in context.stats]
        return context.combine(group, votes)


BUILTIN = ("l1", "l2", "bn", "fpgm", "random", "taylor", "activation", "minitron", "obs")


def digits_data(n=3):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_custom_data_free_criterion_by_name_and_by_instance():
    register_channel_importance(FirstChannels())
    for importance in ("first_channels", FirstChannels()):
        torch.manual_seed(0)
        model = DigitsCNN().eval()
        w0, w3 = model.features[0].weight.detach().clone(), model.features[3].weight.detach().clone()
        report = secateurs.prune_(model, Channels(ratio=0.5, importance=importance),
                                  example_inputs=torch.randn(1, 1, 8, 8))
        assert torch.equal(model.features[0].weight, w0[:16])  # the first half of every group stays
        assert torch.equal(model.features[3].weight, w3[:32, :16])
        assert report.importance["criterion"] == "first_channels"
        encoded = json.loads(json.dumps(report.to_dict()))  # an instance in the config still serialises
        assert encoded["config"]["importance"] == "first_channels"


def test_custom_data_driven_criterion_collects_once_and_prunes_by_its_statistics():
    criterion = MeanOutput()
    register_channel_importance(criterion)
    assert "mean_output" in NEEDS_DATA
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    data = digits_data(3)
    w0 = model.features[0].weight.detach().clone()
    with torch.no_grad():
        expected = torch.cat([model.features[0](x) for x, _ in data[:2]]).mean((0, 2, 3))
    keep = expected.topk(16).indices.sort().values
    secateurs.prune_(model, Channels(ratio=0.5, importance="mean_output", calib_batches=2),
                     example_inputs=data[0][0][:1], data=data)
    assert criterion.seen == [(2, 2)]
    assert torch.equal(model.features[0].weight, w0[keep])
    with pytest.raises(SecateursError, match="importance 'mean_output' is measured on data: pass data="):
        secateurs.prune_(DigitsCNN(), Channels(ratio=0.5, importance="mean_output"),
                         example_inputs=torch.randn(1, 1, 8, 8))


def test_registration_is_checked_and_unknown_names_list_the_choices():
    with pytest.raises(SecateursError, match="'l2' is already registered"):
        register_channel_importance(type("MyL2", (FirstChannels,), {"name": "l2"})())
    register_channel_importance(FirstChannels)  # a class decorator registers an instance
    assert isinstance(CHANNEL_IMPORTANCE["first_channels"], FirstChannels)
    with pytest.raises(SecateursError, match="already registered"):
        register_channel_importance(FirstChannels())
    with pytest.raises(SecateursError, match="has no name"):
        register_channel_importance(type("Nameless", (FirstChannels,), {"name": ""})())
    with pytest.raises(SecateursError, match="subclasses secateurs.importance.ChannelImportance"):
        register_channel_importance(lambda group, context: None)
    with pytest.raises(SecateursError) as err:
        Channels(ratio=0.5, importance="l3")
    message = str(err.value)
    assert "\n" not in message and "unknown importance 'l3'" in message
    assert "choose one of l1, l2, bn, fpgm, random, taylor, activation, minitron, obs, " in message
    assert "first_channels" in message  # registered names are choices too
    with pytest.raises(SecateursError, match="unknown importance 'l3': choose one of magnitude, random"):
        Unstructured(sparsity=0.5, importance="l3")
    with pytest.raises(SecateursError, match="'magnitude' is already registered"):
        register_element_importance(type("Mine", (Positional,), {"name": "magnitude"})())
    assert channel_importance("l2") is CHANNEL_IMPORTANCE["l2"] and element_importance("random").name == "random"


def test_a_score_of_the_wrong_shape_is_refused():
    class Short(ChannelImportance):
        name = "short"

        def score(self, group, context):
            return torch.zeros(group.size - 1)

    with pytest.raises(SecateursError, match=r"'short' gave \(31,\) for a group of 32 channels"):
        secateurs.prune_(DigitsCNN(), Channels(ratio=0.5, importance=Short()), example_inputs=torch.randn(1, 1, 8, 8))


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_builtin_criteria_give_the_hand_computed_scores():
    torch.manual_seed(0)
    model = TinyConv().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.25]))
        model.bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    graph = build_graph(model, torch.randn(1, 2, 5, 5))
    (group,) = graph.groups  # conv1's outputs (conv2's outputs are the model's)
    w1, b1, gamma, beta, w2 = (t.detach() for t in (model.conv1.weight, model.conv1.bias, model.bn.weight,
                                                    model.bn.bias, model.conv2.weight))
    l1 = torch.stack([w1.abs().sum((1, 2, 3)), b1.abs(), gamma.abs(), beta.abs(), w2.abs().sum((0, 2, 3))])
    l2 = torch.stack([w1.pow(2).sum((1, 2, 3)).sqrt(), b1.abs(), gamma.abs(), beta.abs(), w2.pow(2).sum((0, 2, 3)).sqrt()])
    rows1, rows2 = w1.reshape(4, -1), w2.transpose(0, 1).reshape(4, -1)
    fpgm = torch.stack([torch.cdist(rows1, rows1).sum(1), torch.cdist(rows2, rows2).sum(1)])
    expected = {("l1", "mean"): l1.mean(0), ("l1", "max"): l1.amax(0), ("l1", "sum"): l1.sum(0),
                ("l2", "mean"): l2.mean(0), ("bn", "mean"): gamma.abs(), ("fpgm", "mean"): fpgm.mean(0),
                ("random", "mean"): torch.rand(4, generator=make_generator(3))}
    for (name, reduction), want in expected.items():
        got = score_groups(model, graph, Channels(ratio=0.5, importance=name, reduction=reduction, seed=3), None)
        torch.testing.assert_close(got[group.id], want, rtol=1e-6, atol=1e-7, msg=f"{name} {reduction}")
        # the function kept for callers of the old API goes through the same criterion
        named = dict(model.named_parameters())
        assert torch.equal(channel_scores(name, group, named | dict(model.named_buffers()), params=set(named),
                                          norm_scales={"bn.weight"}, reduction=reduction,
                                          generator=make_generator(3), cache={}), got[group.id])


def test_builtin_data_driven_criteria_collect_what_they_did_before():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    data = digits_data(2)
    graph = build_graph(model, data[0][0][:1])
    direct = {"taylor": TaylorStats(model).run(data, 2).scores,
              "activation": ActivationStats(model).run(data, 2).per_channel(),
              "minitron": InputActivationStats(model).run(data, 2).per_channel()}
    assert {n for n in NEEDS_DATA if n in BUILTIN} == {"taylor", "activation", "minitron", "obs"}
    for name, want in direct.items():
        got = calibration_stats(model, graph, Channels(ratio=0.5, importance=name, calib_batches=2), data)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    grams = calibration_stats(model, graph, Channels(ratio=0.5, importance="obs", calib_batches=2), data)
    assert {"features.3.weight@in1", "features.7.weight@in1", "classifier.0.weight@in1"} <= set(grams)
    assert calibration_stats(model, graph, Channels(ratio=0.5, importance="l2"), data) is None


class Positional(ElementImportance):
    """Earlier entries (in memory order) matter more."""

    name = "positional"

    def score(self, weight, context):
        return -torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)


def test_custom_element_criterion_in_unstructured_and_nm():
    register_element_importance(Positional())
    for importance in ("positional", Positional()):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        report = secateurs.prune_(model, Unstructured(sparsity=0.25, importance=importance))
        keep = get_mask(model[0]).reshape(-1)
        assert keep.tolist() == [True] * 48 + [False] * 16
        assert json.loads(json.dumps(report.to_dict()))["config"]["importance"] == "positional"
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    secateurs.prune_(model, NM(n=2, m=4, importance="positional"))
    assert get_mask(model[0]).reshape(-1, 4).tolist() == [[True, True, False, False]] * 16
    with pytest.raises(SecateursError, match="threshold pruning compares"):
        Unstructured(threshold=0.1, importance="positional")


def test_element_criterion_of_the_wrong_shape_is_refused():
    class Flat(ElementImportance):
        name = "flat"

        def score(self, weight, context):
            return weight.detach().abs().reshape(-1)

    with pytest.raises(SecateursError, match=r"'flat' gave \(64,\) for a weight of shape \(8, 8\)"):
        secateurs.prune_(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), Unstructured(sparsity=0.5, importance=Flat()))


def test_an_instance_needs_a_name_of_its_own():
    class Nameless(ChannelImportance):
        def score(self, group, context):
            return torch.zeros(group.size)

    class Impostor(Nameless):
        name = "l2"  # a saved config would replay the built-in l2

    for criterion, says in ((Nameless(), "has no name"), (Impostor(), "name of a registered criterion")):
        with pytest.raises(SecateursError, match=says):
            Channels(ratio=0.5, importance=criterion)
