"""One-shot pruning of language models with calibration data: Wanda and SparseGPT, block by block.

The calibration batches run through the model once, up to the first block
(a transformer layer, found by :func:`secateurs.graph.blocks.find_blocks`,
not by model names); their inputs to it are kept. Then each block in turn:
collect statistics of its layers' inputs, prune those layers, and run the
*pruned* block to produce the next block's inputs. Memory stays bounded by
one block plus the calibration activations, which is what lets this scale
to models far larger than a device; and later blocks see the errors of the
earlier ones and compensate (SparseGPT) or rank (Wanda) with them.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..cli_options import option, positive_int
from ..errors import SecateursError
from ..graph.blocks import find_blocks, first_tensor
from ..importance.experts import ExpertStats, StackedInputs, stack_identities
from ..importance.oneshot import InputStats, magnitude_keep, sparsegpt, wanda
from ..importance.stats import calibration_list, split_batch
from ..masks import mask_tied_, masked_original
from ..progress import Progress
from ..selection import Selection, Target, call_model, input_dim, no_cache_inputs, select_targets
from ..utils import eager_experts, eval_mode, release_freed_memory
from .common import config_to_dict, layer_report
from .nm import parse_nm
from .registry import register_method
from .report import LayerReport, PruneReport

log = logging.getLogger(__name__)

__all__ = ["SparseGPT", "Wanda", "calibration_batches", "capture_block_inputs", "no_cache_inputs", "oneshot_targets", "prune_block",
           "with_hidden"]


@dataclass(kw_only=True)
class _OneShot(Selection):
    sparsity: float = option(0.5, help="fraction of weights to zero, in [0, 1)")
    n: int | None = option(None, flag="--nm", parse=parse_nm, spread=("n", "m"))
    m: int | None = None
    calib_batches: int = option(16, type=positive_int, metavar="N")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.n is None) != (self.m is None):
            raise SecateursError("give both n and m for N:M sparsity (e.g. n=2, m=4), or neither")
        if self.n is not None:
            if not 1 <= self.n < self.m:
                raise SecateursError(f"N:M needs 1 <= N < M, got {self.n}:{self.m}: e.g. 2:4 keeps 2 of every 4")
            self.sparsity = 1 - self.n / self.m
        if not 0.0 <= self.sparsity < 1.0:
            raise SecateursError(f"sparsity must be in [0, 1), got {self.sparsity}: e.g. 0.5 zeroes half the weights")
        if self.calib_batches < 1:
            raise SecateursError(f"calib_batches must be at least 1, got {self.calib_batches}")


@dataclass(kw_only=True)
class Wanda(_OneShot):
    """Wanda (Sun et al. 2023): drop the weights with the lowest ``|W| * ||X||`` in each output row.

    Attributes:
        sparsity: fraction of each layer's weights to zero (ignored with ``n``/``m``).
        n, m: N:M sparsity instead, keeping ``n`` of every ``m`` inputs (e.g. 2 and 4).
        calib_batches: batches of ``data`` to calibrate on (token ids for language models).
    """

    method: ClassVar[str] = "wanda"


@dataclass(kw_only=True)
class SparseGPT(_OneShot):
    """SparseGPT (Frantar & Alistarh 2023): prune and update the remaining weights to reconstruct
    each layer's output on the calibration inputs.

    Attributes:
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean.
        blocksize: columns per lazy-update block.
    """

    damp: float = 0.01
    blocksize: int = 128
    method: ClassVar[str] = "sparsegpt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damp <= 0:
            raise SecateursError(f"damp must be positive, got {self.damp}")
        if self.blocksize < 1 or (self.m is not None and self.blocksize % self.m):
            raise SecateursError(f"blocksize must be a positive multiple of M, got {self.blocksize}")


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model need not run."""


def _blocks(model: nn.Module, example: Any) -> list[str]:
    """The longest run of same-shape blocks (the transformer layers), in order."""
    stages: dict[str, list[str]] = {}
    for block in find_blocks(model, example):
        if block.removable and block.stage:
            stages.setdefault(block.stage, []).append(block.name)
    return max(stages.values(), key=len) if stages else []


