"""Property-based checks of the mask arithmetic over random shapes and settings."""

import pytest
import torch
from torch import nn

import secateurs

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 0.99),
    scope=st.sampled_from(["layer", "global"]),
    importance=st.sampled_from(["magnitude", "random"]),
)
def test_unstructured_sparsity_is_exact(shapes, sparsity, scope, importance):
    layers = nn.ModuleList(nn.Linear(i, o) for o, i in shapes)
    config = secateurs.Unstructured(sparsity=sparsity, scope=scope, importance=importance, prune_output_layer=True)
    report = secateurs.prune_(layers, config)
    counts = [(layer.weight == 0).sum().item() for layer in layers]
    sizes = [layer.weight.numel() for layer in layers]
    if scope == "global":
        assert sum(counts) == round(sparsity * sum(sizes))
    else:
        assert counts == [round(sparsity * s) for s in sizes]
    assert report.zeros == sum(counts)


@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([2, 4, 8, 16]),
    data=st.data(),
    out_features=st.integers(1, 12),
    groups=st.integers(1, 6),
    conv=st.booleans(),
)
def test_nm_pattern_holds(m, data, out_features, groups, conv):
    n = data.draw(st.integers(1, m - 1))
    in_features = m * groups
    layer = nn.Conv2d(in_features, out_features, 3) if conv else nn.Linear(in_features, out_features)
    model = nn.ModuleList([layer])
    secateurs.prune_(model, secateurs.NM(n=n, m=m, prune_output_layer=True))
    w = layer.weight
    grouped = (w.permute(0, 2, 3, 1) if conv else w).reshape(-1, m)
    # Exactly n survive per group (weights from a continuous init are never exactly 0).
    assert torch.all((grouped != 0).sum(1) == n)


class _RandomNet(torch.nn.Module):
    """A small net whose wiring is drawn at random: residuals, concats, splits, groups, reshapes."""

    def __init__(self, plan: list[str], width: int, groups: int) -> None:
        super().__init__()
        self.plan = plan
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        c = width
        for op in plan:
            if op == "residual":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)))
            elif op == "concat":
                self.blocks.append(nn.Conv2d(c, c, 1))
                c = 2 * c
            elif op == "split":
                self.blocks.append(nn.Conv2d(c // 2, c // 2, 1))
            elif op == "grouped":
                self.blocks.append(nn.Conv2d(c, c, 3, padding=1, groups=groups))
            elif op == "depthwise":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU()))
            elif op == "expand":
                self.blocks.append(nn.Conv2d(c, c + 4, 1))
                c = c + 4
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for op, block in zip(self.plan, self.blocks, strict=True):
            if op == "residual":
                x = torch.relu(x + block(x))
            elif op == "concat":
                x = torch.cat([x, block(x)], dim=1)
            elif op == "split":
                a, b = x.chunk(2, dim=1)
                x = torch.cat([block(a), b], dim=1)
            else:
                x = block(x)
        return self.head(x)


@settings(max_examples=25, deadline=None)
@given(
    plan=st.lists(st.sampled_from(["residual", "concat", "split", "grouped", "depthwise", "expand"]),
                  min_size=1, max_size=5),
    ratio=st.floats(0.15, 0.9),  # at least one of 8 channels
    importance=st.sampled_from(["l1", "l2", "fpgm", "random"]),
    scope=st.sampled_from(["layer", "global"]),
)
def test_random_nets_prune_and_keep_their_output_shape(plan, ratio, importance, scope):
    torch.manual_seed(0)
    model = _RandomNet(plan, width=8, groups=4).eval()
    x = torch.randn(2, 3, 8, 8)
    params = sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(
        model, secateurs.Channels(ratio=ratio, importance=importance, scope=scope), example_inputs=x
    )
    assert model(x).shape == (2, 7)
    removed = sum(layer.zeros for layer in report.layers)
    after = sum(p.numel() for p in model.parameters())
    assert (after < params) if removed else (after == params)
    # coarse groups (grouped convs move several channels at once) may round to nothing; others may not
    assert removed or all(int(ratio * layer.numel) == 0 for layer in report.layers)
