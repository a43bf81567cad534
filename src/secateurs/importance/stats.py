"""Calibration statistics as explicit accumulators (no hidden global hooks).

Each accumulator is fed batches by the caller and exposes per-tensor
statistics that the pure scoring functions read like weights.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import SecateursError
from ..patches import input_rows
from ..selection import call_model, input_dim, no_cache_inputs
from ..utils import eval_mode, first_tensor

__all__ = ["BatchNormReaders", "ReferenceBatches", "calibration_list", "InputGrams", "TaylorStats", "ActivationStats", "InputActivationStats", "InputMeans", "StopForward", "forward_batches", "forward_may_stop",
           "split_batch", "task_loss"]


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)`` from a batch that is ``x``, ``(x,)`` or ``(x, y)``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[1], Tensor):
            return batch[0], batch[1]
        return batch[0], None
    return batch, None


def task_loss(out: Any, batch: Any, reference: Any = None) -> Tensor:
    """The loss a model is judged by on one batch.

    Labels and class logits: cross-entropy. A language model's ``input_ids``:
    next-token cross-entropy. Otherwise the squared distance to ``reference``
    (the dense model's output) relative to its energy, or with no reference
    the output's energy (as in data-free Taylor variants).
    """
    x, y = split_batch(batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = first_tensor(out)
    if y is not None and logits.dim() == 2 and y.dim() == 1:
        return F.cross_entropy(logits.float(), y)
    if isinstance(x, dict) and "input_ids" in x and getattr(out, "logits", None) is not None and logits.dim() == 3:
        target = x["input_ids"][:, 1:].clone()
        if "attention_mask" in x:
            target[x["attention_mask"][:, 1:] == 0] = -100
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    if reference is None:
        return logits.float().pow(2).mean()
    ref = first_tensor(reference) if getattr(reference, "logits", None) is None else reference.logits
    return (logits.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean().clamp_min(1e-12)


class StopForward(Exception):
    """Raised inside a forward that :func:`forward_batches` runs, once nothing left in it is watched: that
    batch's forward ends there (its output is not needed, only what hooks saw)."""


_MAY_STOP: contextvars.ContextVar[bool] = contextvars.ContextVar("secateurs_forward_may_stop", default=False)


def forward_may_stop() -> bool:
    """Whether the forward running now was started by :func:`forward_batches`, which reads only what hooks
    see: only then may it end early (by :class:`StopForward`); any other caller gets the model's output."""
    return _MAY_STOP.get()


def forward_batches(model: nn.Module, data: Iterable[Any], max_batches: int, hooks: list[Any],
                    after_batch: Any = None) -> int:
    """Run ``model`` (eval mode, no gradients) on up to ``max_batches`` batches, then remove ``hooks``.

    ``after_batch()`` runs after each batch. A forward may end early by raising :class:`StopForward`.
    Returns the number of batches seen.
    """
    seen = 0
    try:
        with torch.no_grad(), eval_mode(model):
            for i, batch in enumerate(data):
                if i >= max_batches:
                    break
                may_stop = _MAY_STOP.set(True)
                try:
                    call_model(model, no_cache_inputs(model, split_batch(batch)[0]))
                except StopForward:
                    pass
                finally:
                    _MAY_STOP.reset(may_stop)
                seen += 1
                if after_batch is not None:
                    after_batch()
    finally:
        for h in hooks:
            h.remove()
    return seen


def calibration_list(data: Iterable[Any] | None, batches: int, purpose: str, cli: str = "--data") -> list[Any]:
    """The first ``batches`` batches of ``data`` as a list; refused (naming ``purpose``, and ``cli``, the
    flag that gives data) when there are none."""
    if data is None:
        raise SecateursError(f"{purpose} calibrates on data: pass data= (CLI: {cli})")
    out = list(itertools.islice(iter(data), batches))
    if not out:
        raise SecateursError(f"{purpose} needs at least one calibration batch; data gave none")
    return out


class ReferenceBatches:
    """Up to ``batches`` batches of ``data`` and the model's outputs on them (the dense reference)."""

    def __init__(self, model: nn.Module, data: Iterable[Any], batches: int, purpose: str) -> None:
        self.model = model
        self.batches = list(itertools.islice(iter(data), batches))
        if not self.batches:
            raise SecateursError(f"{purpose} is measured on data, but no batch came: pass data= (CLI: --data)")
        with torch.no_grad(), eval_mode(model):
            self.reference = [call_model(model, split_batch(b)[0]) for b in self.batches]


class TaylorStats:
    """First-order Taylor importance: accumulates ``|w * dL/dw|`` per parameter entry."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.scores: dict[str, Tensor] = {}
        self.batches = 0

    def update(self, batch: Any) -> None:
        x = split_batch(batch)[0]  # task_loss reads the labels from the batch itself
        params = dict(self.model.named_parameters())
        saved = {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        try:
            with torch.enable_grad(), eval_mode(self.model):
                task_loss(call_model(self.model, x), batch).backward()
            for name, p in params.items():
                if p.grad is not None:
                    contrib = (p.detach() * p.grad).abs()
                    self.scores[name] = self.scores.get(name, 0) + contrib
        finally:
            for name, p in params.items():
                p.grad = None
                p.requires_grad_(saved[name])
        self.batches += 1

    def run(self, data: Iterable[Any], max_batches: int) -> TaylorStats:
        for i, batch in enumerate(data):
            if i >= max_batches:
                break
            self.update(batch)
        if not self.batches:
            raise SecateursError("Taylor importance needs at least one batch of data: pass data= (CLI: --data)")
        return self


class ActivationStats:
    """Mean |activation| per output channel of every Conv/Linear/norm layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sums: dict[str, Tensor] = {}
        self.batches = 0

    def run(self, data: Iterable[Any], max_batches: int) -> ActivationStats:
        hooks = []
        types = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        for name, module in self.model.named_modules():
            if isinstance(module, types) and getattr(module, "weight", None) is not None:
                hooks.append(module.register_forward_hook(self._hook(f"{name}.weight" if name else "weight",
                                                                      isinstance(module, (nn.Linear, nn.LayerNorm)))))
        self.batches += forward_batches(self.model, data, max_batches, hooks)
        if not self.batches:
            raise SecateursError("activation importance needs at least one batch of data: pass data= (CLI: --data)")
        return self

    def _hook(self, key: str, channels_last: bool) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 2:
                return
            moved = output if channels_last else output.movedim(1, -1)
            value = moved.detach().abs().float().reshape(-1, moved.shape[-1]).mean(0)
            self.sums[key] = self.sums.get(key, 0) + value

        return hook

    def per_channel(self) -> dict[str, Tensor]:
        return {k: v / max(self.batches, 1) for k, v in self.sums.items()}


class InputActivationStats:
    """Mean |input| per input feature of every ``nn.Linear`` (and transformers' ``Conv1D``).

    The statistic behind Minitron's width importance: a layer's input feature is
    a channel of whatever produced it (an FFN neuron entering the down projection,
    a head's attention output entering the output projection, a normalised hidden
    channel entering the q/k/v/gate/up projections and the LM head). Statistics are
    keyed by the weight's parameter name (a tied weight under its first name) and
    shaped to broadcast against it along its input dim: ``(1, in)`` for
    ``nn.Linear``, ``(in, 1)`` for ``Conv1D``, whose weight is stored ``(in, out)``.
    A layer called several times per forward averages over its calls. ``weights``: the
    names (as keyed) of the weights whose layers are watched (default: every layer).
    """

    def __init__(self, model: nn.Module, weights: Iterable[str] | None = None) -> None:
        self.model = model
        self.weights = None if weights is None else set(weights)  # the weights whose layers to watch (default: all)
        self.sums: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.input_dim: dict[str, int] = {}
        self.batches = 0

    def run(self, data: Iterable[Any], max_batches: int) -> InputActivationStats:
        import sys

        hf = sys.modules.get("transformers.pytorch_utils")
        conv1d = getattr(hf, "Conv1D", None)
        first_name: dict[int, str] = {}
        aliases: dict[int, set[str]] = {}  # a tied weight's every name (the graph may use any of them)
        for name, p in self.model.named_parameters(remove_duplicate=False):
            first_name.setdefault(id(p), name)
            aliases.setdefault(id(p), set()).add(name)
        hooks = []
        for mod_name, module in self.model.named_modules():
            transposed = conv1d is not None and isinstance(module, conv1d)
            if not (isinstance(module, nn.Linear) or transposed):
                continue
            if parametrize.is_parametrized(module, "weight"):
                key = f"{mod_name}.weight" if mod_name else "weight"  # masked: the plain name, as the graph has it
            elif id(module.weight) in first_name:
                key = first_name[id(module.weight)]
            else:
                continue
            if self.weights is not None and self.weights.isdisjoint({key, *aliases.get(id(module.weight), ())}):
                continue
            self.input_dim[key] = 0 if transposed else 1
            hooks.append(module.register_forward_hook(self._hook(key)))
        self.batches += forward_batches(self.model, data, max_batches, hooks)
        if not self.batches:
            raise SecateursError("minitron importance needs at least one batch of data: pass data= (CLI: --data)")
        return self

    def _hook(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, Tensor) or x.dim() < 1:
                return
            value = x.detach().abs().float().reshape(-1, x.shape[-1]).mean(0)
            self.sums[key] = self.sums.get(key, 0) + value
            self.calls[key] = self.calls.get(key, 0) + 1

        return hook

    def per_channel(self) -> dict[str, Tensor]:
        """Weight name -> mean |input| per input feature, shaped to broadcast along the weight's input dim."""
        out = {}
        for key, total in self.sums.items():
            mean = total / self.calls[key]
            out[key] = mean.unsqueeze(0) if self.input_dim[key] == 1 else mean.unsqueeze(1)
        return out


class InputGrams:
    """Gram matrix ``X^T X`` of the inputs of some Linear/convolution layers (convs: unfolded patches), float32.

    The statistic of the ``obs`` channel criterion: with a layer's weight it gives
    the output error that removing an input channel leaves after the layer's
    remaining weights are refitted. Keyed by weight name and input dim (``"fc.weight@in1"``).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]) -> None:
        self.model = model
        self.layers = list(layers)
        self.grams: dict[str, Tensor] = {}

    def run(self, data: Iterable[Any], max_batches: int) -> InputGrams:
        modules = dict(self.model.named_modules())
        hooks = []

        def hook(name: str) -> Any:
            def record(module: nn.Module, inputs: Any, _out: Any) -> None:
                rows = input_rows(module, inputs[0].detach()).float()
                key = f"{name}.weight@in{input_dim(module)}" if name else f"weight@in{input_dim(module)}"
                if key not in self.grams:
                    self.grams[key] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
                self.grams[key].addmm_(rows.T, rows)
            return record

        for name in self.layers:
            hooks.append(modules[name].register_forward_hook(hook(name)))
        if not forward_batches(self.model, data, max_batches, hooks):
            raise SecateursError("obs importance measures the layers' inputs: pass data= (CLI: --data)")
        return self


def _compensable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1


class BatchNormReaders:
    """Which BatchNorm reads each layer's output: filled by the forwards run while attached.

    A BatchNorm (one that tracks running statistics) *reads* a layer when the tensor it gets is
    the very tensor the layer returned, nothing in between; that BatchNorm is where a bias-free
    layer's output can be shifted (:func:`secateurs.surgery.reconstruct.apply_shift_`). Output
    tensors are kept alive until :meth:`next_pass`, so their ids are not reused within a forward.

    Args:
        model: the model whose forwards are watched.
        layers: names of the layers whose readers are wanted.

    Attributes:
        followers: layer name -> name of the first BatchNorm seen reading its output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        >>> readers = BatchNormReaders(model, ["0", "3"])
        >>> _ = model(torch.randn(1, 3, 2, 2))
        >>> readers.remove()
        >>> readers.followers
        {'0': '1'}
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]) -> None:
        self.followers: dict[str, str] = {}
        self.outputs: dict[int, str] = {}
        self.alive: list[Tensor] = []
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._produced(name)) for name in layers]
        self.handles += [module.register_forward_pre_hook(self._read(name)) for name, module in modules.items()
                         if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]

    def _produced(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                self.outputs[id(output)] = name
                self.alive.append(output)
        return hook

    def _read(self, name: str) -> Any:
        def hook(_module: nn.Module, inputs: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and id(inputs[0]) in self.outputs:
                self.followers.setdefault(self.outputs[id(inputs[0])], name)
        return hook

    def next_pass(self) -> None:
        """Forget the outputs of the forward that ended (their ids may be reused by the next one)."""
        self.outputs.clear()
        self.alive.clear()

    def remove(self) -> None:
        """Stop watching; :attr:`followers` keeps what was seen."""
        for handle in self.handles:
            handle.remove()
        self.next_pass()


class InputMeans:
    """Mean input per input channel of every dense Conv/Linear, and which BatchNorm reads each one's output.

    Used to fold what removed channels contributed on average into the next
    layer (:func:`secateurs.surgery.compensate.compensate_`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sums: dict[str, Tensor] = {}
        self.followers: dict[str, str] = {}  # layer name -> name of the BatchNorm that normalises its output
        self.calls: dict[str, int] = {}  # a layer called twice per forward averages over both calls
        self.batches = 0

    def run(self, data: Iterable[Any], max_batches: int) -> InputMeans:
        names = {id(m): n for n, m in self.model.named_modules()}
        hooks = []

        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, Tensor) or x.dim() < 2:
                return
            moved = x if isinstance(module, nn.Linear) else x.movedim(1, -1)
            key = names[id(module)]
            self.sums[key] = self.sums.get(key, 0) + moved.detach().float().reshape(-1, moved.shape[-1]).mean(0)
            self.calls[key] = self.calls.get(key, 0) + 1

        for module in self.model.modules():
            if _compensable(module):
                hooks.append(module.register_forward_hook(record))
        readers = BatchNormReaders(self.model, [n for n, m in self.model.named_modules() if _compensable(m)])
        hooks += readers.handles

        def next_batch() -> None:
            self.batches += 1
            readers.remove()  # followers are read from the first batch only

        forward_batches(self.model, data, max_batches, hooks, next_batch)
        for layer, norm in readers.followers.items():
            self.followers.setdefault(layer, norm)
        if not self.batches:
            raise SecateursError("compensation measures mean activations: pass data= (CLI: --data)")
        return self

    def means(self) -> dict[str, Tensor]:
        return {k: v / self.calls[k] for k, v in self.sums.items()}
