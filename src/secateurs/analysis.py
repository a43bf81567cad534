"""How big and how fast a model is: parameters, nonzeros, MACs, latency, saved size.

MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts at the
ATen level, so matmuls inside attention and functional calls count, not just
Conv/Linear modules. MACs = FLOPs / 2 for the forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .errors import SecateursError
from .masks import effective_parameters, finalize_, masked_tensors
from .selection import call_model, weight_names
from .utils import describe_names, eager_experts, eval_mode, first_line, nonfinite_parameters

log = logging.getLogger(__name__)

__all__ = ["LayerStats", "Latency", "ModelStats", "analyze", "compare_latency", "count_macs", "flop_counter_mode",
           "latency_stats", "measure_latency", "no_grad_parameters", "steady_allocator"]


@dataclass
class LayerStats:
    name: str
    type: str
    shape: list[int]
    params: int
    nonzero: int
    macs: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0


@dataclass
class ModelStats:
    """The numbers ``secateurs analyze`` prints; ``to_dict()`` is its ``--json`` object."""

    params: int
    nonzero_params: int
    macs: int
    nonzero_macs: int
    latency_ms: float | None
    size_bytes: int | None
    input_shape: list[int]
    layers: list[LayerStats] = field(default_factory=list)
    latency_iqr_ms: list[float] | None = None  # the middle half of the timed samples: [first, third quartile]
    latency_samples: int | None = None  # how many timed samples latency_ms is the median of

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def set_latency(self, latency: Latency) -> None:
        """Record a latency measurement."""
        for key, value in latency.fields().items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d


@dataclass
class Latency:
    """Milliseconds of one forward pass over ``samples`` timed samples, each the mean of ``calls`` forwards.

    Quick models are called a few times per sample, so that every sample lasts about a
    millisecond; samples stay short so that a busy machine's preemptions hit few of them,
    and the median passes over those.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    samples: int
    calls: int

    def fields(self) -> dict[str, Any]:
        """The keys :class:`ModelStats` (and its JSON) records: the median, its IQR, the sample count."""
        return {"latency_ms": self.median_ms, "latency_iqr_ms": [self.q1_ms, self.q3_ms],
                "latency_samples": self.samples}

    @classmethod
    def of(cls, times: list[float], calls: int) -> Latency:
        q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
        return cls(median, q1, q3, min(times), max(times), len(times), calls)


def _leaf_param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly (a parametrized weight counts as owned)."""
    out = []
    for name, module in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        if parametrize.is_parametrized(module) or any(True for _ in module.parameters(recurse=False)):
            out.append((name, module))
    return out


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    # A masked layer's class is torch's generated ParametrizedX(X): report X.
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    # PyTorch's registry covers the CUDA attention kernels but not the fused
    # CPU one that scaled_dot_product_attention dispatches to here.
    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    return extra


def flop_counter_mode() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` (per module, every depth) that also counts the CPU attention kernel.

    Divide its counts by 2 for multiply-accumulates. Run the model under :func:`no_grad_parameters`
    too (see there).
    """
    return FlopCounterMode(display=False, depth=None, custom_mapping=_extra_formulas())


