"""Shared fixtures: small models and helpers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs(module: str):
    """Skip a test cleanly (with the reason) when an optional package is absent."""
    return pytest.mark.skipif(not has(module), reason=f"optional package '{module}' is not installed")


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def cnn() -> nn.Module:
    from secateurs.zoo import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN().eval()


@pytest.fixture
def digits_input() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_same_model(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> None:
    """Bit-identical weights and outputs equal to float tolerance.

    Outputs are not compared bit for bit: oneDNN may pick a different kernel
    for tensors at different memory alignments, which moves the last ulp.
    """
    from secateurs.masks import effective_state_dict

    sa, sb = effective_state_dict(a)[0], effective_state_dict(b)[0]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        out_a, out_b = a(*inputs), b(*inputs)
    out_a = getattr(out_a, "logits", out_a)
    out_b = getattr(out_b, "logits", out_b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)


def zero_channels(model: nn.Module, x, fraction: float) -> None:
    """Zero every tensor slice of the lowest-index ``fraction`` of each channel group.

    Such channels contribute nothing, so removing them must not change the output
    (the equivalence oracle of channel surgery).
    """
    from secateurs.graph import build_graph

    graph = build_graph(model, x)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for group in graph.groups:
            k = int(fraction * group.size)
            for member in group.members:
                for idx in group.indices[member][:k]:
                    tensors[member.tensor].index_fill_(member.dim, idx, 0.0)


class Residual(nn.Module):
    """``relu(x + bn(conv(x)))``: a residual block whose channels are tied to its input's."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class AttnNet(nn.Module):
    """nn.MultiheadAttention (packed in_proj_weight) followed by a head."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.att(x, x, x, need_weights=False)[0])


class SeedConvNet(nn.Module):
    """The seed note's ConvNet: conv1 3->64, conv2 64->128."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class Mixed(nn.Module):
    """Residuals, concat, chunk, grouped and depthwise convs, a channel shuffle, flatten into Linear."""

    def __init__(self, width: int = 16, groups: int = 4, group_stats: bool = True) -> None:
        super().__init__()
        w = width
        # GroupNorm/LayerNorm statistics change when zeroed channels are removed;
        # group_stats=False swaps them for BatchNorm/Identity for equivalence tests.
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.branch_a = nn.Conv2d(w, w, 1)
        self.branch_b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w))
        norm = nn.GroupNorm(2, 2 * w) if group_stats else nn.BatchNorm2d(2 * w)
        self.grouped = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=groups), norm)
        self.mix = nn.Conv2d(w, w, 1)
        self.prelu = nn.PReLU(2 * w)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(2 * w * 4, 32),
                                  nn.LayerNorm(32) if group_stats else nn.Identity(), nn.GELU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.grouped(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.mix(b)], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.head(self.prelu(x))


class AttnBlock(nn.Module):
    """A pre-projection, nn.MultiheadAttention with a residual, and a head."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(6, width)
        self.att = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = h + self.att(h, h, h, need_weights=False)[0]
        return self.head(h)


# Loads every folder with transformers alone (compressed-tensors folders decompress on the first forward) and
# writes the logits, the dtype and layer 1's q_proj weight of each; fails if secateurs got imported.
STOCK = textwrap.dedent("""
    import sys, torch, transformers
    x = torch.load(sys.argv[1], weights_only=True)
    out = {}
    for folder in sys.argv[3:]:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out[folder] = model(x).logits
        out[folder + ":dtype"] = torch.zeros(0, dtype=model.dtype)
        if len(model.model.layers) > 1:
            out[folder + ":q_proj"] = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    assert "secateurs" not in sys.modules
    torch.save(out, sys.argv[2])
""")


def stock_outputs(tmp_path, x, folders) -> dict:
    """What stock transformers makes of each folder, in a fresh process that never imports secateurs."""
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", STOCK, str(tmp_path / "x.pt"), str(tmp_path / "out.pt"),
                           *map(str, folders)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)
