"""2:4 semi-structured sparse kernels on CUDA GPUs, swapped in only where they are measured faster.

A 2:4-pruned Linear computes the same thing with a dense kernel and with
PyTorch's semi-structured sparse one (cuSPARSELt or CUTLASS on sparse tensor
cores), but the sparse kernel is not always the faster: below a few thousand
tokens per call its fixed cost (about 0.5 ms per call on an H200) can outweigh
the halved arithmetic. So nothing is swapped on faith. :func:`semi_structured_`
times every eligible layer both ways at the input shape the model really gives
it, swaps a weight only when the sparse kernel wins by ``min_speedup``, checks
the model's outputs and whole-model latency afterwards, and puts everything
back if the model got slower or its outputs moved. :func:`restore_dense_`
undoes a swap (a semi-structured tensor cannot be saved by safetensors).

The timer and the dense-to-sparse conversion are parameters, so every decision
here (eligibility, the threshold, both undo paths, the report) runs on CPU with
stand-ins; only the kernels themselves need the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import SecateursError
from .masks import (
    get_mask,
    pack_bits,
    set_mask_,
    tied_modules,
    unpack_bits,
    unparametrize_,
    weight_key,
)
from .selection import call_model
from .utils import eval_mode, first_line, first_tensor, map_tensors

log = logging.getLogger(__name__)

__all__ = [
    "SemiStructuredLayer",
    "SemiStructuredReport",
    "check_device",
    "cuda_timer",
    "default_to_sparse",
    "eligibility",
    "is_2to4",
    "refuse_semi_structured",
    "relative_error",
    "resolve_backend",
    "restore_dense_",
    "semi_structured_",
    "semi_structured_names",
]

Timer = Callable[[Callable[[], Any]], float]
ToSparse = Callable[[Tensor], Tensor]

BACKENDS = ("auto", "cusparselt", "cutlass")
SWAPPED_ATTR = "_secateurs_semi_structured"  # on a swapped Linear: how to make it dense (and masked) again
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what nn.Linear computes in
# Relative error (norm of the difference over the norm of the dense output) still taken as the same
# output: the sparse kernels accumulate in another order, and fp32 runs as TF32 on sparse tensor cores.
# A wrong layout or pattern gives errors of order 1.
_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3}
_NO_GPU = "2:4 sparse kernels need a CUDA GPU with compute capability 8.0+"


@dataclass
class SemiStructuredLayer:
    """One Linear layer: its weight shape, the tokens per call it was timed at, both timings, the outcome."""

    name: str
    shape: list[int]
    tokens: int | None = None
    dense_ms: float | None = None
    sparse_ms: float | None = None
    swapped: bool = False
    reason: str = ""  # why it was not swapped ("" when it was)
    also: dict[int, float] = field(default_factory=dict)  # speedup at each of ``also_tokens`` tokens per call

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SemiStructuredReport:
    """What :func:`semi_structured_` measured and did; ``to_dict()`` is the CLI's ``--json``."""

    device: str
    dtype: str
    backend: str
    min_speedup: float
    layers: list[SemiStructuredLayer] = field(default_factory=list)
    model_ms_before: float | None = None  # whole model, eligible masks baked, all dense
    model_ms_after: float | None = None  # whole model with the swapped layers (None: nothing swapped or not timed)
    output_error: float | None = None  # whole-model relative output error after the swap
    undone: str | None = None  # why every swap was put back, if it was

    @property
    def swapped(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.swapped]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for entry, layer in zip(d["layers"], self.layers, strict=True):
            entry["speedup"] = layer.speedup
        d["swapped"] = self.swapped
        return d

    def table(self) -> str:
        """The per-layer table and a summary line, for the terminal."""
        from .report.table import format_table

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        also = sorted({t for layer in self.layers for t in layer.also})  # the also_tokens counts, if any
        rows = [[layer.name, "x".join(map(str, layer.shape)), layer.tokens or "-", ms(layer.dense_ms),
                 ms(layer.sparse_ms), "-" if layer.speedup is None else f"{layer.speedup:.2f}x",
                 *(f"{layer.also[t]:.2f}x" if t in layer.also else "-" for t in also)]
                for layer in self.layers]
        headers = ["layer", "weight", "tokens", "dense ms", "2:4 ms", "speedup", *(f"at {t} tok" for t in also)]
        lines = format_table(headers, rows).splitlines()
        outcomes = ["outcome", "-------"] + ["swapped" if layer.swapped else layer.reason for layer in self.layers]
        table = "\n".join(f"{line}  {outcome}" for line, outcome in zip(lines, outcomes, strict=True))
        linear = f"{len(self.swapped)} of {len(self.layers)} Linear layers swapped"
        where = f"{self.device}, {self.dtype}, {self.backend}, min speedup {self.min_speedup:g}"
        if self.undone:
            summary = f"{linear}: {self.undone}"
        elif self.model_ms_before is not None and self.model_ms_after is not None:
            summary = (f"{linear}; whole model {self.model_ms_before:.3f} ms -> {self.model_ms_after:.3f} ms "
                       f"({self.model_ms_before / self.model_ms_after:.2f}x)")
        elif self.model_ms_before is not None:
            summary = f"{linear}; whole model {self.model_ms_before:.3f} ms, unchanged"
        else:
            summary = f"{linear}; whole model not timed (no example inputs)"
        return f"{table}\n{summary} ({where})"


