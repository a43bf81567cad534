"""Sensitivity curves and the allocation of a cut from them: how much each unit alone can lose.

This module measures and allocates; it knows no method. The entry point that
resolves a method's selection and scans a model is
:func:`secateurs.methods.sensitivity.sensitivity`, and the channel and
unstructured methods use the curves here for ``allocate='sensitivity'``.

For every channel group (``channel``) or prunable layer (``unstructured``)
and every ratio of a grid, the unit alone is pruned and the model is scored
on a few batches against the dense model: the task loss (cross-entropy with
labels, else the relative output error), accuracy with labels, and top-1
agreement with the dense model for classifiers.

Pruning a channel is simulated by zeroing every parameter slice the channel
owns across its coupled group, which gives exactly the outputs physical
removal would (the equivalence the structured engine is tested on); the
slices are restored afterwards, so the scan needs no copy of the model.

:func:`allocate` turns the curves into per-group ratios: a greedy walk that
always takes the next step with the least loss increase per MAC saved, so
fragile groups (e.g. MobileNetV2's narrow bottlenecks) keep their channels.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..graph import DependencyGraph
from ..importance.elementwise import element_scores
from ..importance.replay import PrefixReplay
from ..importance.stats import ReferenceBatches, split_batch, task_loss
from ..masks import get_mask, lowest_k, plain_name
from ..progress import Progress
from ..selection import call_model
from ..utils import eval_mode, first_tensor
from .common import make_generator

__all__ = ["DEFAULT_RATIOS", "Curve", "SensitivityResult", "allocate", "allocation_order", "channel_curves",
           "drop_counts", "unstructured_curves"]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Curve:
    """The metric of the model with one unit pruned at each ratio (ratio 0 is the dense model)."""

    name: str
    size: int  # channels of the group, or weights of the layer
    ratios: list[float]
    loss: list[float]
    accuracy: list[float] | None = None
    agreement: list[float] | None = None
    macs_saved: list[int] | None = None  # MACs the model loses with the unit pruned at each ratio
    group: int | None = None


@dataclass
class SensitivityResult:
    method: str
    metric: str  # the main metric: accuracy (labels), agreement (class outputs) or loss
    curves: list[Curve] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "metric": self.metric, "baseline": self.baseline, "batches": self.batches,
                "curves": [asdict(c) for c in self.curves]}

    def to_csv(self) -> str:
        """One row per (unit, ratio)."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["unit", "size", "ratio", "loss", "accuracy", "agreement", "macs_saved"])
        for c in self.curves:
            for i, r in enumerate(c.ratios):
                writer.writerow([c.name, c.size, r, c.loss[i], c.accuracy[i] if c.accuracy else "",
                                 c.agreement[i] if c.agreement else "", c.macs_saved[i] if c.macs_saved else ""])
        return out.getvalue()


class _Scorer(ReferenceBatches):
    """Scores a model on fixed batches against the dense model's outputs.

    Used as a context manager: with ``replay``, trials re-use the dense run's
    module outputs up to the changed layer (:class:`~secateurs.importance.replay.PrefixReplay`).
    """

    def __init__(self, model: nn.Module, data: Sequence[Any], batches: int, replay: bool = True) -> None:
        super().__init__(model, data, batches, "sensitivity analysis")
        self.labelled = all(split_batch(b)[1] is not None for b in self.batches)
        ref = first_tensor(getattr(self.reference[0], "logits", self.reference[0]))
        self.classifier = ref is not None and ref.dim() == 2 and ref.shape[1] > 1
        self.replay = PrefixReplay(model) if replay else None
        # a language model's KV cache is state the layers share (and replay cannot compare): none is needed here
        self.options = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}

    def __enter__(self) -> _Scorer:
        if self.replay is not None:
            self.replay.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.replay is not None:
            self.replay.__exit__(*exc)

    def dense(self) -> dict[str, float]:
        """The dense model's scores (recorded for the trials' replay)."""
        with self.replay.recording() if self.replay is not None else contextlib.nullcontext():
            return self()

    def trial(self, changed: Sequence[Tensor]) -> dict[str, float]:
        """The scores with only the ``changed`` tensors differing from the dense model."""
        with self.replay.trial(changed) if self.replay is not None else contextlib.nullcontext():
            return self()

    def __call__(self) -> dict[str, float]:
        loss = acc = agree = 0.0
        count = 0
        with torch.no_grad(), eval_mode(self.model):
            for batch, ref in zip(self.batches, self.reference, strict=True):
                x, y = split_batch(batch)
                out = call_model(self.model, x, **self.options)
                loss += float(task_loss(out, batch, ref))
                logits = first_tensor(getattr(out, "logits", out))
                if self.classifier:
                    pred = logits.argmax(1)
                    ref_logits = first_tensor(getattr(ref, "logits", ref))
                    agree += float((pred == ref_logits.argmax(1)).float().sum())
                    if self.labelled:
                        acc += float((pred == y).float().sum())
                    count += len(pred)
        n = len(self.batches)
        scores = {"loss": loss / n}
        if self.classifier:
            scores["agreement"] = agree / count
            if self.labelled:
                scores["accuracy"] = acc / count
        return scores

    @property
    def metric(self) -> str:
        return "accuracy" if self.labelled and self.classifier else "agreement" if self.classifier else "loss"


