import copy

import pytest
import torch
from torch import nn

import secateurs
from secateurs.masks import effective_state_dict, masked_tensors


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("optimizer_before_pruning", [True, False])
def test_pruned_weights_stay_zero_through_20_steps(mlp, opt_name, optimizer_before_pruning):
    def make_opt():
        if opt_name == "sgd":
            return torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        return torch.optim.AdamW(mlp.parameters(), lr=1e-2, weight_decay=1e-2)

    opt = make_opt() if optimizer_before_pruning else None
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.7))
    opt = opt or make_opt()
    zeros_before = {n: (mlp.get_submodule(n).weight == 0) for n in ("fc1", "fc2")}
    start = {n: mlp.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(16, 32, generator=gen)
        loss = mlp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, was_zero in zeros_before.items():
        w = mlp.get_submodule(name).weight
        assert torch.all(w[was_zero] == 0), name
        assert not torch.equal(w, start[name]), "training must still change the kept weights"
        assert abs((w == 0).float().mean().item() - 0.7) < 0.01


def test_reprune_keeps_earlier_zeros_and_reaches_new_target(mlp):
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.5, importance="random", seed=1))
    first = mlp.fc1.weight == 0
    # Train a bit so the magnitude order no longer matches the first mask.
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        mlp(torch.randn(8, 32)).sum().backward()
        opt.step()
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.8))
    w = mlp.fc1.weight
    assert torch.all(w[first] == 0)
    assert (w == 0).sum().item() == round(0.8 * w.numel())


def test_finalize_bakes_masks_and_removes_bookkeeping(mlp):
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.6))
    x = torch.randn(5, 32)
    expected = mlp(x)
    param_ids = {id(p) for p in mlp.parameters()}
    secateurs.finalize_(mlp)
    assert list(masked_tensors(mlp)) == []
    assert type(mlp.fc1) is nn.Linear
    assert not any("parametrizations" in k for k in mlp.state_dict())
    assert {id(p) for p in mlp.parameters()} == param_ids  # optimizers stay valid
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    assert abs((mlp.fc1.weight == 0).float().mean().item() - 0.6) < 0.01


def test_finalizing_a_copy_leaves_the_original_working(mlp):
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.5))
    clone = secateurs.finalize_(copy.deepcopy(mlp))
    x = torch.randn(3, 32)
    torch.testing.assert_close(clone(x), mlp(x))
    assert secateurs.get_mask(mlp.fc1) is not None


def test_effective_state_dict_has_plain_keys(mlp):
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.5))
    state, masks = effective_state_dict(mlp)
    assert set(state) == set(MLP_KEYS)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    assert torch.equal(state["fc1.weight"] != 0, masks["fc1.weight"] & (state["fc1.weight"] != 0))


MLP_KEYS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"]


def test_setting_a_mask_computes_no_masked_copy_and_keeps_nan_out(monkeypatch):
    """Masking a weight (or masking it again) never evaluates the parametrization: for a large
    projection that would be a masked copy of the weight, just to be looked at. Pruned slots read
    zero even where the stored value was inf or nan."""
    from secateurs.masks import Mask, get_mask, set_mask_

    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[0, 0], layer.weight[1, 1], layer.weight[2, 2] = float("nan"), float("inf"), -1.5
    calls = []
    original_forward = Mask.forward
    monkeypatch.setattr(Mask, "forward", lambda self, x: calls.append(1) or original_forward(self, x))
    first = torch.ones(4, 8, dtype=torch.bool)
    first[0, 0] = first[1, 1] = False
    set_mask_(layer, first)
    second = torch.ones(4, 8, dtype=torch.bool)
    second[2, 2] = False
    set_mask_(layer, second)
    assert calls == []
    assert torch.equal(get_mask(layer), first & second)
    stored = layer.parametrizations.weight.original
    assert torch.equal(stored == 0, ~(first & second)) and not bool(torch.signbit(stored[2, 2]))
    weight = layer.weight  # the parametrization runs here, once
    assert calls == [1] and torch.isfinite(weight).all() and torch.equal(weight == 0, ~(first & second))
    with pytest.raises(secateurs.SecateursError, match="does not fit"):
        set_mask_(layer, torch.ones(3, 8, dtype=torch.bool))
