"""The tracer's rules: one small test per kind, the open registry, hooks on failure, LeViT and PiT."""

import doctest

import pytest
import torch
from torch import nn

import secateurs
from conftest import Mixed, needs
from secateurs import Channels, SecateursError
from secateurs.graph import build_graph, registry, remove_rule, rule
from secateurs.graph.rules import attention, detection, elementwise, layers, shape
from secateurs.surgery.rehearsal import macs_of


def _members(graph):
    return [sorted({m.tensor for m in g.members}) for g in graph.groups]


def _prunes_like_a_vit(model, x):
    """Channels(ratio=0.5) keeps the output shape and well under 0.6 of the MACs."""
    with torch.no_grad():
        before = model(x)
    macs = macs_of(model, x)
    report = secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert macs_of(model, x) < 0.6 * macs
    assert not [k for k in report.skipped if k.startswith("call ")]


# ---- the registry -----------------------------------------------------------------------------


def test_each_op_has_the_rule_that_won_the_old_table():
    """The old table registered cat, split, permute... twice; the later registration won and still does."""
    rules = registry.RULES
    assert rules["torch.cat"] is shape.cat and rules["torch.concat"] is shape.cat
    assert rules["torch.split"] is shape.split and rules["torch.Tensor.split"] is shape.split
    assert rules["torch.Tensor.permute"] is shape.permute and rules["torch.t"] is shape.transpose
    assert rules["torch.Tensor.flatten"] is shape.flatten and rules["torch.unsqueeze"] is shape.unsqueeze
    assert rules["torch.zeros"] is elementwise.blank and rules["torch.Tensor.new_zeros"] is elementwise.blank
    assert rules["torch.Tensor.new_tensor"] is elementwise.fresh
    assert rules["torch.Tensor.requires_grad_"] is elementwise.identity
    assert rules["torch.stack"] is shape.replay and rules["torch.Tensor.view"] is shape.replay
    assert rules["torch.nn.functional.conv2d"] is layers.conv
    assert rules["torch.nn.functional.conv_transpose2d"] is layers.conv_transpose
    assert rules["torch.nn.functional.scaled_dot_product_attention"] is attention.sdpa
    assert rules["torchvision.roi_align"] is detection.roi_pool and rules["torch.topk"] is detection.topk
    assert "torch.Tensor.__setitem__" in registry.IN_PLACE


def test_rule_docstring_example_runs():
    result = doctest.testmod(registry, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5
    assert "secateurs.graph.registry.squash" not in registry.RULES  # the example cleans up after itself


@torch.overrides.wrap_torch_function(lambda x: (x,))
def _halve(x):
    return x * 0.5


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(_halve(self.a(x)))


def test_a_custom_op_is_taught_and_duplicates_are_refused(monkeypatch):
    monkeypatch.setattr(registry, "RULES", dict(registry.RULES))
    model, x = _Custom(), torch.randn(3, 4)
    graph = build_graph(model, x)
    assert graph.unknown_calls == {"_halve": 1} and not graph.groups

    seen = []

    @rule(_halve)
    def halve(tracer, func, args, kwargs, out):
        seen.append(func(torch.ones(2)))  # the op itself, callable on other tensors
        tracer.set(out, tracer.get(args[0]))

    graph = build_graph(model, x)
    assert not graph.unknown_calls and _members(graph) == [["a.bias", "a.weight", "b.weight"]]
    assert torch.equal(seen[0], torch.full((2,), 0.5))
    with pytest.raises(SecateursError, match=r"already registered .*replace=True"):
        rule(_halve)(halve)
    with pytest.raises(SecateursError, match="already registered"):
        rule("torch.cat")(halve)
    rule(_halve, replace=True)(elementwise.constant)  # replace=True overrides
    assert not build_graph(model, x).groups
    remove_rule(_halve)
    with pytest.raises(SecateursError, match="no tracer rule"):
        remove_rule(_halve)
    with pytest.raises(SecateursError, match="at least one op"):
        rule()


# ---- hooks ------------------------------------------------------------------------------------


class _Asserts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        x = self.fc(x)
        assert x.shape[0] == 5, "batch must be 5"
        return x


def test_a_failing_forward_is_one_line_and_leaves_no_hooks():
    model = _Asserts()
    hooks_before = (len(nn.modules.module._global_forward_hooks),
                    len(nn.modules.module._global_forward_pre_hooks))
    with pytest.raises(SecateursError, match=r"forward failed on the example inputs \(AssertionError: batch must be 5"):
        build_graph(model, torch.randn(3, 4))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert hooks_before == (len(nn.modules.module._global_forward_hooks),
                            len(nn.modules.module._global_forward_pre_hooks))
    assert build_graph(model, torch.randn(5, 4)).output_shapes == (5, 4)  # and it traces fine afterwards


# ---- one small test per kind ------------------------------------------------------------------


def test_elementwise_add_couples_and_reduction_passes_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c((self.a(x) + torch.relu(self.b(x))).mean(dim=1))

    graph = build_graph(Net(), torch.randn(2, 3, 4))
    assert _members(graph) == [["a.bias", "a.weight", "b.bias", "b.weight", "c.weight"]]


class _LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over (batch x tokens): ``bn(x.flatten(0, 1)).reshape_as(x)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear, self.bn = nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_shape_reshape_as_takes_only_a_shape_from_its_argument():
    torch.manual_seed(0)
    model, x = nn.Sequential(_LinearNorm(4, 8), nn.ReLU(), _LinearNorm(8, 4)).eval(), torch.randn(2, 3, 4)
    graph = build_graph(model, x)
    assert [g.size for g in graph.groups] == [8]  # the hidden width; before, reshape_as froze it
    with torch.no_grad():
        model[0].bn.weight[::2] = 0  # channels whose output is zero: removing them changes nothing
        model[0].bn.bias[::2] = 0
        before = model(x)
    secateurs.prune_(model, Channels(ratio=0.5, importance="l1"), example_inputs=x)
    assert model[0].linear.out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_shape_expand_as_broadcasts_the_others_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            self.gate = nn.Parameter(torch.ones(1, 6))

        def forward(self, x):
            h = self.a(x)
            return self.b(h * self.gate.expand_as(h))

    graph = build_graph(Net(), torch.randn(3, 4))
    assert _members(graph) == [["a.bias", "a.weight", "b.weight", "gate"]]


def test_shape_split_by_a_list_of_attribute_sizes_links_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.key_dim, self.val_dim = 4, 8
            self.kv, self.k_out, self.v_out = nn.Linear(3, 12), nn.Linear(4, 2), nn.Linear(8, 2)

        def forward(self, x):
            k, v = self.kv(x).split([self.key_dim, self.val_dim], dim=-1)
            return self.k_out(k) + self.v_out(v)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3)
    assert sorted(g.size for g in build_graph(model, x).groups) == [4, 8]
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert (model.key_dim, model.val_dim) == (2, 4) and model.kv.out_features == 6
    assert model(x).shape == (2, 2)


