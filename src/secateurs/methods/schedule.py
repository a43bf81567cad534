"""Pruning schedules: how much of the target sparsity is reached when.

Zhu & Gupta (2017), "To prune, or not to prune": sparsity rises from
``initial`` to ``final`` over ``n`` pruning events spaced ``every`` steps
apart, following a cubic that prunes fast while many redundant weights remain
and slowly near the end:

    s_t = final + (initial - final) * (1 - (t - start) / (n * every)) ** 3

The schedule is plain arithmetic on step numbers, used by the unstructured method's ``steps``
and by gradual pruning during training (:class:`secateurs.train.GradualPruner`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SecateursError

__all__ = ["AGP"]


@dataclass(frozen=True)
class AGP:
    """The cubic sparsity schedule of automated gradual pruning.

    Attributes:
        final: sparsity reached at ``end`` and kept afterwards, in [0, 1).
        initial: sparsity at ``start``.
        start: first training step that prunes.
        end: step at which ``final`` is reached.
        every: prune every this many steps between ``start`` and ``end``.

    Example:
        >>> from secateurs.train import AGP
        >>> s = AGP(final=0.8, start=0, end=100, every=10)
        >>> [round(s.sparsity(t), 3) for t in (0, 50, 100, 200)]
        [0.0, 0.7, 0.8, 0.8]
    """

    final: float
    initial: float = 0.0
    start: int = 0
    end: int = 1000
    every: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise SecateursError(f"AGP needs 0 <= initial <= final < 1, got initial={self.initial}, final={self.final}")
        if self.start < 0 or self.end <= self.start:
            raise SecateursError(f"AGP needs 0 <= start < end, got start={self.start}, end={self.end}")
        if self.every < 1:
            raise SecateursError(f"AGP's every must be at least 1, got {self.every}")

    def sparsity(self, step: int) -> float:
        """Target sparsity at training step ``step``."""
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        progress = (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def is_pruning_step(self, step: int) -> bool:
        """Whether the schedule prunes at ``step`` (``start``, then every ``every`` steps, and ``end``)."""
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)