@contextlib.contextmanager
def no_grad_parameters(model: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off on every parameter for the block, then restore it.

    FlopCounterMode tracks modules with autograd hooks on every module input
    that requires grad. Under ``no_grad`` a view of a parameter (timm's PiT
    expands its ``cls_token`` and hands it to the next block) still requires
    grad but has no grad function, and registering the hook fails with an
    AssertionError inside autograd. With no parameter requiring grad there is
    nothing to hook, and counting needs no gradients anyway.
    """
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)


def count_macs(model: nn.Module, inputs: Any) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one forward on ``inputs``: the total and the count per module name."""
    counter = flop_counter_mode()
    try:
        # fused experts counted as they run one expert at a time (the counter has no formula for grouped_mm)
        with torch.no_grad(), no_grad_parameters(model), eval_mode(model), eager_experts(model), counter:
            call_model(model, inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        shape = list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise SecateursError(
            f"the model rejected an input of shape {shape} ({first_line(exc)}): "
            "pass --input-shape with the shape it expects"
        ) from None
    per_module: dict[str, int] = {}
    root = type(model).__name__
    for key, counts in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key[len(root) + 1 :] if key.startswith(root + ".") else ("" if key == root else key)
        per_module[name] = sum(counts.values()) // 2
    return counter.get_total_flops() // 2, per_module


def _self_macs(module: nn.Module, name: str, per_module: dict[str, int]) -> int:
    """MACs of ``module`` itself: FlopCounterMode's count includes its children's."""
    prefix = f"{name}." if name else ""
    children = sum(per_module.get(prefix + child, 0) for child, _ in module.named_children())
    return max(per_module.get(name, 0) - children, 0)


def steady_allocator() -> bool:
    """Let glibc's malloc keep freed memory for reuse, so latency measures the model.

    By default glibc maps every allocation above a threshold (128 kB, adapted up
    to 32 MB as the process runs) freshly from the kernel and unmaps it on free,
    so each large activation costs page faults on every forward. On 2 CPU cores
    this made a dense MobileNetV2 at batch 8 run 3x slower (about 330 ms instead
    of 110 ms) depending on what the process had allocated before, which skews any
    dense-against-pruned comparison. Raising the mapping and trimming thresholds
    makes the numbers steady, as jemalloc or tcmalloc would. The cost: memory freed
    stays with the process instead of going back to the system.

    The CLI calls this for the commands that time models; Python users who time
    models (``measure_latency``, ``Channels(target_latency=...)``) can call it once
    at start. Returns False, changing nothing, where the C library is not glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    settings = ((m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1), (m_top_pad, 64 << 20))
    return all(mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in settings)


def measure_latency(
    model: nn.Module, inputs: Any, *, warmup: int = 3, repeats: int = 20, max_seconds: float = 5.0
) -> float:
    """Median wall-clock milliseconds of one forward pass, after warm-up.

    Stops early (after at least 3 timed runs) once ``max_seconds`` are spent so
    large models stay quick to analyze.
    """
    times: list[float] = []
    sync = torch.cuda.synchronize if any(p.is_cuda for p in model.parameters()) else (lambda: None)
    with torch.inference_mode(), eval_mode(model):
        for _ in range(warmup):
            call_model(model, inputs)
        sync()
        budget_end = time.perf_counter() + max_seconds
        while len(times) < repeats:
            start = time.perf_counter()
            call_model(model, inputs)
            sync()
            times.append((time.perf_counter() - start) * 1000)
            if len(times) >= 3 and time.perf_counter() > budget_end:
                break
    return statistics.median(times)


SAMPLE_MS = 1.0  # the least time one timed sample lasts: quick models are called a few times per sample
MIN_SAMPLES = 5  # timed samples taken even past the time budget
_MAX_CALLS = 1000  # forwards per sample, at most


class _Timer:
    """Times one model on fixed inputs: warm-up, then samples of enough forwards to last ``SAMPLE_MS``."""

    def __init__(self, model: nn.Module, inputs: Any, warmup: int) -> None:
        self.model, self.inputs = model, inputs
        cuda = any(p.is_cuda for p in model.parameters())
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.times: list[float] = []
        for _ in range(max(warmup, 1)):
            once = self._run(1)
        self.calls = max(1, min(_MAX_CALLS, math.ceil(SAMPLE_MS / max(once, 1e-6))))

    def _run(self, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            call_model(self.model, self.inputs)
        self.sync()
        return (time.perf_counter() - start) * 1000 / calls

    def sample(self) -> None:
        self.times.append(self._run(self.calls))


def latency_stats(
    model: nn.Module, inputs: Any, *, warmup: int = 3, repeats: int = 50, max_seconds: float = 5.0
) -> Latency:
    """Time ``repeats`` samples of one forward pass after warm-up: the median and its spread.

    Stops early (after at least ``MIN_SAMPLES`` samples) once ``max_seconds`` are spent, so
    large models stay quick to analyze.

    Example:
        >>> import torch
        >>> lat = latency_stats(torch.nn.Linear(8, 8), torch.randn(1, 8), repeats=6)
        >>> lat.samples, lat.min_ms <= lat.q1_ms <= lat.median_ms <= lat.q3_ms <= lat.max_ms
        (6, True)
    """
    return compare_latency({"model": model}, inputs, warmup=warmup, repeats=repeats, max_seconds=max_seconds)["model"]


def compare_latency(
    models: dict[str, nn.Module], inputs: Any, *, warmup: int = 3, repeats: int = 50, max_seconds: float = 10.0
) -> dict[str, Latency]:
    """Time several models on the same inputs, their samples interleaved round by round.

    A busy machine slows whatever runs while it is busy: timed one after the
    other, two identical models can differ several times over. Interleaved,
    each round times every model within a few milliseconds of the others, so
    their ratio holds even while the absolute numbers wander (the spread shows
    how much they did).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(8, 8)
        >>> lat = compare_latency({"a": net, "b": net}, torch.randn(1, 8), repeats=5)
        >>> sorted(lat), lat["a"].samples == lat["b"].samples == 5
        (['a', 'b'], True)
    """
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        timers = {name: _Timer(model, inputs, warmup) for name, model in models.items()}
        order = list(timers.values())
        budget_end = time.perf_counter() + max_seconds
        for round_ in range(repeats):
            for timer in order if round_ % 2 == 0 else order[::-1]:  # neither model always goes first
                timer.sample()
            if round_ + 1 >= MIN_SAMPLES and time.perf_counter() > budget_end:
                break
    return {name: Latency.of(timer.times, timer.calls) for name, timer in timers.items()}


def deployable(model: nn.Module) -> nn.Module:
    """What latency is measured on: masks baked into a copy (the parametrization bookkeeping is not timed)."""
    if any(True for _ in masked_tensors(model)):
        return finalize_(copy.deepcopy(model))
    return model


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency: bool = True,
    size: bool = True,
    warmup: int = 3,
    repeats: int = 50,
) -> ModelStats:
    """Measure ``model`` on ``example_inputs`` (the batch size is the inputs').

    Latency is measured on the deployable model: masks are baked into a copy
    first, so the parametrization bookkeeping is not timed. It is the median
    of ``repeats`` timed samples (fewer when a large model spends the time
    budget), with the middle half of them in ``latency_iqr_ms``; to compare
    two models on a busy machine, time them together with
    :func:`compare_latency`.

    Example:
        >>> import torch, secateurs
        >>> stats = secateurs.analyze(torch.nn.Linear(10, 20), torch.randn(1, 10), latency=False)
        >>> stats.params, stats.macs
        (220, 200)
    """
    from .io.checkpoint import serialized_size  # io builds on analysis, not the reverse

    bad = nonfinite_parameters(model)
    if bad:
        log.warning("weights of %s contain NaN/inf: the model's outputs (and latency) may be meaningless; "
                    "fix the model before pruning it", describe_names(bad))
    total_macs, per_module = count_macs(model, example_inputs)
    effective = dict(effective_parameters(model))
    nonzeros = {name: int(t.count_nonzero()) for name, t in effective.items()}
    layers: list[LayerStats] = []
    nonzero_macs = 0
    for name, module in _leaf_param_modules(model):
        prefix = f"{name}." if name else ""
        own = {k: v for k, v in effective.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}
        if not own:
            continue  # its parameters are shared with (and counted under) another module
        params = sum(v.numel() for v in own.values())
        nonzero = sum(nonzeros[k] for k in own)
        wnames = [prefix + w for w in weight_names(module) if prefix + w in own]
        weight = own[wnames[0]] if wnames else None
        macs = _self_macs(module, name, per_module)
        # fused experts: one 3-D stack per projection, every product is with one expert's matrix
        stacks = [k for k, v in own.items() if v.dim() == 3 and v.is_floating_point() and not wnames]
        if wnames == [prefix + "weight"] and weight is not None and weight.numel():
            nonzero_macs += round(macs * nonzeros[prefix + "weight"] / weight.numel())
        elif stacks:  # exact when every expert is as sparse as the others (each ranked alone), else an estimate
            weight = own[stacks[0]]
            nonzero_macs += round(macs * sum(nonzeros[k] for k in stacks) / sum(own[k].numel() for k in stacks))
        else:  # e.g. attention: its matmuls with activations do not shrink with its weights
            nonzero_macs += macs
        layers.append(
            LayerStats(
                name=name,
                type=_type_name(module),
                shape=list(weight.shape) if weight is not None else [],
                params=params,
                nonzero=nonzero,
                macs=macs,
            )
        )
    # MACs outside parameterised leaves (attention matmuls, functional ops) are dense.
    nonzero_macs += total_macs - sum(layer.macs for layer in layers)
    shape = list(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else []
    stats = ModelStats(
        params=sum(v.numel() for v in effective.values()),
        nonzero_params=sum(nonzeros.values()),
        macs=int(total_macs),
        nonzero_macs=int(nonzero_macs),
        latency_ms=None,
        size_bytes=serialized_size(model) if size else None,
        input_shape=shape,
        layers=layers,
    )
    if latency:
        stats.set_latency(latency_stats(deployable(model), example_inputs, warmup=warmup, repeats=repeats))
    return stats
