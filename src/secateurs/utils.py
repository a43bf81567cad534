"""Small helpers with no pruning logic in them."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["describe_names", "eager_experts", "eval_mode", "run_experts_eagerly", "total_memory", "first_line", "is_transformers_model", "launch_env", "launch_rank",
           "first_tensor", "nonfinite_parameters", "output_shapes"]


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (transformers is not imported to answer: a model of its was)."""
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


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


def run_experts_eagerly(model: nn.Module) -> dict[str, Any] | None:
    """Make a transformers model run its experts one at a time (``eager``, the per-expert loop hooks and the
    FLOP counter can follow; transformers' fused ``grouped_mm`` they cannot, nor does the CPU run it in float32).
    Returns the implementations to restore (None: nothing changed; other models are left as they are)."""
    get = getattr(model, "get_experts_implementation", None)
    put = getattr(model, "set_experts_implementation", None)
    before = get() if callable(get) and callable(put) else None
    if not before or all(v in (None, "eager") for v in before.values()):
        return None
    put("eager")
    return before


@contextlib.contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """:func:`run_experts_eagerly` for the duration of the block."""
    before = run_experts_eagerly(model)
    try:
        yield
    finally:
        if before is not None:
            model.set_experts_implementation(before)


def launch_env(name: str, default: int) -> int:
    """An integer torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or a clear error."""
    import os

    from .errors import SecateursError

    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise SecateursError(f"environment variable {name}={text[:40]!r} is not a whole number: "
                             "unset it, or launch with torchrun") from None


def launch_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it: WORLD_SIZE unset or 1)."""
    return launch_env("RANK", 0) if launch_env("WORLD_SIZE", 1) > 1 else 0


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters holding a NaN or an infinity (meta tensors are skipped)."""
    return [name for name, p in model.named_parameters()
            if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all())]


def describe_names(names: list[str], limit: int = 3) -> str:
    """``'a', 'b' and 2 more``: a short list of names for a one-line message."""
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def first_tensor(args: Any, kwargs: dict | None = None) -> Tensor | None:
    """The main tensor of a call's inputs or outputs: the first tensor, or ``hidden_states``."""
    if isinstance(args, Tensor):
        return args
    if isinstance(args, (tuple, list)):
        for item in args:
            found = first_tensor(item)
            if found is not None:
                return found
    if hasattr(args, "last_hidden_state") and isinstance(args.last_hidden_state, Tensor):
        return args.last_hidden_state
    if kwargs:
        if isinstance(kwargs.get("hidden_states"), Tensor):
            return kwargs["hidden_states"]
        for value in kwargs.values():
            if isinstance(value, Tensor):
                return value
    return None


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """The same structure in new tuples, lists and dicts, with ``fn`` applied to each tensor."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def output_shapes(out: Any) -> Any:
    """The shapes of a model output (tensors, dicts/ModelOutputs, tuples), nested the same way."""
    if isinstance(out, Tensor):
        return tuple(out.shape)
    if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "values")):
        return {k: output_shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [output_shapes(v) for v in out]
    return None


def total_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed since the last call back to the OS. glibc keeps large freed blocks in its heap
    (a freed embedding table or a layer's temporaries stay resident), so a process that frees big
    tensors one after another would otherwise creep up to the sum of its worst moments."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
