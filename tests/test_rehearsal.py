"""Rehearsal: a plan is checked (in place or on a meta copy) before the model is cut, and undone exactly when it fails."""

import torch
from torch import nn

import secateurs
from secateurs import Channels
from secateurs.graph import build_graph


def test_shape_only_rehearsal_still_catches_a_batchnorm_width_mismatch():
    from secateurs.surgery import Plan
    from secateurs.surgery.rehearsal import rehearse

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
    x = torch.randn(1, 3, 8, 8)
    broken = Plan(remove={"0.weight": {0: [0, 1]}, "0.bias": {0: [0, 1]}})  # conv narrowed, its BatchNorm not
    rehearsal, why = rehearse(model, broken, x, (1, 8, 6, 6))
    assert rehearsal is None and "should contain 6 elements" in why
    whole = Plan(remove={"0.weight": {0: [0, 1]}, "0.bias": {0: [0, 1]}, "1.weight": {0: [0, 1]},
                         "1.bias": {0: [0, 1]}, "1.running_mean": {0: [0, 1]}, "1.running_var": {0: [0, 1]}})
    rehearsal, why = rehearse(model, whole, x, (1, 6, 6, 6))
    assert rehearsal is not None and model[0].out_channels == 8  # the real model is untouched


def test_shape_only_rehearsal_catches_linear_and_layer_norm_width_mismatches():
    from secateurs.surgery import Plan
    from secateurs.surgery.rehearsal import rehearse

    x = torch.randn(2, 5, 4)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    rows_only = Plan(remove={"0.weight": {0: [0]}, "0.bias": {0: [0]}})  # the consumer keeps 8 input columns
    rehearsal, why = rehearse(model, rows_only, x, (2, 5, 3))
    assert rehearsal is None and "linear" in why
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    norm_left = Plan(remove={"0.weight": {0: [0]}, "0.bias": {0: [0]}, "2.weight": {1: [0]}})
    rehearsal, why = rehearse(model, norm_left, x, (2, 5, 3))
    assert rehearsal is None and "layer_norm" in why
    whole = Plan(remove={"0.weight": {0: [0]}, "0.bias": {0: [0]}, "1.weight": {0: [0]}, "1.bias": {0: [0]},
                         "2.weight": {1: [0]}}, attrs={"1": {}})
    rehearsal, why = rehearse(model, whole, x, (2, 5, 3))
    assert rehearsal is not None, why


def test_meta_copy_is_a_deep_copy_on_meta():
    from secateurs.surgery.rehearsal import meta_copy

    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.LayerNorm(4))
    model.sizes = [4, 4]  # a mutable attribute surgery could edit in place
    model.register_buffer("scale", torch.ones(4), persistent=False)
    model[1].register_forward_hook(lambda m, a, o: None)
    copy_ = meta_copy(model)
    assert copy_[0] is copy_[2] and copy_[0] is not shared  # shared stays shared, but is a new module
    assert copy_.sizes == [4, 4] and copy_.sizes is not model.sizes
    assert all(t.is_meta for t in list(copy_.parameters()) + list(copy_.buffers()))
    assert copy_._non_persistent_buffers_set == {"scale"} and copy_._non_persistent_buffers_set is not \
        model._non_persistent_buffers_set
    assert len(copy_[1]._forward_hooks) == 1 and copy_[1]._forward_hooks is not model[1]._forward_hooks
    copy_.sizes.append(2)
    copy_[0].out_features = 3
    assert model.sizes == [4, 4] and shared.out_features == 4 and not shared.weight.is_meta
    assert copy_(torch.empty(2, 4, device="meta")).shape == (2, 4)


