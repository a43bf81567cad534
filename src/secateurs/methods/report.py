"""What a pruning run did, layer by layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "PruneReport"]


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class PruneReport:
    """Returned by ``prune_``: one entry per pruned tensor plus the layers left out."""

    method: str
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    plan: dict[str, Any] | None = None  # structural methods: what was physically removed
    # channel pruning: per group, five-number summaries of the kept and removed channels'
    # importance (scaled by the group's mean score, so groups compare)
    importance: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None  # the curves behind allocate="sensitivity"
    # channel pruning with reconstruct: per refitted layer, how and its output error before/after
    reconstruction: list[dict[str, Any]] | None = None
    # what the run achieved, as opposed to what was asked (config): e.g. the share of channels really
    # removed, which check ran, whether a target was met and the MACs or latency reached
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the pruned layers' weights."""
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config,
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "layers": [{**asdict(layer), "sparsity": layer.sparsity} for layer in self.layers],
            "skipped": self.skipped,
            **({"outcome": self.outcome} if self.outcome else {}),
            **({"plan": self.plan} if self.plan is not None else {}),
            **({"importance": self.importance} if self.importance is not None else {}),
            **({"sensitivity": self.sensitivity} if self.sensitivity is not None else {}),
            **({"reconstruction": self.reconstruction} if self.reconstruction is not None else {}),
        }
