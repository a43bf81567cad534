"""Sequential layer-wise reconstruction after channel pruning: refit the layers that lost inputs.

After a plan removed channels, every layer that *read* them (the next
convolution or Linear, an FFN's down projection, attention's output
projection, every projection reading a pruned hidden size) is refitted by
least squares (:mod:`secateurs.surgery.reconstruct`) so that, on calibration
data, it reproduces what the dense model's layer computed. Layers are taken in
forward order and each sees the *pruned* model's activations, already
corrected upstream, so errors do not compound (SparseGPT's sequential mode,
applied to structured pruning). The target is the dense layer's own output:
a refit also absorbs what earlier cuts changed in its inputs. The last layer of a
residual branch (a transformer layer's ``down_proj``: its output is added to the
block's output unchanged, :func:`adds_to_output`) is fitted to more: the output
that makes the pruned block's output equal the dense block's, which also repairs
the drift the residual stream carries from every cut upstream. Residual sums and
BatchNorms between are handled by construction: the refit sees the layer's
actual input (the sum, the normalised activations) and the output is matched
before any BatchNorm that follows.

Memory: one layer's statistics at a time, plus the calibration activations at
the entrance of the current block, for models made of a chain of blocks (the
transformer layers, or the children of a ``Sequential`` such as MobileNetV2's
``features``), which are then run block by block instead of from the start
for every layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..graph.blocks import repeated_blocks
from ..importance.stats import BatchNormReaders, split_batch
from ..patches import input_rows, output_rows, refit_blocker, weight_matrix
from ..progress import Progress
from ..selection import call_model, input_dim
from ..surgery import Plan, kept_indices
from ..surgery.reconstruct import (
    FitStats,
    ShiftStats,
    apply_fit_,
    apply_shift_,
    has_intercept,
)
from ..utils import eval_mode, first_tensor
from .oneshot import capture_block_inputs, no_cache_inputs, with_hidden

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01  # with one calibration batch there is nothing to cross-validate on

__all__ = ["LayerFit", "adds_to_output", "advance_calls", "chain_candidates", "reconstruct_", "reconstruction_targets",
           "refit_block"]


@dataclass
class LayerFit:
    """What reconstruction did to one layer.

    ``how`` is ``refit`` (weights and intercept solved), ``bias`` (the layer cannot
    mix the kept channels: only its mean output was corrected) or ``none``.
    Errors are ``||Y_target - Y_pruned||^2 / ||Y_target||^2`` of the layer's output on
    the calibration data, before and after; the target is the dense layer's output, or for
    the last layer of a residual branch the output that would make its block's output the
    dense block's (its note says so).
    """

    name: str
    how: str
    error_before: float | None = None
    error_after: float | None = None
    rows: int = 0
    damp: float | None = None  # the ridge damping used (relative to the mean squared input)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("error_before", "error_after"):
            if out[key] is not None:
                out[key] = round(out[key], 6)
        return out


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def _output_dim(layer: nn.Module) -> int:
    return 1 - input_dim(layer) if getattr(layer, "weight", None) is not None and layer.weight.dim() == 2 else 0


def reconstruction_targets(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """Layers of ``model`` (before the plan) whose input channels ``plan`` removes -> the output rows they keep.

    Only those: refitting every later layer as well was measured on MobileNetV2
    (bench/reconstruct.py's setting) to gain nothing for 2.5x the time.
    """
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for tensor, dims in plan.normalized().remove.items():
        name, _, attr = tensor.rpartition(".")
        layer = modules.get(name)
        if attr != "weight" or layer is None or not isinstance(getattr(layer, "weight", None), Tensor):
            continue
        if layer.weight.dim() < 2 or not dims.get(input_dim(layer)):
            continue
        out_dim = _output_dim(layer)
        out[name] = kept_indices(layer.weight.shape[out_dim], torch.tensor(dims.get(out_dim, []), dtype=torch.long))
    return out


def _call_order(model: nn.Module, names: list[str], blocks: list[str], run: Callable[[], Any]
                ) -> tuple[dict[str, int], dict[str, int], dict[str, str], bool]:
    """One forward: the call index and count of each layer in ``names``, the BatchNorm reading each one's
    output, and whether ``blocks`` run as a chain (each called once, in order, on the previous one's output)."""
    modules = dict(model.named_modules())
    index: dict[str, int] = {}
    counts: dict[str, int] = {}
    alive: list[Any] = []  # block outputs stay alive so their ids are not reused during the pass
    chain: list[tuple[str, Tensor | None, Tensor | None]] = []
    step = [0]
    hooks = []

    def seen(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            index.setdefault(name, step[0])
            step[0] += 1
        return hook

    def block(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            index.setdefault(name, step[0])
            step[0] += 1
            out_t = first_tensor(out)
            chain.append((name, first_tensor(args, kwargs), out_t))
            alive.append(out_t)
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_hook(seen(name)))
    readers = BatchNormReaders(model, names)
    for name in blocks:  # after the layers' hooks: a block's index is taken when it returns
        hooks.append(modules[name].register_forward_hook(block(name), with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            run()
    finally:
        for h in hooks:
            h.remove()
        readers.remove()
    is_chain = bool(blocks) and [c[0] for c in chain] == blocks and all(
        chain[i][1] is chain[i - 1][2] for i in range(1, len(chain)))
    return index, counts, readers.followers, is_chain


def chain_candidates(model: nn.Module) -> list[str]:
    """Modules that may run as a chain (checked on a forward before use): the transformer layers
    (:func:`~secateurs.graph.blocks.repeated_blocks`), else the children of the largest ``Sequential``."""
    blocks = [n for n, _ in repeated_blocks(model)]
    if blocks:
        return blocks
    best, size = [], 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) > 1:
            params = sum(p.numel() for p in module.parameters())
            if params > size:
                best = [f"{name}.{key}" if name else key for key, _ in module.named_children()]
                size = params
    return best


def _fresh_call(block: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``block(*args, **kwargs)`` on copies of its tensor arguments: the cached activations are run many
    times, and a block may work in place on its input (``ReLU(inplace=True)`` as a chain element)."""
    args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].clone()}
    return block(*args, **kwargs)


def _until(run: Callable[[], Any], module: nn.Module, capture: Callable[[Any, Any], None]) -> None:
    """Run ``run()`` up to ``module``'s first call, handing its input and output to ``capture``."""
    def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
        capture(inputs[0], output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()


class _Runs:
    """Zero-argument calls, one per calibration batch, that reach a layer in the dense and the pruned model.

    ``block``: the calls run one whole block of a chain (they return its output), not the model.
    """

    def __init__(self, dense: list[Callable[[], Any]], pruned: list[Callable[[], Any]],
                 block: nn.Module | None = None) -> None:
        self.dense, self.pruned, self.block = dense, pruned, block


def adds_to_output(layer: nn.Module, run: Callable[[], Any]) -> bool:
    """Does ``layer``'s output reach the output of ``run()`` unchanged, added to it (the last layer of a
    residual branch: a transformer layer's ``down_proj``)? Checked by adding a random tensor to the layer's
    output and comparing how the result moves.

    The nudge is as large as the result itself, so in half precision the rounding of the residual
    sum stays far below it: the test is the relative size of what does not pass through, against a
    tolerance set by the dtype (a norm or nonlinearity after the layer moves most of it).
    """
    got: dict[str, Tensor] = {}
    base = first_tensor(run())

    def nudge(_m: nn.Module, _i: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or "delta" in got or not isinstance(base, Tensor):
            return None
        scale = base.detach().float().std().clamp_min(1e-3)
        # drawn on the CPU (the same draw on every device), then moved: scale is on out's device
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device) * scale
        got["delta"] = noise.to(out)
        return out + got["delta"]

    handle = layer.register_forward_hook(nudge)
    try:
        moved = first_tensor(run())
    finally:
        handle.remove()
    delta = got.get("delta")
    if delta is None or not isinstance(moved, Tensor) or moved.shape != delta.shape:
        return False
    delta = delta.float()
    missed = (moved.float() - base.float() - delta).norm() / delta.norm().clamp_min(1e-12)
    tolerance = 1e-3 if torch.finfo(moved.dtype).bits >= 32 else 5e-2
    return bool(missed <= tolerance)


def _whole_model_runs(dense: nn.Module, pruned: nn.Module, batches: list[Any]) -> _Runs:
    def runs(model: nn.Module) -> list[Callable[[], Any]]:
        return [lambda b=b: call_model(model, no_cache_inputs(model, split_batch(b)[0])) for b in batches]

    return _Runs(runs(dense), runs(pruned))


def _fit_layer(name: str, dense_layer: nn.Module, layer: nn.Module, keep_out: Tensor, follower: nn.Module | None,
               runs: _Runs, damp: float | None) -> LayerFit:
    blocker = refit_blocker(layer)
    parts = 2 if damp is None and len(runs.dense) > 1 else 1
    if blocker is None:
        intercept = has_intercept(layer, follower)
        stats = FitStats(weight_matrix(layer).shape[1], int(keep_out.numel()), intercept, parts)
    else:
        if not has_intercept(layer, follower):
            return LayerFit(name, "none", note=f"{blocker.split(', so')[0]}, and it has no bias to correct")
        stats = ShiftStats(int(keep_out.numel()))
    # the last layer of a residual branch is fitted to what makes the block's output match the dense one
    # (its residual input carries the drift of every cut upstream), not only its own dense output
    branch_end = (runs.block is not None and runs.block is not layer and blocker is None
                  and adds_to_output(layer, runs.pruned[0]))
    for i, (run_dense, run_pruned) in enumerate(zip(runs.dense, runs.pruned, strict=True)):
        got: dict[str, Tensor] = {}
        if branch_end:
            _block_target(run_dense, run_pruned, layer, keep_out, got)
        else:
            _until(run_dense, dense_layer, lambda _x, y, got=got: got.__setitem__("y", output_rows(dense_layer, y)))
            _until(run_pruned, layer, lambda x, y, got=got: got.update(x=x, out=y))
        if "y" not in got or "x" not in got:
            return LayerFit(name, "none", note="not called on the calibration data")
        target = got["y"] if branch_end else got["y"].index_select(1, keep_out.to(got["y"].device))
        if isinstance(stats, FitStats):
            stats.update(input_rows(layer, got["x"]), target, i % parts)
        else:
            stats.update(target, output_rows(layer, got["out"]))
    if isinstance(stats, ShiftStats):
        before, after = stats.errors()
        apply_shift_(layer, stats.shift(), follower)
        return LayerFit(name, "bias", before, after, stats.rows, note=blocker)
    current = weight_matrix(layer).float()
    if stats.intercept:
        bias = getattr(layer, "bias", None)
        column = bias.detach().float() if isinstance(bias, Tensor) else current.new_zeros(current.shape[0])
        current = torch.cat([current, column.unsqueeze(1)], 1)
    if damp is None:
        damp = stats.choose_damp() if parts > 1 else DEFAULT_DAMP
    coef = stats.solve(damp)
    before, after = stats.error(current), stats.error(coef)
    if not after < before:  # heavy damping can leave a fit worse than the weights it started from
        return LayerFit(name, "none", before, before, stats.rows, damp, note="the refit did not lower the error")
    apply_fit_(layer, coef, follower)
    return LayerFit(name, "refit", before, after, stats.rows, damp,
                    note="fitted to the block's output (residual branch)" if branch_end else "")


def _block_target(run_dense: Callable[[], Any], run_pruned: Callable[[], Any], layer: nn.Module,
                  keep_out: Tensor, got: dict[str, Tensor]) -> None:
    """For a layer whose output is added to its block's output: its input, and the output that would make
    the pruned block's output equal the dense block's (its output now plus what the block misses)."""
    def capture(_m: nn.Module, inputs: Any, out: Any) -> None:
        got.update(x=inputs[0], out=out)

    handle = layer.register_forward_hook(capture)
    try:
        pruned_out = first_tensor(run_pruned())
    finally:
        handle.remove()
    dense_out = first_tensor(run_dense())
    if "out" not in got:
        return
    dense_rows = output_rows(layer, dense_out).index_select(1, keep_out.to(dense_out.device))
    got["y"] = output_rows(layer, got["out"]) + dense_rows - output_rows(layer, pruned_out)


def _uncallable(name: str, calls: int) -> LayerFit | None:
    """Why a layer called ``calls`` times per forward cannot be refitted, as its fit record (None: it can)."""
    if calls == 0:
        return LayerFit(name, "none", note="not called on the calibration data")
    if calls > 1:
        return LayerFit(name, "none", note=f"called {calls} times per forward (shared weights)")
    return None


def reconstruct_(pruned: nn.Module, dense: nn.Module, targets: dict[str, Tensor], batches: list[Any],
                 damp: float | None = None) -> list[LayerFit]:
    """Refit ``targets`` (layer name -> kept output rows, :func:`reconstruction_targets`) of ``pruned``
    so that each reproduces ``dense``'s layer of the same name on ``batches``, in forward order (the
    last layer of a residual branch inside a chain of blocks: so that its block reproduces the dense block).

    ``damp`` is the ridge damping relative to the mean squared input; None chooses it
    per layer by two-fold cross-validation over the batches (even against odd),
    among :data:`~secateurs.surgery.reconstruct.DAMP_GRID` (a single batch: 0.01).

    ``pruned`` is changed in place; ``dense`` is only run. Returns one :class:`LayerFit` per target.
    """
    modules, dense_modules = dict(pruned.named_modules()), dict(dense.named_modules())
    block_names = chain_candidates(dense)
    if not all(n in modules for n in block_names):
        block_names = []
    first = split_batch(batches[0])[0]
    index, counts, followers, chained = _call_order(
        pruned, list(targets), block_names, lambda: call_model(pruned, no_cache_inputs(pruned, first)))
    fits = {name: fit for name in targets if (fit := _uncallable(name, counts.get(name, 0))) is not None}
    order = sorted((n for n in targets if n not in fits), key=index.__getitem__)
    inside = {b: [n for n in order if n.startswith(b + ".")] for b in block_names} if chained else {}
    in_blocks = {n for names in inside.values() for n in names}
    start = index[block_names[0]] if chained and block_names else None
    bar = Progress(len(order), "reconstruct", enabled=None)
    began = time.perf_counter()

    def fit(name: str, runs: _Runs) -> None:
        follower = modules.get(followers[name]) if name in followers else None
        fits[name] = _fit_layer(name, dense_modules[name], modules[name], targets[name], follower, runs, damp)
        bar.update(layer=name)

    with torch.no_grad(), eval_mode(pruned), eval_mode(dense):
        whole = _whole_model_runs(dense, pruned, batches)
        for name in order:  # before the chain of blocks
            if name not in in_blocks and (start is None or index[name] < start):
                fit(name, whole)
        if in_blocks:
            last = max(i for i, b in enumerate(block_names) if inside[b])
            dense_calls = capture_block_inputs(dense, dense_modules[block_names[0]], batches)
            pruned_calls = capture_block_inputs(pruned, modules[block_names[0]], batches)
            for b in block_names[: last + 1]:
                d_block, p_block = dense_modules[b], modules[b]
                runs = _Runs([lambda a=a, k=k, m=d_block: _fresh_call(m, a, k) for a, k in dense_calls],
                             [lambda a=a, k=k, m=p_block: _fresh_call(m, a, k) for a, k in pruned_calls], p_block)
                for name in inside[b]:
                    fit(name, runs)
                dense_calls = advance_calls(d_block, dense_calls)
                pruned_calls = advance_calls(p_block, pruned_calls)
        for name in order:  # after the blocks (or all, without them)
            if name not in in_blocks and start is not None and index[name] >= start:
                fit(name, whole)
    bar.close()
    log.info("reconstructed %d of %d layers in %.1f s", sum(f.how != "none" for f in fits.values()), len(targets),
             time.perf_counter() - began)
    return [fits[n] for n in targets]


def refit_block(dense_block: nn.Module, pruned_block: nn.Module, dense_calls: list[tuple[tuple, dict]],
                pruned_calls: list[tuple[tuple, dict]], targets: dict[str, Tensor], *, prefix: str = "",
                damp: float | None = None) -> list[LayerFit]:
    """Refit ``targets`` (names inside the block -> kept output rows) of ``pruned_block`` from cached calls
    of both blocks (``(args, kwargs)`` per calibration batch), in forward order, as :func:`reconstruct_`
    does for each block of a chain: for a caller that holds one block at a time (streaming).
    ``prefix`` names the block in the fits' names."""
    modules, dense_modules = dict(pruned_block.named_modules()), dict(dense_block.named_modules())
    args, kwargs = pruned_calls[0]
    index, counts, followers, _ = _call_order(pruned_block, list(targets), [],
                                              lambda: _fresh_call(pruned_block, args, kwargs))
    runs = _Runs([lambda a=a, k=k: _fresh_call(dense_block, a, k) for a, k in dense_calls],
                 [lambda a=a, k=k: _fresh_call(pruned_block, a, k) for a, k in pruned_calls], pruned_block)
    full = {name: f"{prefix}.{name}" if prefix else name for name in targets}
    fits = {name: fit for name in targets if (fit := _uncallable(full[name], counts.get(name, 0))) is not None}
    with torch.no_grad(), eval_mode(pruned_block), eval_mode(dense_block):
        for name in sorted((n for n in targets if n not in fits), key=index.__getitem__):
            follower = modules.get(followers[name]) if name in followers else None
            fits[name] = _fit_layer(full[name], dense_modules[name], modules[name], targets[name], follower, runs, damp)
    return [fits[n] for n in targets]


def advance_calls(block: nn.Module, calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The calls of the next block of a chain: ``block`` run on each call, its output as the hidden states."""
    with torch.no_grad(), eval_mode(block):
        return [with_hidden(a, k, first_tensor(_fresh_call(block, a, k))) for a, k in calls]