def test_layers_conv_batchnorm_and_linear():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    graph = build_graph(model.eval(), torch.randn(1, 3, 6, 6))
    assert [g.size for g in graph.groups] == [8]
    (group,) = graph.groups
    assert group.indices[next(m for m in group.members if m.tensor == "4.weight")].shape == (8, 16)


def test_attention_einsum_contracts_and_carries():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(5, 2)

        def forward(self, x):  # (b, t, 4)
            attn = torch.einsum("bid,bjd->bij", self.q(x), self.k(x))
            return self.out(attn)

    graph = build_graph(Net(), torch.randn(2, 5, 4))
    assert _members(graph) == [["k.bias", "k.weight", "q.bias", "q.weight"]]


def test_detection_topk_over_channels_keeps_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            top = h.topk(3, dim=0).values  # ranks over the batch: the 6 channels pass through
            return self.b(top), h.topk(2, dim=1).values  # ranks over the channels: they are kept

    graph = build_graph(Net(), torch.randn(4, 4))
    assert not graph.groups and not graph.unknown_calls


# ---- models that motivated the rules ----------------------------------------------------------


@pytest.mark.slow
@needs("timm")
def test_levit_128_prunes_like_the_other_vits():
    torch.manual_seed(0)
    model = secateurs.load_model("timm:levit_128").eval()
    _prunes_like_a_vit(model, torch.randn(1, 3, 224, 224))


@pytest.mark.slow
@needs("timm")
def test_pit_s_224_prunes_like_the_other_vits():
    torch.manual_seed(0)
    model = secateurs.load_model("timm:pit_s_224").eval()
    _prunes_like_a_vit(model, torch.randn(1, 3, 224, 224))


def test_grouping_after_a_hash_collision_is_the_same(monkeypatch):
    """Channel roots are bucketed by a hash; if the check after it fails, the exact loop decides."""
    from secateurs.graph import groups

    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    expected = build_graph(model, x)
    real_unique = torch.unique

    def colliding(t, *args, **kwargs):  # every root in one bucket: the check must fail
        out, inverse = real_unique(t, *args, **kwargs)
        return out[:1], torch.zeros_like(inverse)

    monkeypatch.setattr(groups.torch, "unique", colliding)
    got = build_graph(model, x)
    assert [(g.size, g.members, g.roots) for g in got.groups] == [
        (g.size, g.members, g.roots) for g in expected.groups]
    for a, b in zip(got.groups, expected.groups, strict=True):
        assert all(torch.equal(a.indices[m], b.indices[m]) for m in a.members)
