"""Prefix replay: trials that change a few parameters re-use the dense run's module outputs.

A sensitivity scan scores the model hundreds of times, each time with one
layer or channel group zeroed. Everything the model computes before that
layer is the same as in the dense run, and so is every module that neither
owns a changed tensor nor sees a changed input. :class:`PrefixReplay` records
the dense run's module calls (inputs and outputs, by call order) and, in a
trial, answers a call from the record when

- the call is the same module at the same position of the same forward,
- no changed tensor is among the module's own or its submodules' parameters,
- its inputs equal the recorded ones (tensors value for value, other arguments
  by ``==``).

A skipped call's submodules are not run at all, so on a chain of blocks the
trial pays only for the blocks from the changed one on. Answers are copies,
so code that works in place on them cannot spoil the record; a recorded
tensor that the dense run itself changed in place (``ReLU(inplace=True)`` on a
BatchNorm output, ``out += identity``) is never used: such calls are run.

This is exact for modules whose output depends only on their inputs,
parameters and buffers, which holds for inference-mode networks; a module that
reads another module's parameters without owning it (weight tying through a
plain attribute, not a shared ``Parameter``) would defeat the ownership test.
The record holds on to the dense run's activations, up to ``budget_bytes``;
calls beyond the budget are simply run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PrefixReplay"]

# Activations the record keeps at most (the dense run's outputs, shared with the model's own).
REPLAY_BUDGET_BYTES = 2 << 30


@dataclass
class _Call:
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: list[int]  # the version counters of the input and output tensors when recorded
    output: Any = None
    end: int = 0  # the call index after this call's submodule calls
    usable: bool = False


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


def _plain(value: Any) -> bool:
    """Is ``value`` made only of tensors, tuples, lists, dicts and plain constants (so it can be compared)?"""
    if isinstance(value, (Tensor, int, float, bool, str, type(None))):
        return True
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


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
        self._depth = 0
        self._bytes = 0
        self._storages: set[int] = set()
        self._blocked: set[int] = set()
        self._owned: dict[int, set[int]] = {}
        self._saved: dict[nn.Module, Any] = {}

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
        self._mode = "record"
        try:
            yield
        finally:
            self._mode = None
        for run in self.runs:  # a tensor changed in place after it was recorded is no answer
            for call in run.calls:
                seen = _tensors((call.args, call.kwargs, call.output))
                call.usable = call.usable and [t._version for t in seen] == call.versions

    @contextmanager
    def trial(self, changed: Iterable[Tensor]) -> Iterator[None]:
        """Forwards run inside replay the record, except modules owning a ``changed`` tensor."""
        changed_ids = {id(t) for t in changed}
        self._blocked = {id(m) for m in self.model.modules() if self._owns(m) & changed_ids}
        for run in self.runs:
            run.index = 0
        self._mode = "trial"
        self._run_number = 0
        try:
            yield
        finally:
            self._mode = None

    def _owns(self, module: nn.Module) -> set[int]:
        if id(module) not in self._owned:
            self._owned[id(module)] = {id(p) for p in module.parameters()}
        return self._owned[id(module)]

    # -- the wrapper

    def _wrap(self, module: nn.Module, forward: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._mode is None:
                return forward(*args, **kwargs)
            top = self._depth == 0
            if top:
                self._start_run()
            self._depth += 1
            try:
                if self._mode == "record":
                    return self._record(module, forward, args, kwargs)
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
        entry = _Call(module, args, kwargs, [])
        run.calls.append(entry)
        inputs = _tensors((args, kwargs))
        before = [t._version for t in inputs]
        output = forward(*args, **kwargs)
        entry.end = len(run.calls)
        entry.output = output
        seen = _tensors((args, kwargs, output))
        entry.versions = [t._version for t in seen]
        # a call that changes its own inputs in place (ReLU(inplace=True)) is recorded with the changed
        # values, which are not what it was given: it is always run
        entry.usable = (_plain((args, kwargs, output)) and bool(_tensors(output))
                        and [t._version for t in inputs] == before and self._admit(seen))
        if not entry.usable:
            entry.args = entry.kwargs = entry.output = None  # hold on to nothing
        return output

    def _admit(self, tensors: list[Tensor]) -> bool:
        """Count the tensors' storages against the budget; False once it is spent."""
        new = {}
        for t in tensors:
            key = t.untyped_storage().data_ptr()
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
        if [t._version for t in _tensors((entry.args, entry.kwargs, entry.output))] == entry.versions:
            return True
        entry.usable = False
        return False

    def _replay(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        run = self._run
        index = run.index
        entry = run.calls[index] if index < len(run.calls) else None
        if (entry is not None and entry.usable and entry.module is module and id(module) not in self._blocked
                and self._intact(entry) and _same(args, entry.args) and _same(kwargs, entry.kwargs)):
            run.index = entry.end
            self.skipped += 1
            return _copy(entry.output)
        run.index += 1
        return forward(*args, **kwargs)


def _same(value: Any, recorded: Any) -> bool:
    """Equal values: tensors element for element (same dtype, shape and device), the rest by ``==``."""
    if isinstance(recorded, Tensor):
        return (isinstance(value, Tensor) and (value is recorded or (
            value.dtype == recorded.dtype and value.shape == recorded.shape and value.device == recorded.device
            and bool(torch.equal(value, recorded)))))
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
