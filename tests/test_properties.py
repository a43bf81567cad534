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