def capture_block_inputs(model: nn.Module, first: nn.Module, batches: list[Any]) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments ``first`` receives for every batch (the model stops there)."""
    seen: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, no_cache_inputs(model, split_batch(batch)[0]))
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """The same call with its main tensor (first positional, or ``hidden_states``) replaced."""
    if args and isinstance(args[0], Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _transposed(target: Target) -> bool:
    return input_dim(target.module, target.tensor) == 0  # Conv1D keeps (in_features, out_features)


def _weight_2d(target: Target) -> Tensor:
    """The weight as (out_features, in_features)."""
    return target.weight.T if _transposed(target) else target.weight


_TRIM_AFTER = 1 << 22  # weights this large hand their pruning's freed memory back at once


def _prune_targets(model: nn.Module, targets: list[Target], stats: dict[str, InputStats | ExpertStats],
                   config: _OneShot, report: PruneReport) -> None:
    for t in targets:
        s = stats.pop(t.name, None)  # shared statistics stay alive while another target holds them
        if not t.stacked and (s is None or not s.count):
            report.skipped[t.name] = "never ran on the calibration data"
            continue
        if t.stacked:
            layer = _prune_stacked(model, t, s, config, report)  # (the collector gives every stack its statistics)
            if layer is None:
                continue
        else:
            layer = _prune_target(model, t, s, config)
        report.layers.append(layer)
        del s
        if layer.numel >= _TRIM_AFTER:  # (not t.weight: masked now, reading it would compute a masked copy)
            release_freed_memory()  # the scores and copies of a large layer: not on top of the next one's


def _prune_target(model: nn.Module, t: Target, s: InputStats, config: _OneShot) -> LayerReport:
    """Prune one weight on its input statistics (SparseGPT spends their Hessian on its inverse's factor,
    which the other layers sharing the statistics reuse)."""
    flip = _transposed(t)
    if isinstance(config, SparseGPT):
        # SparseGPT updates the weights it keeps: solved from and written straight into the stored weight,
        # whose masked entries are zero already (the numbers the masked weight would compute)
        stored = masked_original(t.module, t.tensor)
        stored = stored.T if flip else stored
        _, keep = sparsegpt(stored, s, config.sparsity, config.n, config.m, config.damp, config.blocksize,
                            consume=True, out=stored)
    else:
        keep = wanda(_weight_2d(t), s, config.sparsity, config.n, config.m)
    if flip:
        keep = keep.T
    return layer_report(t.name, mask_tied_(model, t.module, keep, t.tensor))


class _StackPruner:
    """Prunes the experts' matrices of one stacked weight, on the tokens routed to each expert, one group of
    experts at a time if need be; the mask is set once all are done (:meth:`finish`). An expert no
    calibration token reached is pruned by magnitude (said in ``report.outcome["experts_by_magnitude"]``)."""

    def __init__(self, t: Target) -> None:
        self.t = t
        self.keep: Tensor | None = None
        self.transposed: bool | None = None
        self.unrouted: list[int] = []

    def prune(self, s: ExpertStats, config: _OneShot, experts: Iterable[int]) -> None:
        stored = masked_original(self.t.module, self.t.tensor)  # (experts, out, in), or (experts, in, out)
        self.transposed = s.transposed if s.transposed is not None else self.transposed
        if self.transposed is None:
            return  # no product seen yet: the layout is unknown (finish() says so if it stays unknown)
        if self.keep is None:
            self.keep = torch.ones(stored.shape, dtype=torch.bool, device=stored.device)
        if self.skip_reason(config) is not None:
            return
        for expert in experts:
            w = stored[expert].T if self.transposed else stored[expert]  # (out, in), a view of the stored weight
            stats = s.experts.pop(expert, None)
            if stats is None or not stats.count:
                self.unrouted.append(expert)
                kept = magnitude_keep(w, config.sparsity, config.n, config.m)
            elif isinstance(config, SparseGPT):
                _, kept = sparsegpt(w, stats, config.sparsity, config.n, config.m, config.damp, config.blocksize,
                                    consume=True, out=w)
            else:
                kept = wanda(w, stats, config.sparsity, config.n, config.m)
            self.keep[expert] = kept.T if self.transposed else kept
            del stats

    def skip_reason(self, config: _OneShot) -> str | None:
        if self.transposed is None:
            return ("no expert's matrix was multiplied where secateurs can see it (F.linear or @ on one expert's "
                    "matrix)")
        shape = masked_original(self.t.module, self.t.tensor).shape
        inputs = shape[1] if self.transposed else shape[2]
        if config.m is not None and inputs % config.m:
            return f"input size {inputs} is not a multiple of {config.m}"
        return None

    def finish(self, model: nn.Module, config: _OneShot, report: PruneReport) -> LayerReport | None:
        reason = self.skip_reason(config)
        if reason is not None or self.keep is None:
            report.skipped[self.t.name] = reason or "never ran on the calibration data"
            return None
        if self.unrouted:
            report.outcome.setdefault("experts_by_magnitude", {})[self.t.name] = sorted(self.unrouted)
            log.warning("%s: %d of %d experts got no calibration token and are pruned by weight magnitude (more "
                        "calibration data reaches more experts)", self.t.name, len(self.unrouted), self.keep.shape[0])
        return layer_report(self.t.name, mask_tied_(model, self.t.module, self.keep, self.t.tensor))


def _prune_stacked(model: nn.Module, t: Target, s: ExpertStats, config: _OneShot,
                   report: PruneReport) -> LayerReport | None:
    """Every expert of a stacked weight at once (see :class:`_StackPruner`)."""
    pruner = _StackPruner(t)
    pruner.prune(s, config, range(masked_original(t.module, t.tensor).shape[0]))
    return pruner.finish(model, config, report)


class _Collector:
    """Input statistics of some Linear layers, gathered by forward hooks.

    Layers that read the very same tensor in a call (attention's q/k/v
    projections, an MLP's gate and up projections) share one accumulator:
    identical numbers, a third of the memory for SparseGPT's Hessians.
    """

    def __init__(self, targets: list[Target], hessian: bool, only: range | None = None) -> None:
        self.stats: dict[str, InputStats | ExpertStats] = {}
        self._seen: list[tuple[weakref.ref, str]] = []
        self._hessian = hessian
        self._handles = [t.module.register_forward_hook(
            lambda mod, inp, out, t=t: self._update(t, inp[0])) for t in targets if not t.stacked]
        stacks: dict[nn.Module, dict[str, str]] = {}  # a module's stacked weights: tensor name -> target name
        for t in targets:
            if t.stacked:
                stacks.setdefault(t.module, {})[t.tensor] = t.name
                self.stats[t.name] = ExpertStats(hessian, only)
        for module, names in stacks.items():
            self._watch(module, names)

    def _watch(self, module: nn.Module, names: dict[str, str]) -> None:
        """While ``module`` runs, the products with each expert's matrix of its stacked weights are seen."""
        active: list[Any] = []

        def enter(mod: nn.Module, args: Any) -> None:
            cache = parametrize.cached()
            cache.__enter__()  # a masked stack is computed once per call, and is one tensor the mode can know
            mode = StackedInputs(stack_identities(mod, names), self._update_expert)
            mode.__enter__()
            active.append((cache, mode))

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            if active:
                cache, mode = active.pop()
                mode.__exit__(None, None, None)
                cache.__exit__(None, None, None)

        self._handles.append(module.register_forward_pre_hook(enter))
        self._handles.append(module.register_forward_hook(leave, always_call=True))

    def _update_expert(self, name: str, expert: int, rows: Tensor, transposed: bool) -> None:
        self.stats[name].update(expert, rows, transposed)

    def _update(self, target: Target, x: Tensor) -> None:
        # the same tensor *object* (not the same memory: a freed input's memory is soon another's); held
        # weakly, so that each input is freed when its call is done with it (a dead reference matches nothing)
        first = next((name for seen, name in self._seen if seen() is x), None)
        if first is not None and first != target.name:
            self.stats.setdefault(target.name, self.stats[first])
            return
        self._seen.append((weakref.ref(x), target.name))
        if target.name not in self.stats:
            self.stats[target.name] = InputStats(_weight_2d(target).shape[1], self._hessian)
        self.stats[target.name].update(x)

    def run(self, fn: Callable[[], Any]) -> Any:
        """One call whose layer inputs count (inputs are told apart within a call; held until it ends)."""
        self._seen = []
        try:
            return fn()
        finally:
            self._seen = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def prune_block(model: nn.Module, block: nn.Module, targets: list[Target], config: _OneShot,
                report: PruneReport, calls: Iterable[tuple[tuple, dict]], *, widest_first: bool = False) -> None:
    """Prune ``targets`` (layers inside ``block``) on the statistics of the calls ``block(*args, **kwargs)``.

    With ``widest_first`` (SparseGPT, and ``calls`` that can be walked twice), the layer with the widest
    input is pruned on a pass of its own when it runs after all the others in every call (an MLP's down
    projection): its Hessian, the largest, is then never held alongside the others'. The answer is the
    same: pruning a layer cannot change what the layers that ran before it were given. When it does not
    run last, its statistics are kept, the others' are collected on a second pass, and all are pruned
    as after one pass.
    """
    groups = _expert_groups(targets) if isinstance(config, SparseGPT) and not isinstance(calls, Iterator) else []
    if len(groups) > 1:
        _prune_expert_groups(model, block, targets, groups, config, report, calls)
        return
    first = _widest_last_candidate(targets) if widest_first and isinstance(config, SparseGPT) and \
        not isinstance(calls, Iterator) else None
    if first is None:
        _prune_targets(model, targets, _collect(block, targets, config, calls), config, report)
        return
    with _RunOrder(targets) as order:
        stats = _collect(block, [first], config, calls, order)
    rest = [t for t in targets if t is not first]
    done = len(report.layers)
    if order.runs_last(first):
        _prune_targets(model, [first], stats, config, report)
        _prune_targets(model, rest, _collect(block, rest, config, calls), config, report)
        by_name = {layer.name: layer for layer in report.layers[done:]}  # the report lists them in order
        report.layers[done:] = [by_name[t.name] for t in targets if t.name in by_name]
    else:
        stats.update(_collect(block, rest, config, calls))
        _prune_targets(model, targets, stats, config, report)


EXPERT_HESSIANS = 1 << 31  # bytes of SparseGPT Hessians of stacked experts held at once (a group per pass)


def _expert_groups(targets: list[Target]) -> list[range]:
    """The experts of a block's stacked weights in groups whose SparseGPT Hessians fit ``EXPERT_HESSIANS``
    (counted as if each matrix's input were its wider side: the layout is known only once it runs)."""
    stacks = [masked_original(t.module, t.tensor).shape for t in targets if t.stacked]
    if not stacks:
        return []
    experts = min(shape[0] for shape in stacks)
    per_expert = sum(max(shape[1], shape[2]) ** 2 * 4 for shape in stacks)
    size = max(1, min(experts, EXPERT_HESSIANS // max(per_expert, 1)))
    return [range(first, min(first + size, experts)) for first in range(0, experts, size)]


def _prune_expert_groups(model: nn.Module, block: nn.Module, targets: list[Target], groups: list[range],
                         config: _OneShot, report: PruneReport, calls: Iterable[tuple[tuple, dict]]) -> None:
    """SparseGPT on a block whose experts' Hessians do not fit at once: one pass per group of experts, each
    group pruned after its pass; the other layers' statistics come from the first pass and are pruned last.
    The answer is that of one pass: until the end no layer but the experts changes, and an expert's pruning
    changes no other expert's inputs (the router and the layers before it are still the dense ones)."""
    stacked = [t for t in targets if t.stacked]
    rest = [t for t in targets if not t.stacked]
    pruners = {t.name: _StackPruner(t) for t in stacked}
    held: dict[str, InputStats | ExpertStats] = {}
    for i, group in enumerate(groups):
        stats = _collect(block, (rest if i == 0 else []) + stacked, config, calls, only=group)
        for t in stacked:
            pruners[t.name].prune(stats.pop(t.name), config, group)
        held.update(stats)
        log.debug("%s: SparseGPT on experts %d-%d of %d", stacked[0].module_name, group.start, group.stop - 1,
                  groups[-1].stop)
    done = len(report.layers)
    _prune_targets(model, rest, held, config, report)
    for t in stacked:
        layer = pruners[t.name].finish(model, config, report)
        if layer is not None:
            report.layers.append(layer)
    by_name = {layer.name: layer for layer in report.layers[done:]}  # in the targets' order
    report.layers[done:] = [by_name[t.name] for t in targets if t.name in by_name]


def _collect(block: nn.Module, targets: list[Target], config: _OneShot, calls: Iterable[tuple[tuple, dict]],
             order: _RunOrder | None = None, only: range | None = None) -> dict[str, InputStats | ExpertStats]:
    """The input statistics of ``targets`` over one pass of the calls of ``block`` (``order`` told of each;
    stacked weights' statistics for the experts in ``only``)."""
    collector = _Collector(targets, isinstance(config, SparseGPT), only=only)
    try:
        for args, kwargs in calls:
            if order is not None:
                order.new_call()
            collector.run(lambda a=args, k=kwargs: block(*a, **k))
            release_freed_memory()  # each forward's temporaries: not on top of the next one's, nor the pruning's
    finally:
        collector.remove()
    return collector.stats


def _widest_last_candidate(targets: list[Target]) -> Target | None:
    """The target with the widest input, if pruning it alone first could save memory: it is wider than
    every other target (a tie, such as gate/up with the down projection left out, saves nothing worth a
    pass), and it shares its weight with none of them (their answers would depend on the order)."""
    if len(targets) < 2:
        return None
    widths = [_weight_2d(t).shape[1] for t in targets]
    widest = targets[widths.index(max(widths))]
    if widths.count(max(widths)) > 1:
        return None
    storage = masked_original(widest.module, widest.tensor).untyped_storage().data_ptr()
    if any(t is not widest and masked_original(t.module, t.tensor).untyped_storage().data_ptr() == storage
           for t in targets):
        return None
    return widest


class _RunOrder:
    """Which targets' modules start and end, in order, in each call (forward hooks)."""

    def __init__(self, targets: list[Target]) -> None:
        self._targets = targets
        self.calls: list[list[tuple[str, str]]] = []
        self._handles: list[Any] = []

    def _record(self, event: tuple[str, str]) -> None:
        self.calls[-1].append(event)

    def __enter__(self) -> _RunOrder:
        for t in self._targets:
            self._handles.append(t.module.register_forward_pre_hook(
                lambda mod, args, n=t.name: self._record(("start", n))))
            self._handles.append(t.module.register_forward_hook(
                lambda mod, args, out, n=t.name: self._record(("end", n))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def new_call(self) -> None:
        self.calls.append([])

    def runs_last(self, target: Target) -> bool:
        """Whether in every call ``target`` ran at most once, and nothing but its own end came after its start."""
        for events in self.calls:
            starts = [i for i, event in enumerate(events) if event == ("start", target.name)]
            if len(starts) > 1 or (starts and events[starts[0] + 1:] != [("end", target.name)]):
                return False
        return True


def oneshot_targets(model: nn.Module, config: _OneShot, example: Any, report: PruneReport) -> list[Target]:
    """The Linear-like weights ``config`` selects; the others go into ``report.skipped`` with the reason."""
    targets, skipped = select_targets(model, config, example_inputs=example, stacked=True)
    report.skipped.update(skipped)
    kept = []
    for t in targets:
        w = t.weight
        if t.stacked:
            kept.append(t)  # one matrix per expert; their input side is known once they run (N:M checked then)
        elif w.dim() != 2 or t.tensor != "weight":
            report.skipped[t.name] = "not a Linear-like layer (one-shot methods prune Linear and Conv1D weights)"
        elif config.m is not None and _weight_2d(t).shape[1] % config.m:
            report.skipped[t.name] = f"input size {_weight_2d(t).shape[1]} is not a multiple of {config.m}"
        else:
            kept.append(t)
    if not kept:
        raise SecateursError("no Linear layer to prune: one-shot methods prune Linear/Conv1D weights")
    return kept


def calibration_batches(config: _OneShot, data: Any) -> list[Any]:
    """The first ``config.calib_batches`` batches of ``data``; refused when there are none."""
    return calibration_list(data, config.calib_batches, config.method, cli="--data pydoc or text:FILE")


@register_method(Wanda)
@register_method(SparseGPT)
def apply_oneshot(model: nn.Module, config: _OneShot, *, example_inputs: Any = None, data: Any = None) -> PruneReport:
    batches = calibration_batches(config, data)
    example = example_inputs if example_inputs is not None else split_batch(batches[0])[0]
    report = PruneReport(method=config.method, config=config_to_dict(config))
    targets = oneshot_targets(model, config, example, report)
    # stacked expert weights are read one expert at a time (transformers' fused expert kernels are switched off)
    experts = eager_experts(model) if any(t.stacked for t in targets) else contextlib.nullcontext()
    with torch.no_grad(), eval_mode(model), experts:
        blocks = _blocks(model, example)
        modules = dict(model.named_modules())
        inside = {name: [t for t in targets if t.module_name.startswith(name + ".")] for name in blocks}
        in_blocks = {t.name for ts in inside.values() for t in ts}
        outside = [t for t in targets if t.name not in in_blocks]
        if outside:  # layers outside the blocks: statistics from one pass of the dense model
            collector = _Collector(outside, isinstance(config, SparseGPT))
            try:
                for batch in batches:
                    collector.run(lambda b=batch: call_model(model, no_cache_inputs(model, split_batch(b)[0])))
            finally:
                collector.remove()
            _prune_targets(model, outside, collector.stats, config, report)
        if blocks:
            calls = capture_block_inputs(model, modules[blocks[0]], batches)
            bar = Progress(len(blocks), f"{config.method} blocks", enabled=None)
            for name in blocks:
                block = modules[name]
                prune_block(model, block, inside[name], config, report, calls)
                with parametrize.cached():  # a masked weight is computed once per call, not once per use
                    calls = [with_hidden(args, kwargs, first_tensor(block(*args, **kwargs))) for args, kwargs in calls]
                bar.update()
            bar.close()
    report.outcome["blocks"] = len(blocks)
    return report
