"""Prefix replay: sensitivity trials re-use the dense run's module outputs, with exactly the same results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs
from secateurs.importance.replay import PrefixReplay
from secateurs.methods.sensitivity import sensitivity


class _Mutating(nn.Module):
    """Works in place on a submodule's output, reuses one ReLU, branches on values, reads a weight it does not own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU(inplace=True)
        self.big = nn.Conv2d(8, 8, 3, padding=1)
        self.small = nn.Conv2d(8, 8, 1)
        self.embed = nn.Linear(8, 8)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.a(x)
        y += self.b(x)  # in place on a's output
        y = self.relu(y)
        y = self.big(y) if float(y.detach().mean()) > 0.05 else self.small(y)  # the path depends on the values
        y = self.relu(y).mean((2, 3))
        return self.head(y, self.embed.weight)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 5)

    def forward(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.out(y @ weight)  # a weight of another module, passed as an argument


def _data(n: int = 3) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["unstructured", "channel"])
def test_replay_gives_exactly_the_results_of_full_forwards(method):
    torch.manual_seed(0)
    model = _Mutating().eval()
    kwargs = dict(method=method, ratios=[0.3, 0.7, 0.95], batches=3, example_inputs=torch.randn(1, 3, 8, 8))
    fast = sensitivity(model, _data(), **kwargs)
    slow = sensitivity(model, _data(), replay=False, **kwargs)
    assert [c.name for c in fast.curves] == [c.name for c in slow.curves]
    for f, s in zip(fast.curves, slow.curves, strict=True):
        assert f.loss == s.loss and f.accuracy == s.accuracy and f.agreement == s.agreement
    assert any(len(set(c.loss)) > 1 for c in fast.curves)  # the trials did change the model


def test_replay_skips_the_prefix_and_survives_in_place_code():
    torch.manual_seed(0)
    model = _Mutating().eval()
    x = torch.randn(4, 3, 8, 8)
    saved = model.b.weight.detach().clone()
    with PrefixReplay(model) as replay, torch.no_grad():
        with replay.recording():
            dense = model(x)
        for _ in range(2):  # twice: the first trial's in-place code must not have spoilt the record
            with replay.trial([model.b.weight]):
                model.b.weight.mul_(0.0)
                trial = model(x)
                model.b.weight.add_(torch.randn_like(model.b.weight))
            with replay.trial([model.b.weight]):
                again = model(x)
            expected = model(x)  # outside a trial: a plain forward
            assert torch.equal(again, expected)
        assert replay.skipped > 0
        model.b.weight.copy_(saved)  # the dense model again: only the head changes
        model.head.out.weight.mul_(2.0)
        with replay.trial([model.head.out.weight]):
            trial = model(x)
        assert torch.equal(trial, model(x))
    assert not torch.equal(trial, dense)
    with torch.no_grad():
        model.head.out.weight.div_(2.0)
        assert torch.equal(model(x), dense)
    assert "forward" not in model.stem.__dict__  # the wrappers are gone


def test_a_weight_passed_as_an_argument_is_noticed():
    torch.manual_seed(0)
    model = _Mutating().eval()
    x = torch.randn(4, 3, 8, 8)
    with PrefixReplay(model) as replay, torch.no_grad():
        with replay.recording():
            model(x)
        with replay.trial([model.embed.weight]):  # owned by embed, which is never called
            model.embed.weight.mul_(-1.0)
            out = model(x)
    assert torch.equal(out, model(x))


def test_no_budget_means_no_replay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    with PrefixReplay(model, budget_bytes=0) as replay, torch.no_grad():
        with replay.recording():
            model(x)
        with replay.trial([model[2].weight]):
            model(x)
    assert replay.skipped == 0