def _record(curve: Curve, scores: dict[str, float]) -> None:
    curve.loss.append(scores["loss"])
    for key in ("accuracy", "agreement"):
        if key in scores:
            values = getattr(curve, key)
            if values is None:
                setattr(curve, key, values := [])
            values.append(scores[key])


def drop_counts(size: int, ratios: Sequence[float]) -> list[int]:
    """Channels removed at each ratio (never all of them)."""
    return [max(0, min(size - 1, math.floor(r * size + 0.5))) for r in ratios]


def _stored(module: nn.Module, name: str) -> Tensor:
    """The tensor that holds ``module.<name>``: the parametrization's original when a mask is in force."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _stored_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by their plain names (``conv.weight``), the originals of masked ones included."""
    return {plain_name(k): v for k, v in model.named_parameters(remove_duplicate=False)}


def channel_curves(
    model: nn.Module,
    graph: DependencyGraph,
    scores: dict[int, Tensor],
    data: Sequence[Any],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    batches: int = 4,
    macs_saved: Any = None,
    progress: bool | None = None,
    replay: bool = True,
) -> SensitivityResult:
    """One curve per channel group: the group alone loses its lowest-scoring channels at each ratio.

    Args:
        model: the model (restored exactly after every trial).
        graph: its coupled groups.
        scores: channel importance per group id (higher = keep).
        data: calibration batches (labels optional).
        ratios: fractions of each group's channels to remove.
        batches: how many batches of ``data`` to score on.
        macs_saved: optional ``fn(group, removed_positions) -> int`` recording what each trial saves.
        progress: show a progress bar on stderr.
        replay: answer the modules a trial leaves unchanged from the dense run's record
            (exact for inference-mode modules; see :mod:`secateurs.importance.replay`).
    """
    with _Scorer(model, data, batches, replay) as scorer:
        result, trials = _channel_curves(scorer, graph, scores, ratios, progress)
    if macs_saved is not None:  # after the scan: counting MACs copies the model, which must be itself again
        for curve in result.curves:
            curve.macs_saved = [int(macs_saved(g, idx)) if idx.numel() else 0 for g, idx in trials[curve.group]]
    return result


def _channel_curves(scorer: _Scorer, graph: DependencyGraph, scores: dict[int, Tensor], ratios: Sequence[float],
                    progress: bool | None) -> tuple[SensitivityResult, dict[int, list[tuple[Any, Tensor]]]]:
    """The scan, and each group's trials (the channels each one removed, the dense point first)."""
    trials: dict[int, list[tuple[Any, Tensor]]] = {}
    params = _stored_tensors(scorer.model)
    result = SensitivityResult(method="channel", metric=scorer.metric, baseline=scorer.dense(),
                               batches=len(scorer.batches))
    bar = Progress(len(graph.groups) * len(ratios), "sensitivity", enabled=progress)
    for g in graph.groups:
        order = torch.argsort(scores[g.id], stable=True)
        curve = Curve(name=g.describe(), size=g.size, ratios=[0.0], loss=[], group=g.id)
        trials[g.id] = [(g, order[:0])]
        _record(curve, result.baseline)
        members = [(params[m.tensor], m.dim, g.indices[m]) for m in g.members if m.tensor in params]
        for ratio, drop in zip(ratios, drop_counts(g.size, ratios), strict=True):
            idx = order[:drop]
            saved = [(p, dim, rows[idx].reshape(-1)) for p, dim, rows in members]
            backup = [p.detach().index_select(dim, i.to(p.device)) for p, dim, i in saved]
            with torch.no_grad():
                for p, dim, i in saved:
                    p.index_fill_(dim, i.to(p.device), 0)
            try:
                _record(curve, scorer.trial([p for p, _, _ in saved]))
            finally:
                with torch.no_grad():
                    for (p, dim, i), b in zip(saved, backup, strict=True):
                        p.index_copy_(dim, i.to(p.device), b)
            curve.ratios.append(float(ratio))
            trials[g.id].append((g, idx))
            bar.update()
        result.curves.append(curve)
    bar.close()
    return result, trials