class _HiddenSplit(nn.Module):
    """A CSP-style stage (timm's CrossStage): splits its expansion by a size computed from a stored width.

    A stored size passed as is (``split(self.half)``) is linked to its group and
    updated by surgery; ``self.expand_chs // 2`` is arithmetic the trace cannot see.
    """

    def __init__(self, c: int):
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.expand_chs = 2 * c
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.out = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        xa, xb = self.expand(x).split(self.expand_chs // 2, dim=1)
        return self.out(torch.cat([torch.relu(self.a(xa)), torch.relu(self.b(xb))], 1))


def test_groups_broken_by_hidden_sizes_are_found_quickly_and_kept_whole(monkeypatch):
    from secateurs.surgery import rehearsal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _HiddenSplit(8), _HiddenSplit(8), _HiddenSplit(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 10, 10)
    calls = []
    real_attempt = rehearsal._attempt
    monkeypatch.setattr(rehearsal, "_attempt", lambda *a: calls.append(1) or real_attempt(*a))
    before = model(x)
    report = secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert model(x).shape == before.shape
    for i in (1, 2, 3):
        assert model[i].expand.out_channels == 16  # kept whole, with the reason
        why = [v for k, v in report.skipped.items() if f"{i}.expand.bias" in k]
        assert len(why) == 1 and "not enough values to unpack" in why[0]
        assert model[i].a.out_channels == 4 and model[i].b.out_channels == 4  # the rest was pruned
    # one rehearsal to fail, one to confirm each culprit (the suspect owning most of the stage), one to pass
    assert len(calls) <= 2 * 3 + 1, len(calls)


class _AssertsWidth(nn.Module):
    """Checks its input against a stored width in plain Python: no size is ever passed to a torch call."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.width = nn.Conv2d(c, c, 3, padding=1), c

    def forward(self, x):
        if x.shape[1] != self.width:
            raise ValueError(f"expected {self.width} channels, got {x.shape[1]}")
        self.calls = getattr(self, "calls", 0) + 1  # state a forward leaves behind
        return torch.relu(self.conv(x))


def _state(model: nn.Module) -> dict:
    """Everything observable about a model: tensors (with identity), attributes and modules."""
    return {name: (type(m), {k: v for k, v in vars(m).items() if not k.startswith("_")},
                   {k: (id(t), t.shape, t.clone()) for k, t in [*m._parameters.items(), *m._buffers.items()]})
            for name, m in model.named_modules()}


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        (ta, va, ea), (tb, vb, eb) = a[name], b[name]
        if ta is not tb or va != vb or ea.keys() != eb.keys():
            return False
        if any(ea[k][:2] != eb[k][:2] or not torch.equal(ea[k][2], eb[k][2]) for k in ea):
            return False
    return True


def test_plans_are_checked_on_the_model_itself_and_undone_exactly_when_they_fail(monkeypatch):
    from secateurs.methods.channels import plan_channels, plan_for
    from secateurs.surgery import rehearsal

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    copies, attempts = [], []
    real_copy, real_attempt = rehearsal.meta_copy, rehearsal._attempt
    monkeypatch.setattr(rehearsal, "meta_copy", lambda m: copies.append(1) or real_copy(m))
    monkeypatch.setattr(rehearsal, "_attempt", lambda *a: attempts.append(1) or real_attempt(*a))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    secateurs.prune_(plain, Channels(ratio=0.5), example_inputs=x)
    assert copies == [] and attempts == []  # one surgery, checked in place
    assert plain(x).shape == (2, 4) and plain[3].groups == plain[3].out_channels == 4
    assert all(not t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    monkeypatch.setattr(secateurs.methods.channels, "IN_PLACE_MAX_BYTES", 0)  # as for a big model
    secateurs.prune_(plain, Channels(ratio=0.5), example_inputs=x)
    assert copies and attempts and plain[3].out_channels == 2  # rehearsed on a meta copy, then applied
    monkeypatch.setattr(secateurs.methods.channels, "IN_PLACE_MAX_BYTES", 2**30)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), _AssertsWidth(8), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    model(x)
    graph = build_graph(model, x)
    config = Channels(ratio=0.5)
    removed = plan_channels(graph, {g.id: torch.arange(g.size, dtype=torch.float) for g in graph.groups}, config, 0.5)
    before = _state(model)
    why = rehearsal.apply_checked_(model, plan_for(graph, removed), x, graph.output_shapes)
    assert "expected 8 channels" in why
    assert _same_state(_state(model), before)  # tensors, their identity, attributes, the forward's counter
    report = secateurs.prune_(model, config, example_inputs=x)  # then rehearsed group by group
    assert attempts and model(x).shape == (2, 4) and model[0].out_channels == 8 and model[2].out_channels == 4
    assert any("kept whole" in why and "expected 8 channels" in why for why in report.skipped.values())
