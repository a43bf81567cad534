"""Prefix replay: trials that change a few parameters re-use the dense run's module outputs.

A sensitivity scan scores the model hundreds of times, each time with one
layer or channel group zeroed. Everything the model computes before that
layer is the same as in the dense run, and so is every module that neither
owns a changed tensor nor sees a changed input. :class:`PrefixReplay` records
the dense run's module calls (inputs and outputs, by call order) and, in a
trial, answers a call from the record when

- the call is the same module at the same position of the same forward,
- no changed tensor shares memory with the module's own or its submodules' parameters,
- its inputs equal the recorded ones (tensors bit for bit, other arguments by ``==``),
- and the module is not stateful: in the dense run, neither it nor a submodule
  drew random numbers, changed a buffer, or set an attribute.

A skipped call's submodules are not run at all, so on a chain of blocks the
trial pays only for the blocks from the changed one on. Answers are copies,
so code that works in place on them cannot spoil the record; the record holds
its own copy of every list, tuple and dict it keeps, and a recorded tensor that
was changed in place since (``ReLU(inplace=True)`` on a BatchNorm output,
``out += identity``) is never used: such calls are run.

This is exact for modules whose output depends only on their inputs,
parameters and buffers, which holds for inference-mode networks. Two things it
cannot see: a module that reads another module's parameters without owning
them through a plain Python reference (not a shared ``Parameter``), and state
kept in a mutable object changed in place (``self.cache.append(...)``).
Inference-mode, sparse and nested tensors are not recorded (those calls are
always run). The record holds on to the dense run's activations, up to
``budget_bytes``; calls beyond the budget are simply run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import map_tensors

__all__ = ["PrefixReplay"]

# Activations the record keeps at most (the dense run's outputs, shared with the model's own).
REPLAY_BUDGET_BYTES = 2 << 30

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Call:
    module: nn.Module
    args: Any
    kwargs: Any
    versions: list[int]  # the version counters of the input and output tensors when recorded
    output: Any = None
    end: int = 0  # the call index after this call's submodule calls
    usable: bool = False

    def drop(self) -> None:
        """Never answer this call (and hold on to nothing)."""
        self.usable = False
        self.args = self.kwargs = self.output = None


@dataclass
class _Run:
    calls: list[_Call] = field(default_factory=list)
    index: int = 0  # the next call's position (in a trial)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a value made of tensors, tuples, lists and dicts."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _ordinary(t: Tensor) -> bool:
    """A dense tensor with a version counter (not sparse, nested or made in inference mode)."""
    return t.layout == torch.strided and not t.is_nested and not t.is_inference()


def _plain(value: Any) -> bool:
    """Is ``value`` made only of ordinary tensors, tuples, lists, dicts and constants (so it can be compared)?"""
    if isinstance(value, Tensor):
        return _ordinary(value)
    if isinstance(value, (int, float, bool, str, type(None))):
        return True
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _snapshot(value: Any) -> Any:
    """New containers around the same tensors: the caller may change its own lists and dicts afterwards."""
    return map_tensors(value, lambda t: t)


def _copy(value: Any) -> Any:
    """New containers around copies of the tensors: an answer the caller may change in place."""
    return map_tensors(value, Tensor.clone)


def _storage(t: Tensor) -> int:
    """The address of a tensor's memory: views, detached tensors and the Parameter behind them share it."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors: their identity
        return id(t)


def _rng_states() -> list[Tensor]:
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return states


def _module_state(model: nn.Module) -> dict[int, tuple[tuple, dict[str, Any]]]:
    """What a forward could change besides its output: attributes (by identity) and buffers (by value).

    Buffers are compared by value, not by version counter: code that writes through ``.data``
    (``torch.ao`` observers do) changes a tensor without counting it.
    """
    state = {}
    for module in model.modules():
        attrs = tuple((k, id(v)) for k, v in module.__dict__.items()
                      if k not in ("_parameters", "_buffers", "_modules", "forward"))
        buffers = {k: (id(b), b.clone() if isinstance(b, Tensor) and _ordinary(b) else None)
                   for k, b in module._buffers.items()}
        state[id(module)] = (attrs, buffers)
    return state


