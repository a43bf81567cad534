import pytest
import torch
from torch import nn

import secateurs
from secateurs import NM, SecateursError
from secateurs.methods.nm import nm_mask


def _groups(weight: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    return weight.movedim(dim, -1).reshape(-1, m)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)])
def test_nm_pattern_holds_in_every_group_of_linear_and_conv(n, m):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.Linear(32, 4)
    )
    report = secateurs.prune_(model, NM(n=n, m=m))
    assert [layer.name for layer in report.layers] == ["0", "3"]
    for name in ("0", "3"):
        w = model.get_submodule(name).weight
        nonzero_per_group = (_groups(w, m) != 0).sum(dim=1)
        assert torch.all(nonzero_per_group == n), name
        assert report.layers[["0", "3"].index(name)].sparsity == pytest.approx(1 - n / m)


def test_nm_keeps_the_largest_in_each_group():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.05, 3.0, -2.0, 0.0, 1.0]])
    mask = nm_mask(w.abs(), 2, 4, dim=1)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_conv_groups_run_along_input_channels():
    conv = nn.Conv2d(8, 4, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 8, 5, 5))
    secateurs.prune_(model, NM(n=2, m=4))
    w = conv.weight  # (out, in, kh, kw): for each (out, kh, kw) every 4 inputs keep 2
    per = (w.permute(0, 2, 3, 1).reshape(-1, 4) != 0).sum(1)
    assert torch.all(per == 2)


def test_layers_with_indivisible_inputs_are_skipped_and_reported():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    report = secateurs.prune_(model, NM(n=2, m=4))
    assert "0" in report.skipped and "multiple of 4" in report.skipped["0"]
    assert [layer.name for layer in report.layers] == ["1"]


def test_no_divisible_layer_is_an_error():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    with pytest.raises(SecateursError, match="divisible by 4"):
        secateurs.prune_(model, NM(n=2, m=4))


@pytest.mark.parametrize("n, m", [(4, 4), (5, 4), (0, 4)])
def test_bad_nm_is_refused(n, m):
    with pytest.raises(SecateursError, match="1 <= N < M"):
        NM(n=n, m=m)


def test_nm_after_unstructured_keeps_zeros_and_pattern(mlp):
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.3, importance="random", seed=0))
    zeros = mlp.fc1.weight == 0
    secateurs.prune_(mlp, NM(n=2, m=4))
    w = mlp.fc1.weight
    assert torch.all(w[zeros] == 0)
    assert torch.all((_groups(w, 4) != 0).sum(1) <= 2)


def test_gpt2_conv1d_groups_run_along_its_input_dimension():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    report = secateurs.prune_(model, NM(n=2, m=4))
    names = {layer.name for layer in report.layers}
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names
    w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in_features, out_features)
    assert w.shape == (32, 128)
    assert torch.all((_groups(w, 4, dim=0) != 0).sum(1) == 2)
    ids = torch.randint(0, 64, (1, 8))
    assert model(ids).logits.shape == (1, 8, 64)