@needs("transformers")
def test_language_model_scan_replays_whole_decoder_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    data = [torch.randint(0, 64, (2, 12)) for _ in range(2)]
    fast = sensitivity(model, data, method="unstructured", ratios=[0.5, 0.9], batches=2,
                       config=secateurs.Unstructured(sparsity=0.5, include=["model.layers.3"]))
    slow = sensitivity(model, data, method="unstructured", ratios=[0.5, 0.9], batches=2, replay=False,
                       config=secateurs.Unstructured(sparsity=0.5, include=["model.layers.3"]))
    assert [c.loss for c in fast.curves] == [c.loss for c in slow.curves] and len(fast.curves) == 7
    assert any(c.loss[2] != c.loss[0] for c in fast.curves)
    with PrefixReplay(model) as replay, torch.no_grad():  # the cache is off: decoder layers are answered whole
        with replay.recording():
            model(data[0], use_cache=False)
        layers = [c for c in replay.runs[0].calls if type(c.module).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == 4 and all(c.usable for c in layers)


class _Carry(nn.Module):
    """Carries something from one forward to the next, ahead of the pruned layer, in one of four ways."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 8)
        self.register_buffer("running", torch.ones(8))
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> list:
        h = self.a(x)
        if self.kind == "attribute":
            self.scale = float(h.detach().abs().mean())  # read by the parent
        elif self.kind == "buffer":  # through .data: no version bump
            self.running.data.mul_(0.5).add_(0.5 * h.detach().abs().mean(0))
            h = h / self.running
        elif self.kind == "random":
            h = h + 0.1 * torch.randn_like(h)  # later draws depend on this one having happened
        return [h, self.b(h)]


class _Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.carry = _Carry(kind)
        self.noise = nn.Linear(8, 8)
        self.last = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # the same draws in every forward, as long as every module runs
        feats = self.carry(x)
        feats[-1] = feats[-1] * 2  # the caller changes the list a module returned
        y = (feats[0] + feats[-1]) * self.carry.scale
        y = y + 0.1 * torch.randn_like(y)
        return self.last(torch.relu(self.noise(y)))


@pytest.mark.parametrize("kind", ["list", "attribute", "buffer", "random"])
def test_state_carried_between_forwards_is_not_replayed(kind):
    torch.manual_seed(0)
    model = _Model(kind).eval()
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]
    kwargs = dict(method="unstructured", ratios=[0.5, 0.9], batches=2,
                  config=secateurs.Unstructured(sparsity=0.5, include=["last", "noise"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = sensitivity(model, data, **kwargs)
    model.load_state_dict(state)
    slow = sensitivity(model, data, replay=False, **kwargs)
    assert [c.loss for c in fast.curves] == [c.loss for c in slow.curves]


def test_unusual_tensors_are_run_not_recorded():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        dense = model(x, src_key_padding_mask=mask)
        with PrefixReplay(model) as replay:  # the fast path hands nested tensors to the layers
            with replay.recording():
                model(x, src_key_padding_mask=mask)
            with replay.trial([model.layers[1].linear2.weight]):
                again = model(x, src_key_padding_mask=mask)
    assert torch.equal(again, dense)
    with torch.inference_mode():
        y = torch.randn(3, 4)
    small = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with PrefixReplay(small) as replay, torch.no_grad():
        with replay.recording():
            small(y)  # inference tensors have no version counter: not recorded
        with replay.trial([small[1].weight]):
            small(y)
    assert replay.skipped == 0


def test_equality_is_bitwise_and_changed_tensors_are_found_by_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(3, 3)).eval()
    zero, negative_zero = torch.zeros(2, 3), -torch.zeros(2, 3)
    with PrefixReplay(model) as replay, torch.no_grad():
        with replay.recording():
            model(zero)
        with replay.trial([model[1].weight]):
            model(negative_zero)  # equal by ==, not bit for bit: run
        assert replay.skipped == 0
        with replay.trial([model[1].weight.detach()]):  # the parameter's memory: still blocks the layer
            model[1].weight.mul_(2.0)
            out = model(zero)
    assert torch.equal(out, model(zero))