@dataclass(frozen=True)
class _Options:
    tokens: int | None
    also_tokens: tuple[int, ...]
    min_speedup: float
    dtype: torch.dtype | None
    backend: str
    tolerance: float | None
    rounds: int

    def __post_init__(self) -> None:
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise SecateursError(f"tokens must be a whole number of at least 1, got {self.tokens!r}")
        if not all(isinstance(t, int) and t >= 1 for t in self.also_tokens):
            raise SecateursError(f"also_tokens must be whole numbers of at least 1 (1: one token per call, as in "
                                 f"decoding), got {list(self.also_tokens)!r}")
        if not isinstance(self.min_speedup, (int, float)) or not self.min_speedup > 0:
            raise SecateursError(f"min_speedup must be a positive number (1.05: 5% faster), got {self.min_speedup!r}")
        if self.dtype is not None and self.dtype not in _FLOAT_DTYPES:
            raise SecateursError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {self.dtype}")
        if self.backend not in BACKENDS:
            raise SecateursError(f"unknown backend '{self.backend}': choose one of {', '.join(BACKENDS)}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise SecateursError(f"tolerance must be positive, got {self.tolerance!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise SecateursError(f"rounds must be a whole number of at least 1, got {self.rounds!r}")


def check_device(device: torch.device | str) -> None:
    """Raise a one-line :class:`SecateursError` unless ``device`` can run 2:4 sparse kernels.

    They run on sparse tensor cores: CUDA GPUs of compute capability 8.0 (Ampere) or newer.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise SecateursError(f"{_NO_GPU}; this model is on {device}: move it to such a GPU first "
                             "(model.to('cuda'), or --device cuda)")
    if not torch.cuda.is_available():
        raise SecateursError(f"{_NO_GPU}; CUDA is not available here (torch.cuda.is_available() is False): "
                             "run on a machine with such a GPU")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise SecateursError(f"{_NO_GPU}; {device} ({torch.cuda.get_device_name(device)}) has {major}.{minor}: "
                             "use an Ampere or newer GPU (A100, L4, H100, RTX 30xx or later)")
    if not hasattr(torch, "_cslt_sparse_mm") and not hasattr(torch, "_sparse_semi_structured_mm"):
        raise SecateursError(f"{_NO_GPU}; this torch build ({torch.__version__}) has none: install an official "
                             "CUDA build of torch")


def resolve_backend(backend: str) -> str:
    """``auto`` becomes ``cusparselt`` when this torch build has it, else ``cutlass``."""
    if backend == "auto":
        return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise SecateursError("this torch build has no cuSPARSELt: pass backend='cutlass' (or 'auto')")
    return backend


def _sparse_class(backend: str) -> type:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS


def _constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """``dtype -> (row multiple, column multiple)`` of a weight the backend accepts, from torch's own table."""
    table = _sparse_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    return {dtype: (c.sparse_min_rows, c.sparse_min_cols) for dtype, c in table.items() if dtype in _FLOAT_DTYPES}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_2to4(weight: Tensor) -> bool:
    """True when every run of 4 consecutive weights along the input dimension (dim 1) has at most 2 nonzeros.

    That is the pattern the kernels store; they compress other weights without
    complaint and compute something else, so this is checked before any swap.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = weight.detach().reshape(weight.shape[0], -1, 4)
    return bool(groups.ne(0).sum(dim=-1).le(2).all())


def eligibility(weight: Tensor, backend: str) -> str | None:
    """None when ``backend``'s 2:4 kernel can take this Linear weight as it is; otherwise why not.

    Args:
        weight: the effective weight (masks applied), ``(out_features, in_features)``.
        backend: ``cusparselt`` or ``cutlass``.
    """
    table = _constraints(backend)
    if weight.dtype not in table:
        names = ", ".join(_name(d) for d in table)
        return f"dtype {_name(weight.dtype)} is not supported by {backend} ({names}): pass dtype"
    rows, cols = table[weight.dtype]
    out_f, in_f = weight.shape
    if out_f % rows or in_f % cols:
        return f"shape {out_f}x{in_f} is not a multiple of {rows}x{cols} ({backend}, {_name(weight.dtype)})"
    if not is_2to4(weight):
        return "not 2:4 sparse along the input dimension"
    return None


def default_to_sparse(backend: str) -> ToSparse:
    """The real conversion: a ``SparseSemiStructuredTensor`` of ``backend``'s class (no global flag flipped)."""
    cls = _sparse_class(backend)

    def to_sparse(weight: Tensor) -> Tensor:
        with warnings.catch_warnings():  # torch warns once that the API is a prototype: known, and not the user's
            warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype")
            return cls.from_dense(weight.detach().contiguous())

    return to_sparse


def cuda_timer(warmup: int = 3, repeats: int = 20, max_seconds: float = 1.0) -> Timer:
    """Median milliseconds per call, from CUDA events around each call after ``warmup`` calls.

    The calls are queued back to back with one synchronisation at the end, as in
    inference, so launch overhead counts only where the GPU would wait for it.
    Events go on the current device's stream: call it under ``torch.cuda.device(...)``
    of the device the work runs on. Stops queueing after ``max_seconds`` of host time
    (at least 3 timed calls); calls that take the GPU longer than their launch are
    bounded by ``repeats``.
    """

    def time_ms(fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        deadline = time.perf_counter() + max_seconds
        while len(events) < repeats:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if len(events) >= 3 and time.perf_counter() > deadline:
                break
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    return time_ms


def _wall_timer(warmup: int = 3, repeats: int = 20) -> Timer:
    """Median wall-clock milliseconds per call: for stand-in kernels on CPU."""

    def time_ms(fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    return time_ms


def relative_error(reference: Tensor, other: Tensor) -> float:
    """``|other - reference| / |reference|`` (Frobenius norms, in float32); inf when shapes or inf/nan differ."""
    if reference.shape != other.shape:
        return float("inf")
    a, b = reference.detach().float(), other.detach().float()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return float("inf")
    diff = (a[finite] - b[finite]).norm()
    return float(diff / a[finite].norm().clamp_min(1e-12))


def _main_output(out: Any) -> Tensor | None:
    """The tensor to compare: a transformers output's ``logits``, else the first tensor."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, dict):
        return first_tensor(list(out.values()))
    return first_tensor(out)


@dataclass
class _Held:
    """An eligible layer while it is being decided: its dense weight, and its mask if it had one."""

    name: str
    module: nn.Linear
    dense: nn.Parameter
    mask: Tensor | None
    record: SemiStructuredLayer
    sparse: nn.Parameter | None = None


def _bake(name: str, module: nn.Linear, record: SemiStructuredLayer) -> _Held:
    """Make a masked layer's weight a plain dense ``Parameter`` (same object), keeping its mask to put back."""
    mask = get_mask(module)
    if mask is not None:
        unparametrize_(module, "weight", mask)
    return _Held(name, module, module.weight, mask, record)


def _restore(held: _Held) -> None:
    """Put the dense weight (the very ``Parameter`` it had) and its mask back."""
    module = held.module
    module._parameters["weight"] = held.dense
    if held.mask is not None:
        set_mask_(module, held.mask)
    if SWAPPED_ATTR in vars(module):
        delattr(module, SWAPPED_ATTR)


def _swap(held: _Held) -> None:
    if held.sparse is None:
        raise AssertionError(f"{held.name} has no sparse weight to swap in")
    held.module._parameters["weight"] = held.sparse
    setattr(held.module, SWAPPED_ATTR, {"requires_grad": held.dense.requires_grad, "mask": None})


def _candidates(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None
                ) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(module, name)):
            yield name, module


def _capture(model: nn.Module, layers: list[tuple[str, nn.Linear]], inputs: Any
             ) -> tuple[Any, dict[str, torch.Size]]:
    """One forward on ``inputs``: the model's output and the input shape of each layer's first call."""
    seen: dict[str, torch.Size] = {}
    handles = []
    for name, module in layers:
        def hook(_m: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            x = first_tensor(args, kwargs)
            if x is not None and name not in seen:
                seen[name] = x.shape
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def semi_structured_(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tokens: int | None = None,
    also_tokens: Sequence[int] = (),
    min_speedup: float = 1.05,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    tolerance: float | None = None,
    rounds: int = 3,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    timer: Timer | None = None,
    to_sparse: ToSparse | None = None,
) -> SemiStructuredReport:
    """Swap 2:4-sparse Linear weights to semi-structured sparse tensors where that is measured faster, in place.

    Why measured: the sparse kernels halve the multiply-adds but add a fixed
    cost per call, so at small token counts they lose. Each eligible layer (2:4
    along its inputs, masked or baked; a dtype and shape the kernel takes; its
    weight not shared) is timed dense and sparse at its real input shape, in
    ``rounds`` interleaved rounds, and swapped only if ``dense / sparse >=
    min_speedup`` and its outputs match. With ``example_inputs`` the whole model
    is then checked: if its output moved beyond ``tolerance`` or it got slower
    at all, every swap is put back. Layers left dense keep their masks.

    A swapped model computes, but cannot be saved: call :func:`restore_dense_` first.

    Args:
        model: on a CUDA GPU of compute capability 8.0+ (else a one-line error).
        example_inputs: a real input (tensor, tuple or dict of kwargs, on the model's
            device); gives each layer's input shape and the whole-model checks.
        tokens: instead of ``example_inputs``: time every Linear at this many tokens per
            call (no whole-model checks then; each swapped layer's output is still checked).
        also_tokens: token counts per call at which a layer must not be slower either, e.g.
            ``(1,)`` for a language model that will decode one token at a time (the sparse
            kernels' fixed cost makes most layers lose there): each is timed too.
        min_speedup: the least ``dense_ms / sparse_ms`` a layer must show to be swapped.
        dtype: cast the model (and floating example inputs) to this dtype first, in place;
            cuSPARSELt takes float16 and bfloat16, CUTLASS also float32.
        backend: ``auto`` (cuSPARSELt when torch has it, else CUTLASS), ``cusparselt`` or ``cutlass``.
        tolerance: the largest relative output error taken as equal (default by dtype:
            2e-2 float16, 5e-2 bfloat16, 1e-3 float32).
        rounds: interleaved dense/sparse timing rounds per layer (each side keeps its best).
        filter_fn: ``filter_fn(module, name) -> bool`` chooses the Linear layers to consider.
        timer: ``timer(fn) -> milliseconds`` of one call (default: CUDA events, see :func:`cuda_timer`).
        to_sparse: ``to_sparse(weight) -> tensor`` to use instead of torch's kernels; the
            device check is then the caller's (tests use stand-ins on CPU).

    Returns:
        A :class:`SemiStructuredReport`: per layer the shape, tokens, dense and sparse
        milliseconds, speedup and outcome; the whole model before and after.

    Example:
        >>> import torch, secateurs
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> config = secateurs.NM(n=2, m=4, prune_output_layer=True)
        >>> _ = secateurs.prune_(model, config, example_inputs=torch.randn(8, 64))
        >>> secateurs.semi_structured_(model, torch.randn(8, 64))  # on CPU: a clear error, not a no-op
        Traceback (most recent call last):
        ...
        secateurs.errors.SecateursError: 2:4 sparse kernels need a CUDA GPU with compute capability 8.0+; ...
    """
    opts = _Options(tokens, tuple(also_tokens), min_speedup, dtype, backend, tolerance, rounds)
    if (example_inputs is None) == (tokens is None):
        raise SecateursError("pass example_inputs (a real input) or tokens (a token count per call), not "
                             + ("both" if tokens is not None else "neither"))
    layers = list(_candidates(model, filter_fn))
    if not layers:
        raise SecateursError("the model has no nn.Linear layer (that filter_fn accepts): 2:4 kernels apply to "
                             "Linear layers only")
    device = layers[0][1].weight.device
    if to_sparse is None:
        for where in sorted({module.weight.device for _, module in layers}, key=str):
            check_device(where)
    resolved = resolve_backend(opts.backend) if to_sparse is None else (
        "cusparselt" if opts.backend == "auto" else opts.backend)
    convert = to_sparse or default_to_sparse(resolved)
    time_ms = timer or (cuda_timer() if device.type == "cuda" else _wall_timer())
    if opts.dtype is not None:
        model.to(opts.dtype)
        if example_inputs is not None:
            example_inputs = map_tensors(example_inputs, lambda t: t.to(opts.dtype) if t.is_floating_point() else t)
    weight_dtype = layers[0][1].weight.dtype
    report = SemiStructuredReport(device=str(device), dtype=_name(weight_dtype),
                                  backend=resolved, min_speedup=float(opts.min_speedup))
    # CUDA events and synchronize() work on the current device: make it the model's (cuda:1 too)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.no_grad(), eval_mode(model):
        reference, seen = (None, {}) if example_inputs is None else _capture(model, layers, example_inputs)
        reference = _main_output(reference)  # only what is compared is kept (not a transformers KV cache)
        held = _eligible(model, layers, seen, opts, resolved, report)
        try:
            _decide(held, opts, convert, time_ms, report, model, example_inputs, reference)
        except BaseException:
            for h in held:
                _restore(h)
            raise
    return report


def _eligible(model: nn.Module, layers: list[tuple[str, nn.Linear]], seen: dict[str, torch.Size], opts: _Options,
              backend: str, report: SemiStructuredReport) -> list[_Held]:
    """A record for every candidate; the eligible ones baked to plain dense weights, in order."""
    from torch.sparse import SparseSemiStructuredTensor

    tied = tied_modules(model)
    fused = _fused_owned(model)
    held = []
    for name, module in layers:
        weight = module.weight
        record = SemiStructuredLayer(name=name, shape=list(weight.shape))
        report.layers.append(record)
        if opts.tokens is not None:
            record.tokens = opts.tokens
        elif name not in seen:
            record.reason = "not called on the example inputs"
            continue
        else:
            record.tokens = int(seen[name][:-1].numel())
        if SWAPPED_ATTR in vars(module) or isinstance(weight, SparseSemiStructuredTensor):
            record.reason = "already semi-structured"
            continue
        why = eligibility(weight, backend)
        if why is None and len(tied.get(weight_key(module), [])) > 1:
            why = "weight shared with another module"
        if why is None and name in fused:
            why = f"run by {fused[name]}'s fused kernel, which takes dense weights only"
        if why is None and parametrize.is_parametrized(module) and (
                get_mask(module) is None or len(module.parametrizations) != 1
                or len(module.parametrizations["weight"]) != 1):
            why = "weight has other parametrizations than a pruning mask"
        if why is not None:
            record.reason = why
            continue
        held.append(_bake(name, module, record))
    return held


def _fused_owned(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight PyTorch's fused inference kernels read directly (the fast paths of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``), with the owner's class name."""
    fused: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            fused.setdefault(prefix + "out_proj", "nn.MultiheadAttention")  # an encoder layer's names it first
        elif isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2", "self_attn.out_proj"):
                fused[prefix + child] = "nn.TransformerEncoderLayer"
    return fused


def _decide(held: list[_Held], opts: _Options, convert: ToSparse, time_ms: Timer,
            report: SemiStructuredReport, model: nn.Module, example_inputs: Any, reference: Any) -> None:
    """Time each held layer, swap the winners, check the whole model, undo if needed, put masks back."""
    for h in held:
        _measure(h, opts, convert, time_ms)
    winners = [h for h in held if h.sparse is not None]
    for h in winners:
        _swap(h)
    if example_inputs is not None:
        _check_whole(winners, opts, time_ms, report, lambda: call_model(model, example_inputs), reference)
    for h in held:
        if report.undone and h.record.swapped:
            h.record.swapped, h.record.reason = False, report.undone
        if h.record.swapped:
            _keep_mask_record(h)
        else:
            _restore(h)
        h.sparse = None
    if report.undone:
        log.info("semi-structured: %s", report.undone)


def _check_whole(winners: list[_Held], opts: _Options, time_ms: Timer, report: SemiStructuredReport,
                 whole: Callable[[], Any], reference: Tensor | None) -> None:
    """With the winners swapped in: compare the model's output, then time it dense and swapped in turns."""
    if winners:
        try:
            out = _main_output(whole())
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # NotImplementedError is a RuntimeError
            # a route the per-layer check cannot see: a fused kernel, a strided input, a subclass it rejects
            report.undone = f"undone: the model failed with the sparse weights ({type(exc).__name__}: " \
                            f"{first_line(exc)})"
            return
        tol = opts.tolerance or _TOLERANCE.get(winners[0].dense.dtype, 1e-3)
        if reference is not None and out is not None:
            report.output_error = relative_error(reference, out)
            if report.output_error > tol:
                report.undone = (f"undone: the model's output moved by {report.output_error:.2e} relative "
                                 f"(tolerance {tol:g})")
                return
    before = after = float("inf")
    for _ in range(opts.rounds):  # a weight swap is a pointer swap, so the two states can take turns
        for h in winners:
            h.module._parameters["weight"] = h.dense
        before = min(before, time_ms(whole))
        if winners:
            for h in winners:
                _swap(h)
            after = min(after, time_ms(whole))
    report.model_ms_before = before
    if winners:
        report.model_ms_after = after
        if after > before:
            report.undone = f"undone: the whole model got slower ({before:.3f} ms -> {after:.3f} ms)"


def _measure(h: _Held, opts: _Options, convert: ToSparse, time_ms: Timer) -> None:
    """Time one layer dense and sparse; keep its sparse weight in ``h.sparse`` only if it wins and matches
    (by ``min_speedup`` at its own token count, and not slower at any of ``also_tokens``)."""
    weight, rec = h.dense, h.record
    try:
        sparse = convert(weight.detach())
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        rec.reason = f"the kernel refused it: {first_line(exc)}"
        return
    timed = {}
    for tokens in dict.fromkeys([rec.tokens or 1, *opts.also_tokens]):
        timed[tokens] = _time_both(weight, sparse, h.module.bias, tokens, opts, time_ms)
        if isinstance(timed[tokens], str):
            rec.reason = timed[tokens]
            return
    rec.dense_ms, rec.sparse_ms = timed[rec.tokens or 1]
    rec.also = {t: timed[t][0] / timed[t][1] for t in opts.also_tokens}
    speedup = rec.dense_ms / rec.sparse_ms
    if speedup < opts.min_speedup:
        rec.reason = (f"slower: measured {speedup:.2f}x" if speedup < 1
                      else f"not fast enough: measured {speedup:.2f}x < {opts.min_speedup:g}x")
        return
    losing = [t for t, ratio in rec.also.items() if ratio < 1]
    if losing:
        rec.reason = f"slower at {losing[0]} token{'s' if losing[0] > 1 else ''} per call: measured " \
                     f"{rec.also[losing[0]]:.2f}x"
        return
    h.sparse, rec.swapped, rec.reason = nn.Parameter(sparse, requires_grad=False), True, ""


def _time_both(weight: Tensor, sparse: Tensor, bias: Tensor | None, tokens: int, opts: _Options,
               time_ms: Timer) -> tuple[float, float] | str:
    """``(dense_ms, sparse_ms)`` of one layer at ``tokens`` per call, once the sparse output is checked
    against the dense one; or why the sparse kernel cannot stand in for it there."""
    x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
    try:
        dense_out = F.linear(x, weight, bias)
        sparse_out = F.linear(x, sparse, bias)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return f"the sparse kernel failed at {tokens} tokens per call: {first_line(exc)}"
    error = relative_error(dense_out, sparse_out)
    tol = opts.tolerance or _TOLERANCE.get(weight.dtype, 1e-3)
    if error > tol:
        return f"sparse output differs ({error:.2e} relative, tolerance {tol:g})"
    dense_ms = sparse_ms = float("inf")
    for _ in range(opts.rounds):  # interleaved, each keeps its best round: drift hits both alike
        dense_ms = min(dense_ms, time_ms(lambda: F.linear(x, weight, bias)))
        sparse_ms = min(sparse_ms, time_ms(lambda: F.linear(x, sparse, bias)))
    return dense_ms, max(sparse_ms, 1e-9)


def _keep_mask_record(h: _Held) -> None:
    """On a kept swap, remember the layer's mask (bit-packed, on CPU) so :func:`restore_dense_` can put it back."""
    if h.mask is not None:
        vars(h.module)[SWAPPED_ATTR]["mask"] = (pack_bits(h.mask), list(h.mask.shape))


def _swapped_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, parameter name)`` of each semi-structured parameter (or one we swapped in)."""
    from torch.sparse import SparseSemiStructuredTensor

    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(p, SparseSemiStructuredTensor) or (pname == "weight" and SWAPPED_ATTR in vars(module)):
                yield mod_name, module, pname


def semi_structured_names(model: nn.Module) -> list[str]:
    """Names of the parameters that are semi-structured sparse tensors (or were swapped by :func:`semi_structured_`)."""
    return [f"{mod_name}.{pname}" if mod_name else pname for mod_name, _, pname in _swapped_parameters(model)]


def refuse_semi_structured(model: nn.Module, action: str = "save") -> None:
    """Raise a one-line error when ``model`` holds semi-structured weights, which ``action`` cannot handle."""
    names = semi_structured_names(model)
    if names:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise SecateursError(f"cannot {action} '{names[0]}'{more}: a 2:4 semi-structured sparse tensor "
                             "(secateurs.semi_structured_); call secateurs.restore_dense_(model) first, which "
                             "puts the same weights back as dense tensors with their masks")


def _dense_of(weight: Tensor) -> Tensor:
    from torch.sparse import SparseSemiStructuredTensor

    if isinstance(weight, SparseSemiStructuredTensor):
        return weight.to_dense()
    return weight.detach().as_subclass(Tensor).clone()


def restore_dense_(model: nn.Module) -> list[str]:
    """Turn every weight swapped by :func:`semi_structured_` back into a dense ``Parameter``, in place.

    Why: safetensors (and ``secateurs.save``) store plain tensors only, and
    training needs dense weights. The values are the same 2:4 weights; a layer
    that was masked before the swap gets its mask back. A semi-structured weight
    set by hand is made dense too (without gradients). Returns the parameter names.

    Example:
        >>> import torch, secateurs
        >>> secateurs.restore_dense_(torch.nn.Linear(4, 4))  # nothing was swapped
        []
    """
    restored = []
    for mod_name, module, pname in list(_swapped_parameters(model)):
        info = vars(module).pop(SWAPPED_ATTR, None) if pname == "weight" else None
        dense = _dense_of(module._parameters[pname])
        module._parameters[pname] = nn.Parameter(dense, requires_grad=bool(info and info["requires_grad"]))
        if info is not None and info["mask"] is not None:
            bits, shape = info["mask"]
            set_mask_(module, unpack_bits(bits, shape).to(dense.device), pname)
        restored.append(f"{mod_name}.{pname}" if mod_name else pname)
    return restored
