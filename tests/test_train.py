"""Regularisers, schedules and the recovery trainer (KD, checkpoints, resume, masks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import secateurs
from secateurs.errors import SecateursError
from secateurs.masks import effective_state_dict, get_mask
from secateurs.train import AGP, FinetuneConfig, GradualPruner, evaluate_dataset, finetune
from secateurs.zoo import DigitsCNN, SmallResNet


@pytest.fixture(scope="module")
def digits():
    from conftest import has

    if not has("sklearn"):
        pytest.skip("optional package 'sklearn' is not installed")
    from secateurs.data import load_dataset

    split = load_dataset("digits")
    return TensorDataset(split.x_train, split.y_train), TensorDataset(split.x_test, split.y_test)


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 1, "progress": False, "batch_size": 64} | kw)


# -- regularisers -----------------------------------------------------------------------------


def test_slimming_gradient_is_strength_times_sign_of_gamma(cnn):
    reg = secateurs.SlimmingRegularizer(cnn, strength=1e-3)
    bns = [m for m in cnn.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(-1, 1)
    value = reg()
    assert value.item() == pytest.approx(1e-3 * sum(bn.weight.abs().sum().item() for bn in bns), rel=1e-6)
    value.backward()
    for bn in bns:
        torch.testing.assert_close(bn.weight.grad, 1e-3 * bn.weight.sign())
        assert bn.bias.grad is None  # only the scales are penalised


def test_group_lasso_gradient_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    reg = secateurs.GroupLassoRegularizer(model, torch.randn(2, 4), strength=0.5)
    assert reg.units == 6  # the hidden neurons; inputs and outputs are coupled to the model's interface
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    norms = (w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0)).sqrt()  # row of fc1, its bias, column of fc2
    torch.testing.assert_close(reg.norms(), norms.detach())
    reg().backward()
    torch.testing.assert_close(w1.grad, 0.5 * w1.detach() / norms.detach()[:, None])
    torch.testing.assert_close(b1.grad, 0.5 * b1.detach() / norms.detach())
    torch.testing.assert_close(w2.grad, 0.5 * w2.detach() / norms.detach()[None, :])
    assert model[2].bias.grad is None


def test_group_lasso_spans_a_residual_stage():
    model = SmallResNet(width=8, blocks=2)
    reg = secateurs.GroupLassoRegularizer(model, torch.randn(1, 1, 28, 28))
    # stem+stage1 shared (8), two inner convs (8 each), then the same at widths 16 and 32
    assert reg.units == 3 * 8 + 3 * 16 + 3 * 32
    with torch.no_grad():
        model.stem[0].weight[2].zero_()
        model.stem[1].weight[2] = 0.0
        model.stem[1].bias[2] = 0.0
    # channel 2 of stage 1 is still alive in every residual conv that writes it
    assert reg.below(1e-6).below == 0


def test_growing_strength_and_state_round_trip(cnn):
    reg = secateurs.SlimmingRegularizer(cnn, strength=1e-4, growth=1e-4)
    assert reg.step() == pytest.approx(2e-4)
    other = secateurs.SlimmingRegularizer(cnn)
    other.load_state_dict(reg.state_dict())
    assert other.strength == pytest.approx(2e-4) and other.growth == pytest.approx(1e-4)


def test_regulariser_errors():
    with pytest.raises(SecateursError, match="no affine BatchNorm"):
        secateurs.SlimmingRegularizer(nn.Linear(3, 3))
    with pytest.raises(SecateursError, match=">= 0"):
        secateurs.SlimmingRegularizer(DigitsCNN(), strength=-1)
    with pytest.raises(SecateursError, match="unknown regulariser"):
        FinetuneConfig(regularize="l0")


def test_slimming_drives_gammas_toward_zero(digits):
    train, _ = digits
    torch.manual_seed(0)
    plain, slim = DigitsCNN(width=16), DigitsCNN(width=16)
    slim.load_state_dict(plain.state_dict())
    finetune(plain, train, config=_cfg(epochs=8))
    result = finetune(slim, train, config=_cfg(epochs=8, regularize="bn-l1", reg_strength=0.03))

    def near_zero(m):
        g = torch.cat([b.weight.detach().abs() for b in m.modules() if isinstance(b, nn.BatchNorm2d)])
        return int((g < 0.05).sum())

    assert near_zero(plain) == 0
    assert near_zero(slim) >= 30  # of 112: the task keeps the rest alive
    assert result.history[-1]["train_accuracy"] > 0.95
    assert result.history[-1]["reg_below_1e-2"] > 0


# -- AGP ----------------------------------------------------------------------------------------


def test_agp_schedule_values():
    s = AGP(final=0.9, initial=0.1, start=10, end=110, every=25)
    assert s.sparsity(0) == 0.1 and s.sparsity(10) == 0.1
    assert s.sparsity(60) == pytest.approx(0.9 - 0.8 * 0.5**3)
    assert s.sparsity(85) == pytest.approx(0.9 - 0.8 * 0.25**3)
    assert s.sparsity(110) == 0.9 and s.sparsity(10_000) == 0.9
    assert [t for t in range(0, 130) if s.is_pruning_step(t)] == [10, 35, 60, 85, 110]
    values = [s.sparsity(t) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))  # monotone
    with pytest.raises(SecateursError, match="initial <= final"):
        AGP(final=0.5, initial=0.6)


def test_gradual_pruner_masks_grow_monotonically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    pruner = GradualPruner(model, AGP(final=0.75, start=0, end=4, every=1),
                           secateurs.Unstructured(sparsity=0.0, prune_output_layer=True))
    seen = []
    for step in range(6):
        before = get_mask(model[0])
        applied = pruner(step)
        mask = get_mask(model[0])
        if before is not None:
            assert not (mask & ~before).any()  # nothing revived
        seen.append(applied)
        if mask is not None:
            assert (model[0].weight[~mask] == 0).all()
    assert seen[0] is None and seen[-1] is None  # step 0 has sparsity 0; after end nothing changes
    assert 1 - get_mask(model[0]).float().mean().item() == pytest.approx(0.75)


# -- trainer --------------------------------------------------------------------------------------


def test_finetune_learns_digits_with_kd_and_keeps_masks(digits):
    train, test = digits
    torch.manual_seed(0)
    teacher = DigitsCNN(width=16)
    finetune(teacher, train, config=_cfg(epochs=3))
    assert evaluate_dataset(teacher, test)["accuracy"] > 0.9
    student = copy.deepcopy(teacher)
    secateurs.prune_(student, secateurs.Unstructured(sparsity=0.8, scope="global"))
    masks = {n: get_mask(m).clone() for n, m in student.named_modules() if get_mask(m) is not None}
    result = finetune(student, train, val=test, teacher=teacher, config=_cfg(epochs=2, kd_weight=0.7))
    assert result.final["accuracy"] > 0.9
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training  # the caller's teacher untouched
    assert [h["epoch"] for h in result.history] == [1, 2] and "val_accuracy" in result.history[0]
    for name, mask in masks.items():
        module = student.get_submodule(name)
        assert torch.equal(get_mask(module), mask)
        assert (module.weight[~mask] == 0).all()  # zeros stayed zero through training


def test_gradual_sparsity_in_training(digits):
    train, test = digits
    torch.manual_seed(0)  # the model's initial weights: without a seed they depend on the tests run before
    model = DigitsCNN(width=16)
    result = finetune(model, train, val=test, config=_cfg(epochs=3, gradual_sparsity=0.7, gradual_end=0.5))
    assert result.history[-1]["sparsity"] == pytest.approx(0.7)
    w = model.features[3].weight
    assert (w == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert result.final["accuracy"] > 0.5


def test_resume_reproduces_an_uninterrupted_run(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    base = nn.Sequential(DigitsCNN(width=8), nn.Dropout(0.2))  # dropout: the RNG state must resume too
    cfg = dict(epochs=3, regularize="bn-l1", reg_growth=1e-4, gradual_sparsity=0.5, gradual_end=0.6)

    straight = copy.deepcopy(base)
    finetune(straight, train, config=_cfg(**cfg, checkpoint_dir=str(tmp_path / "a")))

    class Stop(Exception):
        pass

    def stop_after_one(epoch, metrics):
        if epoch == 1:
            raise Stop

    interrupted = copy.deepcopy(base)
    with pytest.raises(Stop):
        finetune(interrupted, train, config=_cfg(**cfg, checkpoint_dir=str(tmp_path / "b")),
                 on_epoch_end=stop_after_one)
    resumed = copy.deepcopy(base)  # a fresh process would start from the same untrained weights
    result = finetune(resumed, train, config=_cfg(**cfg, checkpoint_dir=str(tmp_path / "b"), resume=True))
    assert result.resumed_from == 1 and len(result.history) == 3
    a, _ = effective_state_dict(straight)
    b, _ = effective_state_dict(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_run(digits, tmp_path):
    train, _ = digits
    finetune(DigitsCNN(width=8), train, config=_cfg(checkpoint_dir=str(tmp_path)))
    with pytest.raises(SecateursError, match="same data, batch size, epochs"):
        finetune(DigitsCNN(width=8), train, config=_cfg(epochs=2, checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(SecateursError, match="does not fit this model"):
        finetune(DigitsCNN(width=4), train, config=_cfg(checkpoint_dir=str(tmp_path), resume=True))


def test_teacher_with_another_output_size_is_refused(digits):
    train, _ = digits
    with pytest.raises(SecateursError, match="teacher outputs 3 classes but the model outputs 10"):
        finetune(DigitsCNN(width=4), train, teacher=DigitsCNN(num_classes=3, width=4), config=_cfg(kd_weight=0.5))
    with pytest.raises(SecateursError, match="pass teacher="):
        finetune(DigitsCNN(width=4), train, config=_cfg(kd_weight=0.5))


def test_dataloader_input_keeps_its_batch_size_and_bad_data_is_refused(digits):
    train, _ = digits
    loader = DataLoader(train, batch_size=500, shuffle=True)
    result = finetune(DigitsCNN(width=4), loader, config=_cfg())
    assert len(result.history) == 1
    with pytest.raises(SecateursError, match="empty"):
        finetune(DigitsCNN(width=4), TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))


def test_progress_bar_goes_to_stderr_only(digits, capsys):
    train, _ = digits
    finetune(DigitsCNN(width=4), TensorDataset(*train[:128]), config=_cfg(progress=True))
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1 2/2 loss" in err and " acc " in err


def test_mixed_precision_on_cpu_trains(digits):
    train, test = digits
    runs = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = DigitsCNN(width=16)
        result = finetune(model, train, val=test, config=_cfg(epochs=3, amp=amp))  # bfloat16 autocast on CPU
        assert result.final["accuracy"] > 0.85
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
        runs[amp] = model.features[0].weight.detach()
    assert not torch.equal(runs[False], runs[True])  # autocast really changed the arithmetic
