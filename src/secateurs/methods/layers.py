"""Layer pruning: delete whole blocks (residual blocks, transformer layers), chosen by measured importance.

Data flow: blocks (which entries an identity can stand in for, from a
runtime trace) -> importance (a score per block from calibration activations,
measured loss, or weights) -> strategy (how many and which, respecting
stages and targets) -> plan (``drop``) -> surgery, after a meta rehearsal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..cli_options import option, positive_int
from ..errors import SecateursError
from ..graph.blocks import Block, find_blocks, first_tensor
from ..importance.layer import LAYER_IMPORTANCE, angular_distance, block_influence, magnitude
from ..importance.stats import ReferenceBatches, split_batch, task_loss
from ..progress import Progress
from ..selection import Selection, call_model, declared_module
from ..surgery import Plan, apply_plan_
from ..surgery.rehearsal import (
    checked_on,
    macs_of,
    meta_copy,
    output_shapes,
    plan_macs,
    rehearse,
    to_meta,
)
from ..utils import eval_mode, first_line
from .common import config_to_dict
from .registry import register_method
from .report import LayerReport, PruneReport

__all__ = ["Layers"]


@dataclass(kw_only=True)
class Layers(Selection):
    """Remove whole blocks: residual blocks, inverted residuals, transformer layers.

    Give one target: ``n`` (blocks to remove), ``target_macs`` (fraction of MACs
    to keep) or ``max_loss_increase`` (remove blocks while the measured loss on
    ``data`` grows by at most this much).

    Attributes:
        n: number of blocks to remove.
        target_macs: keep at most this fraction of the model's MACs, in (0, 1].
        max_loss_increase: largest allowed increase of the loss on ``data``.
        importance: ``block_influence`` (1 - cos of a block's input and output,
            ShortGPT), ``angular`` (angular distance of the input of a run of
            blocks and the output of its last; removes one contiguous run per
            stage, Gromov et al.), ``loss`` (loss increase when the block alone
            is skipped) or ``magnitude`` (weights only). Default: ``block_influence``
            with data, ``magnitude`` without; a language model without data is
            refused (weight norms choose its layers badly) unless ``magnitude``
            is asked for by name.
        calib_batches: batches of ``data`` used for scoring and loss checks.
        allow_empty_stage: allow removing every block of a stage (a run of
            same-shape blocks); by default each stage keeps one.

    Example:
        >>> import torch, torchvision, secateurs
        >>> model = torchvision.models.resnet18()
        >>> report = secateurs.prune_(model, secateurs.Layers(n=2), example_inputs=torch.randn(1, 3, 64, 64))
        >>> sum(len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4))
        6
    """

    n: int | None = option(None, flag="--layers", type=positive_int, metavar="K", help="remove K blocks")
    target_macs: float | None = option(None, help="keep this fraction of the model's MACs, in (0, 1]")
    max_loss_increase: float | None = option(None, metavar="X",
                                             help="remove blocks while the loss on --data grows by at most X")
    importance: str | None = option(None, metavar="NAME", choices=lambda: tuple(LAYER_IMPORTANCE))
    calib_batches: int = option(8, type=positive_int, metavar="N")
    allow_empty_stage: bool = False
    method: ClassVar[str] = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_output_layer:
            raise SecateursError("layer pruning removes blocks that keep their input's shape; "
                                 "prune_output_layer does not apply")
        given = [k for k in ("n", "target_macs", "max_loss_increase") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SecateursError("give exactly one of n (blocks to remove), target_macs or max_loss_increase")
        if self.n is not None and self.n < 1:
            raise SecateursError(f"n must be at least 1, got {self.n}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise SecateursError(f"target_macs must be in (0, 1], got {self.target_macs}: e.g. 0.75 keeps 75% of MACs")
        if self.max_loss_increase is not None and self.max_loss_increase < 0:
            raise SecateursError(f"max_loss_increase must be >= 0, got {self.max_loss_increase}")
        if self.importance is not None and self.importance not in LAYER_IMPORTANCE:
            raise SecateursError(f"unknown importance '{self.importance}': choose one of {', '.join(LAYER_IMPORTANCE)}")
        if self.calib_batches < 1:
            raise SecateursError(f"calib_batches must be at least 1, got {self.calib_batches}")


# ---- calibration ----------------------------------------------------------------------------


def _skip_hook(module: nn.Module, args: Any, kwargs: dict, out: Any) -> Any:
    """Make a block act as an identity: its output becomes its input."""
    x = first_tensor(args, kwargs)
    if isinstance(out, Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    return out


class _Calibration(ReferenceBatches):
    """Calibration batches, the dense outputs, and forward passes with some blocks skipped."""

    def __init__(self, model: nn.Module, data: Iterable[Any], batches: int):
        super().__init__(model, data, batches, "layer importance")
        self.dense_loss = self.loss([])

    def loss(self, skipped: list[str]) -> float:
        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_hook(_skip_hook, with_kwargs=True) for name in skipped]
        try:
            with torch.no_grad(), eval_mode(self.model):
                total = sum(float(task_loss(call_model(self.model, split_batch(b)[0]), b, ref))
                            for b, ref in zip(self.batches, self.reference, strict=True))
        finally:
            for h in handles:
                h.remove()
        return total / len(self.batches)

    def activations(self, blocks: list[Block], runs: bool) -> tuple[dict[str, float], dict[tuple[int, int], float]]:
        """Block influence of each block and, with ``runs``, the angular distance of every run
        ``blocks[i..j]`` of consecutive entries of one stage."""
        names = [b.name for b in blocks]
        modules = dict(self.model.named_modules())
        influence = dict.fromkeys(names, 0.0)
        angular: dict[tuple[int, int], float] = {}
        seen: dict[str, tuple[Tensor, Tensor]] = {}  # kept only when runs of blocks are scored
        share = 1 / len(self.batches)

        def recorder(i: int, name: str) -> Any:
            def hook(module: nn.Module, args: Any, kwargs: dict, out: Any) -> None:
                x, y = first_tensor(args, kwargs).detach(), first_tensor(out).detach()
                influence[name] += float(block_influence(x, y)) * share
                angular[(i, i)] = angular.get((i, i), 0.0) + float(angular_distance(x, y)) * share
                if runs:
                    seen[name] = (x, y)

            return hook

        bar = Progress(len(self.batches), "layer importance", enabled=None)
        for batch in self.batches:
            bar.update()
            seen.clear()
            handles = [modules[n].register_forward_hook(recorder(i, n), with_kwargs=True) for i, n in enumerate(names)]
            try:
                with torch.no_grad(), eval_mode(self.model):
                    call_model(self.model, split_batch(batch)[0])
            finally:
                for h in handles:
                    h.remove()
            for i in range(len(names) if runs else 0):
                for j in range(i + 1, len(names)):
                    if blocks[j].stage != blocks[i].stage or blocks[j].position - blocks[i].position != j - i:
                        break  # runs are consecutive entries of one stage
                    x, y = seen[names[i]][0], seen[names[j]][1]
                    angular[(i, j)] = angular.get((i, j), 0.0) + float(angular_distance(x, y)) * share
        bar.close()
        return influence, angular


# ---- strategy -------------------------------------------------------------------------------


class _Chooser:
    """Checks a set of blocks against the stage rule and the target."""

    def __init__(self, model: nn.Module, config: Layers, blocks: list[Block], all_blocks: list[Block],
                 inputs: Any, calib: _Calibration | None):
        self.model, self.config, self.inputs, self.calib = model, config, inputs, calib
        self.stage_size: dict[str, int] = {}
        for b in all_blocks:
            if b.reason != "holds no weight layer":  # a stage of norms and activations is no stage
                self.stage_size[b.stage] = self.stage_size.get(b.stage, 0) + 1
        self.stage_of = {b.name: b.stage for b in blocks}
        self.expected = output_shapes(self._forward(model))
        # counted the way each removal's check runs: on meta copies, or on real tensors for a model the
        # meta device cannot run (a detector's NMS)
        self.base_macs = plan_macs(model, None, inputs, self.expected) if config.target_macs is not None else 0
        self.macs_after: int | None = None
        self.loss_after: float | None = None
        self._plans: dict[tuple[str, ...], Plan] = {}  # one plan per set of blocks: a real check counts it once

    def _forward(self, model: nn.Module) -> Any:
        """The model's output on the example input: on meta tensors, or real ones where meta cannot run it
        (the checks of each removal then run on real tensors too)."""
        try:
            with torch.no_grad():
                return call_model(meta_copy(model).eval(), to_meta(self.inputs))
        except Exception:  # noqa: BLE001  # data-dependent code (.item(), NMS) cannot run on meta tensors
            pass
        try:
            with torch.no_grad(), eval_mode(model):
                return call_model(model, self.inputs)
        except Exception as exc:
            raise SecateursError(f"the model fails on its example input ({first_line(exc)}): check --input-shape "
                                 "(or example_inputs)") from None

    def _plan(self, chosen: list[str]) -> Plan:
        key = tuple(chosen)
        if key not in self._plans:
            self._plans[key] = Plan(drop=list(chosen))
        return self._plans[key]

    def stages_ok(self, chosen: list[str]) -> bool:
        if self.config.allow_empty_stage:
            return True
        count: dict[str, int] = {}
        for name in chosen:
            count[self.stage_of[name]] = count.get(self.stage_of[name], 0) + 1
        return all(c < self.stage_size[s] for s, c in count.items() if s)  # attributes have no stage

    def works(self, chosen: list[str]) -> tuple[nn.Module | None, str]:
        return rehearse(self.model, self._plan(chosen), self.inputs, self.expected)

    def met(self, chosen: list[str], rehearsal: nn.Module) -> bool:
        """Whether ``chosen`` (already rehearsed) meets a count or MACs target."""
        if self.config.n is not None:
            return len(chosen) >= self.config.n
        if checked_on(self.model, self.expected) == "meta":
            self.macs_after = macs_of(rehearsal, to_meta(self.inputs))
        else:
            self.macs_after = plan_macs(self.model, self._plan(chosen), self.inputs, self.expected) or 0
        return self.macs_after <= self.config.target_macs * self.base_macs


def _greedy(chooser: _Chooser, order: list[str]) -> tuple[list[str], dict[str, str]]:
    """Add blocks in ``order`` (least important first) until the target is met.

    A count target first tries the first ``n`` blocks the stage rule allows with
    one rehearsal; only if that set breaks the forward is each addition rehearsed.
    """
    config = chooser.config
    if config.n is not None:
        chosen, refused = [], {}
        for name in order:
            if len(chosen) == config.n:
                break
            if chooser.stages_ok(chosen + [name]):
                chosen.append(name)
            else:
                refused[name] = "the last block of its stage"
        if len(chosen) == config.n and chooser.works(chosen)[0] is not None:
            return chosen, refused
    chosen, refused = [], {}
    bar = Progress(len(order), "choosing blocks", enabled=None)
    for name in order:
        bar.update()
        trial = chosen + [name]
        if not chooser.stages_ok(trial):
            refused[name] = "the last block of its stage"
            continue
        rehearsal, why = chooser.works(trial)
        if rehearsal is None:
            refused[name] = f"removing it breaks the forward ({why})"
            continue
        if config.max_loss_increase is not None:
            assert chooser.calib is not None
            loss = chooser.calib.loss(trial)
            if loss - chooser.calib.dense_loss > config.max_loss_increase:
                continue  # too costly; a later block may still fit
            chosen, chooser.loss_after = trial, loss
            continue
        chosen = trial
        if chooser.met(chosen, rehearsal):
            break
    bar.close()
    return chosen, refused


def _runs_for(chooser: _Chooser, names: list[str], angular: dict[tuple[int, int], float],
              total: int) -> list[str] | None:
    """The ``total`` blocks to remove as at most one contiguous run per stage, with the least summed
    angular distance (a knapsack over stages; with one stage this is Gromov et al.'s single run)."""
    per_stage: dict[str, dict[int, tuple[float, int]]] = {}  # stage -> run length -> (distance, first index)
    for (i, j), d in angular.items():
        run = names[i:j + 1]
        if not chooser.stages_ok(run):
            continue
        options = per_stage.setdefault(chooser.stage_of[names[i]], {})
        if j - i + 1 not in options or d < options[j - i + 1][0]:
            options[j - i + 1] = (d, i)
    best: dict[int, tuple[float, list[str]]] = {0: (0.0, [])}  # blocks removed so far -> (cost, names)
    for options in per_stage.values():
        step = dict(best)
        for k, (cost, chosen) in best.items():
            for length, (d, i) in options.items():
                if k + length <= total and (k + length not in step or cost + d < step[k + length][0]):
                    step[k + length] = (cost + d, chosen + names[i:i + length])
        best = step
    return best[total][1] if total in best else None


def _window(chooser: _Chooser, names: list[str], angular: dict[tuple[int, int], float]) -> list[str]:
    """Gromov et al.: remove contiguous runs of blocks whose input and output are closest in angle.

    The number of blocks grows one at a time until the target is met.
    """
    config, best = chooser.config, []
    for total in range(1, len(names) + 1):
        if config.n is not None and total != config.n:
            continue
        pick = _runs_for(chooser, names, angular, total)
        rehearsal = chooser.works(pick)[0] if pick is not None else None
        if pick is None or rehearsal is None:
            break
        if config.n is not None:
            return pick
        if config.max_loss_increase is not None:
            assert chooser.calib is not None
            loss = chooser.calib.loss(pick)
            if loss - chooser.calib.dense_loss > config.max_loss_increase:
                break
            best, chooser.loss_after = pick, loss
            continue
        best = pick
        if chooser.met(pick, rehearsal):
            break
    return best


# ---- the method -----------------------------------------------------------------------------


@register_method(Layers)
def apply_layers(model: nn.Module, config: Layers, *, example_inputs: Any = None, data: Any = None) -> PruneReport:
    if example_inputs is None:
        raise SecateursError("layer pruning runs the model to find its blocks: pass example_inputs (CLI: --input-shape)")
    if data is None and config.importance is None and isinstance(declared_module(model, "get_input_embeddings"),
                                                                 nn.Embedding):
        # weight norms say little about which decoder layers a language model can lose: on SmolLM2-135M,
        # dropping the 2 "least important" ones this way took perplexity from 16.7 to about 867,000
        raise SecateursError("layers of a language model are chosen on calibration text: pass data= (CLI: --data "
                             "pydoc or text:FILE; the CLI uses pydoc when the model has a tokenizer), or "
                             "importance='magnitude' (CLI: --importance magnitude) to choose by weights alone")
    importance = config.importance or ("block_influence" if data is not None else "magnitude")
    if data is None and (importance != "magnitude" or config.max_loss_increase is not None):
        raise SecateursError(f"importance '{importance}' and loss targets are measured on data: pass data= "
                             "(CLI: --data), or use importance 'magnitude'")
    chosen_blocks = config.resolve(model)  # unknown include/ignore names are refused before the trace
    all_blocks = find_blocks(model, example_inputs, extra=tuple(config.include or ()))
    blocks = chosen_blocks.blocks(all_blocks)
    if not blocks:
        raise SecateursError("no removable block found: layer pruning needs blocks inside a Sequential/ModuleList "
                             "whose output has the shape of their input")
    names = [b.name for b in blocks]
    calib = _Calibration(model, data, config.calib_batches) if data is not None else None
    modules = dict(model.named_modules())
    angular: dict[tuple[int, int], float] = {}
    if importance == "magnitude":
        scores = {n: magnitude(modules[n]) for n in names}
    elif importance == "loss":
        assert calib is not None
        with Progress(len(names), "layer importance (loss)", enabled=None) as bar:
            scores = {}
            for n in names:  # one pass over the calibration batches per block
                scores[n] = calib.loss([n]) - calib.dense_loss
                bar.update()
    else:
        assert calib is not None
        influence, angular = calib.activations(blocks, runs=importance == "angular")
        scores = influence if importance == "block_influence" else {n: angular[(i, i)] for i, n in enumerate(names)}
    chooser = _Chooser(model, config, blocks, all_blocks, example_inputs, calib)
    if importance == "angular":
        chosen, refused = _window(chooser, names, angular), {}
    else:
        chosen, refused = _greedy(chooser, sorted(names, key=lambda n: scores[n]))
    if config.n is not None and len(chosen) < config.n:
        raise SecateursError(f"only {len(chosen)} of the {config.n} blocks asked for can be removed "
                             f"({len(blocks)} candidates; each stage keeps one block unless allow_empty_stage)")
    if calib is not None:
        chooser.loss_after = calib.loss(chosen)  # measured before the names change
    if chosen:
        apply_plan_(model, Plan(drop=chosen))
    return _report(config, importance, blocks, all_blocks, scores, chosen, refused, chooser)


def _report(config: Layers, importance: str, blocks: list[Block], all_blocks: list[Block],
            scores: dict[str, float], chosen: list[str], refused: dict[str, str], chooser: _Chooser) -> PruneReport:
    report = PruneReport(method=config.method, config=config_to_dict(config))
    report.outcome["importance_used"] = importance
    for b in blocks:
        report.layers.append(LayerReport(name=b.name, shape=[b.params], numel=b.params,
                                         zeros=b.params if b.name in chosen else 0))
    if chooser.macs_after is not None and chooser.base_macs:
        report.outcome["achieved_macs"] = chooser.macs_after / chooser.base_macs
    if chooser.calib is not None:
        report.outcome["dense_loss"] = chooser.calib.dense_loss
        report.outcome["loss_after"] = chooser.loss_after
    report.skipped = {b.name: b.reason for b in all_blocks if not b.removable and b.reason != "holds no weight layer"}
    report.skipped.update(refused)
    report.outcome["rehearsal"] = checked_on(chooser.model, chooser.expected)  # "real": meta cannot run it
    report.plan = {
        "drop": list(chosen),
        "candidates": [{"name": b.name, "stage": b.stage, "score": scores[b.name], "removed": b.name in chosen}
                       for b in blocks],
    }
    return report