def _changed_modules(before: dict[int, tuple[tuple, dict[str, Any]]],
                     after: dict[int, tuple[tuple, dict[str, Any]]]) -> set[int]:
    changed = set()
    for key, (attrs, buffers) in before.items():
        attrs_now, buffers_now = after.get(key, ((), {}))
        if attrs != attrs_now or buffers.keys() != buffers_now.keys() or any(
                buffers[k][0] != buffers_now[k][0]
                or (buffers[k][1] is not None and not torch.equal(buffers[k][1], buffers_now[k][1]))
                for k in buffers):
            changed.add(key)
    return changed


class PrefixReplay:
    """Records the dense forward's module calls and answers unchanged ones in trials (see the module docs).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        >>> x = torch.randn(3, 4)
        >>> with PrefixReplay(model) as replay, torch.no_grad():
        ...     with replay.recording():
        ...         dense = model(x)
        ...     with replay.trial([model[2].weight]):
        ...         _ = model[2].weight.mul_(0.5)
        ...         out = model(x)  # model[0] and model[1] answered from the record
        ...         _ = model[2].weight.mul_(2.0)
        >>> replay.skipped
        2
    """

    def __init__(self, model: nn.Module, budget_bytes: int = REPLAY_BUDGET_BYTES) -> None:
        self.model = model
        self.budget = budget_bytes
        self.runs: list[_Run] = []
        self.skipped = 0  # calls answered from the record (over all trials)
        self._mode: str | None = None
        self._run: _Run | None = None
        self._run_number = 0
        self._depth = 0
        self._bytes = 0
        self._storages: set[int] = set()
        self._stateful: set[int] = set()  # modules that changed state in the dense run
        self._blocked: set[int] = set()
        self._saved: dict[nn.Module, Any] = {}
        self._subtrees: dict[int, tuple[set[int], set[int]]] = {}

    # -- installing and removing the call wrappers

    def __enter__(self) -> PrefixReplay:
        for module in self.model.modules():
            if isinstance(module, torch.jit.ScriptModule) or module in self._saved:
                continue
            self._saved[module] = module.__dict__.get("forward")
            module.__dict__["forward"] = self._wrap(module, module.forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, previous in self._saved.items():
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._saved.clear()
        self.runs.clear()

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Forwards run inside are the dense record (one run per top-level call)."""
        self.runs.clear()
        self._bytes = 0
        self._storages.clear()
        self._stateful.clear()
        self._mode = "record"
        try:
            yield
        finally:
            self._mode = None
        for run in self.runs:  # a tensor changed in place after it was recorded is no answer
            for call in run.calls:
                if call.usable and not self._intact(call):
                    call.drop()

    @contextmanager
    def trial(self, changed: Iterable[Tensor]) -> Iterator[None]:
        """Forwards run inside replay the record, except modules owning (memory of) a ``changed`` tensor."""
        changed_memory = {_storage(t) for t in changed}
        self._blocked = set()
        for module in self.model.modules():
            memory, modules = self._subtree(module)
            if memory & changed_memory or modules & self._stateful:
                self._blocked.add(id(module))
        for run in self.runs:
            run.index = 0
        self._mode = "trial"
        self._run_number = 0
        try:
            yield
        finally:
            self._mode = None

    def _subtree(self, module: nn.Module) -> tuple[set[int], set[int]]:
        """The memory of the parameters ``module`` and its submodules own, and their ids."""
        if id(module) not in self._subtrees:
            self._subtrees[id(module)] = ({_storage(p) for p in module.parameters()},
                                          {id(m) for m in module.modules()})
        return self._subtrees[id(module)]

    # -- the wrapper

    def _wrap(self, module: nn.Module, forward: Any) -> Any:
        @functools.wraps(forward)  # keeps the signature (some code filters keyword arguments by it)
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._mode is None:
                return forward(*args, **kwargs)
            top = self._depth == 0
            if top:
                self._start_run()
            self._depth += 1
            try:
                if self._mode == "record":
                    state = _module_state(self.model) if top else None
                    output = self._record(module, forward, args, kwargs)
                    if state is not None:  # which modules changed attributes or buffers in this forward
                        self._stateful |= _changed_modules(state, _module_state(self.model))
                    return output
                return self._replay(module, forward, args, kwargs)
            finally:
                self._depth -= 1

        return call

    def _start_run(self) -> None:
        if self._mode == "record":
            self.runs.append(_Run())
            self._run = self.runs[-1]
        else:
            number = self._run_number
            self._run_number += 1
            self._run = self.runs[number] if number < len(self.runs) else _Run()

    def _record(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        run = self._run
        entry = _Call(module, None, None, [])
        run.calls.append(entry)
        comparable = _plain((args, kwargs))
        inputs = _tensors((args, kwargs)) if comparable else []
        before = [t._version for t in inputs]
        rng = _rng_states()
        output = forward(*args, **kwargs)
        entry.end = len(run.calls)
        if any(not torch.equal(a, b) for a, b in zip(rng, _rng_states(), strict=True)):
            self._stateful.add(id(module))  # it drew random numbers: skipping it would shift later draws
            return output
        # a call that changes its own inputs in place (ReLU(inplace=True)) is recorded with the changed
        # values, which are not what it was given: it is always run
        if not (comparable and _plain(output) and _tensors(output) and [t._version for t in inputs] == before):
            return output
        entry.args, entry.kwargs, entry.output = _snapshot(args), _snapshot(kwargs), _snapshot(output)
        seen = _tensors((entry.args, entry.kwargs, entry.output))
        entry.versions = [t._version for t in seen]
        entry.usable = self._admit(seen)
        if not entry.usable:
            entry.drop()
        return output

    def _admit(self, tensors: list[Tensor]) -> bool:
        """Count the tensors' memory against the budget; False once it is spent."""
        new = {}
        for t in tensors:
            key = _storage(t)
            if key not in self._storages:
                new[key] = t.untyped_storage().nbytes()
        if self._bytes + sum(new.values()) > self.budget:
            return False
        self._bytes += sum(new.values())
        self._storages.update(new)
        return True

    @staticmethod
    def _intact(entry: _Call) -> bool:
        """Are the recorded tensors unchanged since? (A parameter passed as an argument may have been zeroed.)"""
        return [t._version for t in _tensors((entry.args, entry.kwargs, entry.output))] == entry.versions

    def _replay(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        run = self._run
        index = run.index
        entry = run.calls[index] if index < len(run.calls) else None
        if entry is not None and entry.usable and entry.module is module and id(module) not in self._blocked:
            if not self._intact(entry):
                entry.drop()
            elif _same(args, entry.args) and _same(kwargs, entry.kwargs):
                run.index = entry.end
                self.skipped += 1
                return _copy(entry.output)
        run.index += 1
        return forward(*args, **kwargs)


def _bits(t: Tensor) -> Tensor:
    """The tensor's bits as integers (so -0.0 differs from 0.0, and a NaN equals the same NaN)."""
    if t.is_floating_point() or t.is_complex():
        return t.view(_BITS[t.element_size()])
    return t


def _same(value: Any, recorded: Any) -> bool:
    """Equal values: tensors bit for bit (same dtype, shape and device), the rest by ``==``."""
    if isinstance(recorded, Tensor):
        if not isinstance(value, Tensor):
            return False
        if value is recorded:
            return True
        try:
            return (_ordinary(value) and value.dtype == recorded.dtype and value.shape == recorded.shape
                    and value.device == recorded.device and bool(torch.equal(_bits(value), _bits(recorded))))
        except (RuntimeError, NotImplementedError):  # a tensor type without bitwise equality: run the call
            return False
    if isinstance(recorded, (tuple, list)):
        return (type(value) is type(recorded) and len(value) == len(recorded)
                and all(_same(v, r) for v, r in zip(value, recorded, strict=True)))
    if isinstance(recorded, dict):
        return (type(value) is dict and value.keys() == recorded.keys()
                and all(_same(value[k], r) for k, r in recorded.items()))
    try:
        return type(value) is type(recorded) and bool(value == recorded)
    except Exception:  # an argument that cannot be compared: run the call
        return False