def unstructured_curves(
    model: nn.Module,
    targets: Sequence[Any],
    data: Sequence[Any],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    batches: int = 4,
    importance: str = "magnitude",
    seed: int | None = None,
    progress: bool | None = None,
    replay: bool = True,
) -> SensitivityResult:
    """One curve per layer: that layer alone loses its lowest-scoring weights at each ratio.

    ``replay``: as in :func:`channel_curves`.
    """
    with _Scorer(model, data, batches, replay) as scorer:
        return _unstructured_curves(scorer, targets, ratios, importance, seed, progress)


def _unstructured_curves(scorer: _Scorer, targets: Sequence[Any], ratios: Sequence[float], importance: str,
                         seed: int | None, progress: bool | None) -> SensitivityResult:
    result = SensitivityResult(method="unstructured", metric=scorer.metric, baseline=scorer.dense(),
                               batches=len(scorer.batches))
    bar = Progress(len(targets) * len(ratios), "sensitivity", enabled=progress)
    gen = make_generator(seed)
    for t in targets:
        weight = _stored(t.module, t.tensor)  # with a mask in force, the Parameter behind it
        curve = Curve(name=t.name, size=weight.numel(), ratios=[0.0], loss=[])
        _record(curve, result.baseline)
        original = weight.detach().clone()
        scores = element_scores(importance, t.weight.detach(), get_mask(t.module, t.tensor), gen)
        for ratio in ratios:
            drop = lowest_k(scores.float(), round(ratio * original.numel()))
            with torch.no_grad():
                weight.masked_fill_(drop.to(weight.device), 0)
            try:
                _record(curve, scorer.trial([weight]))
            finally:
                with torch.no_grad():
                    weight.copy_(original)
            curve.ratios.append(float(ratio))
            bar.update()
        result.curves.append(curve)
    bar.close()
    return result


def allocation_order(curves: Sequence[Curve], cost_key: str = "macs_saved") -> list[tuple[int, int]]:
    """Greedy steps ``(curve index, ratio index)``, cheapest loss increase per unit saved first.

    Each curve's steps are taken in order; a step's price is its loss increase
    divided by what it saves (MACs, or channels when MACs are not recorded).
    """
    def saved(c: Curve, i: int) -> float:
        values = getattr(c, cost_key) if cost_key else None
        return float(values[i]) if values is not None else c.ratios[i] * c.size

    def price(c: Curve, i: int) -> float:
        gain = saved(c, i) - saved(c, i - 1)
        return (c.loss[i] - c.loss[i - 1]) / gain if gain > 0 else (math.inf if c.loss[i] > c.loss[i - 1] else 0.0)

    heap = [(price(c, 1), k, 1) for k, c in enumerate(curves) if len(c.ratios) > 1]
    heapq.heapify(heap)
    order = []
    while heap:
        _, k, i = heapq.heappop(heap)
        order.append((k, i))
        c = curves[k]
        if i + 1 < len(c.ratios):
            heapq.heappush(heap, (price(c, i + 1), k, i + 1))
    return order


def allocate(curves: Sequence[Curve], fraction: float, order: list[tuple[int, int]] | None = None) -> dict[int, float]:
    """Per-group removal ratios after taking the first ``fraction`` of the greedy steps.

    The step the fraction ends inside is taken in part (its group's ratio interpolated
    between the grid points), so a target is met closely rather than overshot by a whole step.
    """
    order = order if order is not None else allocation_order(curves)
    chosen = {c.group: 0.0 for c in curves}
    position = min(max(fraction, 0.0), 1.0) * len(order)
    whole = math.floor(position)
    for k, i in order[:whole]:
        chosen[curves[k].group] = curves[k].ratios[i]
    if whole < len(order) and position > whole:
        k, i = order[whole]
        c = curves[k]
        chosen[c.group] = c.ratios[i - 1] + (position - whole) * (c.ratios[i] - c.ratios[i - 1])
    return chosen
