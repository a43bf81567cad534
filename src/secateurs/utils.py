"""Small helpers with no pruning logic in them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "first_line"]


@contextlib.contextmanager
def eval_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or train) mode and restore every submodule's mode afterwards.

    Forward passes we run for analysis must not update BatchNorm statistics.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, training_before in modes:
            m.training = training_before


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
