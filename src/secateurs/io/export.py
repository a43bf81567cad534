"""Export a (pruned) model for deployment: ONNX, TorchScript or a torch.export archive.

Every export is checked, not assumed: the written file is loaded back with
the runtime that will run it (onnxruntime, ``torch.jit.load``,
``torch.export.load``) and its outputs are compared with the eager model's on
the example inputs. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..masks import finalize_
from ..selection import call_model
from ..surgery.fold import fold_batchnorm_
from ..utils import eval_mode, first_line, first_tensor
from .arch import require
from .atomic import clean_stale, finish_file, make_temp_dir, output_lock

if TYPE_CHECKING:
    from .quantize import Int8Config

__all__ = ["EXPORT_FORMATS", "ExportResult", "analyze_exported", "export_model", "exported_input_dtype",
           "exported_input_shape", "run_exported"]

EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how closely the file reproduces the model."""

    path: str
    format: str
    size_bytes: int
    max_abs_diff: float
    tolerance: float
    folded: list[tuple[str, str]] = field(default_factory=list)
    half: bool = False
    int8: dict[str, Any] | None = None  # Int8Report.to_dict() of an int8 ONNX file

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size_bytes": self.size_bytes,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "folded_batchnorms": len(self.folded), "half": self.half,
                **({"int8": self.int8} if self.int8 is not None else {})}


def _inputs_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, dict):
        raise SecateursError("export takes positional tensor inputs; models called with keyword inputs "
                             "(transformers) export with their own tools (optimum)")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _write(model: nn.Module, inputs: tuple[Any, ...], fmt: str, path: Path) -> None:
    if fmt == "onnx":
        require("onnx", "onnx")
        names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
        torch.onnx.export(model, inputs, str(path), input_names=names, output_names=["output"],
                          dynamic_axes={n: {0: "batch"} for n in [*names, "output"]}, dynamo=False)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # "deprecated": the user asked for TorchScript by name
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, inputs, check_trace=False)
            buffer = io.BytesIO()  # C++ aborts the process when the disk is full: let Python write the bytes
            torch.jit.save(traced, buffer)
        path.write_bytes(buffer.getvalue())
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        shapes = tuple({0: batch} if isinstance(t, Tensor) and t.dim() > 0 else None for t in inputs)
        program = torch.export.export(model, inputs, dynamic_shapes=shapes)
        torch.export.save(program, str(path))


class _Exported:
    """An exported file opened in its own runtime: ``run(inputs)``, stored ``params``, ``input_dtype``."""

    def __init__(self, path: Path, *, trust_pickle: bool, device: torch.device | None = None) -> None:
        self.path = path
        suffix = path.suffix
        if suffix not in EXPORT_FORMATS.values():
            raise SecateursError(f"unknown export file type '{suffix}': expected one of "
                                 f"{', '.join(EXPORT_FORMATS.values())}")
        if not path.is_file():
            raise SecateursError(f"exported file '{path}' does not exist: check the path")
        if suffix != ".onnx" and not trust_pickle:
            raise SecateursError(f"loading '{path.name}' unpickles a whole model, which can run code: "
                                 "pass --trust-pickle (trust_pickle=True) if you trust the file")
        kind = {".onnx": "an ONNX", ".ts": "a TorchScript", ".pt2": "a torch.export"}[suffix]
        try:
            if suffix != ".onnx" and not zipfile.is_zipfile(path):  # (torch.export.load would log a traceback)
                raise ValueError("not a zip archive")
            self._open(suffix, device or torch.device("cpu"))
        except SecateursError:
            raise
        except Exception as exc:
            raise SecateursError(f"cannot read '{path}' as {kind} file ({first_line(exc)}): "
                                 "is it complete, and written by secateurs export?") from None

    def _open(self, suffix: str, device: torch.device) -> None:
        if suffix == ".onnx":
            onnx = require("onnx", "onnx")
            from onnx import numpy_helper

            ort = require("onnxruntime", "onnx")
            graph = onnx.load(str(self.path)).graph
            self.params = sum(int(numpy_helper.to_array(i).size) for i in graph.initializer)
            initializers = {i.name for i in graph.initializer}
            inputs = [i for i in graph.input if i.name not in initializers]
            half = bool(inputs) and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
            self.input_dtype = torch.float16 if half else torch.float32
            self.input_shape = ([d.dim_value if d.HasField("dim_value") else 1  # a symbolic batch becomes 1
                                 for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else None)
            session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

            def run(inputs: tuple[Any, ...]) -> Tensor:
                feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
                return torch.from_numpy(session.run(None, feeds)[0])
        else:
            self.input_shape = None
            if suffix == ".ts":
                module = torch.jit.load(str(self.path), map_location=device)
            else:
                program = torch.export.load(str(self.path))
                args, _ = getattr(program, "example_inputs", None) or ((), {})
                if len(args) == 1 and isinstance(args[0], Tensor):
                    self.input_shape = list(args[0].shape)
                module = program.module().to(device)
            state = module.state_dict()
            self.params = sum(t.numel() for t in state.values())
            first = next(iter(state.values()), None)
            self.input_dtype = torch.float16 if first is not None and first.dtype == torch.float16 else torch.float32

            def run(inputs: tuple[Any, ...]) -> Tensor:
                with torch.no_grad():
                    return first_tensor(module(*inputs))
        self.run = run


def run_exported(path: str | os.PathLike[str], inputs: tuple[Any, ...], *, trust_pickle: bool = False) -> Tensor:
    """Run an exported file on ``inputs`` with its own runtime; returns the first output.

    TorchScript and ``torch.export`` files unpickle a whole model: they need ``trust_pickle``.
    """
    device = next((t.device for t in inputs if isinstance(t, Tensor)), torch.device("cpu"))
    return _Exported(Path(path), trust_pickle=trust_pickle, device=device).run(inputs)


def export_model(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    fold_bn: bool = False,
    half: bool = False,
    overwrite: bool = False,
    int8: Int8Config | None = None,
    data: Sequence[Any] | None = None,
    held_out: Sequence[Any] | None = None,
) -> ExportResult:
    """Export ``model`` (not modified) to ``path`` and check the file against it.

    Args:
        model: the model; masks are baked in on a copy first.
        example_inputs: a tensor or tuple of tensors (the batch dimension is exported as dynamic).
        path: the output file; its suffix must match the format (``.onnx``, ``.ts``, ``.pt2``).
        format: ``onnx``, ``torchscript`` or ``pt2`` (``torch.export``).
        fold_bn: fold BatchNorm into the preceding conv/Linear first.
        half: store weights in float16 (inputs are then float16 too). Float16
            files are checked on a CUDA GPU when there is one, otherwise by running
            the float16 model's graph in float32 on CPU.
        overwrite: replace an existing file.
        int8: ONNX only: quantize the checked float file statically to int8 (see
            :class:`secateurs.io.quantize.Int8Config`) and keep it only if it agrees with the
            float file on ``held_out``; the float file is not kept.
        data: with ``int8``: calibration batches (tensors or ``(x, y)`` pairs) at the input shape.
        held_out: with ``int8``: batches for the check, none of them in ``data``
            (:func:`secateurs.io.quantize.int8_batches` makes both from one ``--data`` spec).

    Returns:
        An :class:`ExportResult` with the largest absolute difference found (and the int8 check).
    """
    if format not in EXPORT_FORMATS:
        raise SecateursError(f"unknown export format '{format}': choose one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    if path.suffix != EXPORT_FORMATS[format]:
        raise SecateursError(f"--out for {format} must end in {EXPORT_FORMATS[format]}, got '{path.name}'")
    if path.exists() and (path.is_dir() or not overwrite):
        raise SecateursError(f"'{path}' exists: choose another --out or pass --overwrite")
    if not path.parent.is_dir():
        raise SecateursError(f"directory '{path.parent}' does not exist: create it first")
    quantize = _int8_step(int8, format, half, data, held_out)
    inputs = _inputs_tuple(example_inputs)
    if any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in inputs):
        # a batch of one would be specialised to a constant by the tracers: export (and check) with two
        inputs = tuple(t.expand(2, *t.shape[1:]).clone() if isinstance(t, Tensor) and t.dim() > 0 else t
                       for t in inputs)
    work = finalize_(copy.deepcopy(model)).eval()
    try:
        with torch.no_grad():
            reference = first_tensor(call_model(work, inputs)).float().cpu()
    except SecateursError:
        raise
    except Exception as exc:  # the model's own code on inputs it does not take: one line, not a traceback
        raise SecateursError(f"the model's forward failed on the example inputs ({type(exc).__name__}: "
                             f"{first_line(exc)}): check the example inputs (--input-shape)") from None
    folded = fold_batchnorm_(work, inputs) if fold_bn else []
    device = torch.device("cuda") if half and torch.cuda.is_available() else torch.device("cpu")
    if half:
        work = work.half().to(device)
        inputs = tuple(t.half().to(device) if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)
    # the file is written under its own name in a private folder beside the target (a torch.export
    # archive names its top folder after the file), then renamed into place
    with output_lock(path):
        clean_stale(path)
        try:
            staging = make_temp_dir(path)
        except OSError as exc:
            raise SecateursError(f"cannot write to '{path.parent}' ({first_line(exc)}): choose a writable --out") from None
        return _write_checked(work, inputs, format, path, staging, reference, folded=folded, half=half,
                              quantize=quantize)


def _int8_step(int8: Int8Config | None, format: str, half: bool, data: Sequence[Any] | None,
               held_out: Sequence[Any] | None) -> Callable[[Path, Path], dict[str, Any]] | None:
    """The int8 pass to run on the checked float file, refused before any export work when it cannot run."""
    if int8 is None:
        if data is not None or held_out is not None:
            raise SecateursError("data= and held_out= calibrate an int8 export: also pass int8=Int8Config()")
        return None
    if format != "onnx":
        raise SecateursError(f"int8 quantization runs in onnxruntime: use --format onnx, not {format}")
    if half:
        raise SecateursError("--int8 and --half both shrink the weights: choose one")
    if not data or not held_out:
        raise SecateursError("int8 quantization needs calibration and held-out images: pass --data digits, mnist5k "
                             "or imagefolder:PATH (library: data= and held_out=)")
    from .quantize import quantize_onnx_file

    return lambda src, dst: quantize_onnx_file(src, dst, data, held_out, int8).to_dict()


def _write_checked(work: nn.Module, inputs: tuple[Any, ...], format: str, path: Path, staging: Path,
                   reference: Tensor, *, folded: list[Any], half: bool,
                   quantize: Callable[[Path, Path], dict[str, Any]] | None = None) -> ExportResult:
    """Write the file in ``staging``, run it, compare with ``reference``, then move it to ``path``.

    With ``quantize``, the checked float file is quantized beside it, and the int8 file is moved instead."""
    tmp = staging / path.name
    int8 = None
    try:
        with torch.no_grad(), eval_mode(work):
            try:
                _write(work, inputs, format, tmp)
            except (SecateursError, OSError):
                raise
            except Exception as exc:
                raise SecateursError(f"{format} export failed ({first_line(exc)}): try another --format") from None
        try:
            got = run_exported(tmp, inputs, trust_pickle=True).float().cpu()  # the file just written
        except Exception as exc:
            raise SecateursError(f"the exported {format} file does not run ({first_line(exc)}): "
                                 "try another --format") from None
        diff = float((got - reference).abs().max())
        scale = float(reference.abs().max().clamp_min(1e-6))
        tolerance = (2e-2 if half else 1e-4) * scale
        if not diff <= tolerance:
            raise SecateursError(f"the exported {format} file's outputs differ from the model's by {diff:.3g} "
                                 f"(tolerance {tolerance:.3g}): do not deploy it; try without --half/--fold-bn")
        if quantize is not None:
            quantized = staging / f"int8-{path.name}"
            int8 = quantize(tmp, quantized)
            tmp = quantized
        finish_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise SecateursError(f"cannot write '{path}' ({first_line(exc)}): check the free disk space, "
                             "or choose another --out") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(path=str(path), format=format, size_bytes=path.stat().st_size, max_abs_diff=diff,
                        tolerance=tolerance, folded=folded, half=half, int8=int8)


def exported_input_dtype(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> torch.dtype:
    """float16 for a ``--half`` export, else float32 (read from the ONNX graph or the weights)."""
    return _Exported(Path(path), trust_pickle=trust_pickle).input_dtype


def exported_input_shape(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> list[int] | None:
    """The input shape the file records (ONNX: its declared input, a symbolic batch becoming 1;
    ``torch.export``: its example inputs); None for TorchScript or several inputs."""
    return _Exported(Path(path), trust_pickle=trust_pickle).input_shape


def analyze_exported(path: str | os.PathLike[str], inputs: tuple[Any, ...] | None = None, *, repeats: int = 20,
                     trust_pickle: bool = False, seed: int = 0) -> dict[str, Any]:
    """File size, stored parameters and median latency of an exported file in its own runtime.

    ``inputs`` default to random ones of the shape the file records (TorchScript files need them),
    in the file's own dtype. TorchScript and ``torch.export`` files need ``trust_pickle``.
    """
    import statistics
    import time

    path = Path(path)
    exported = _Exported(path, trust_pickle=trust_pickle)
    if inputs is None:
        shape = exported.input_shape
        if shape is None:
            raise SecateursError(f"'{path.name}' does not record its input shape: pass --input-shape")
        inputs = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)
    inputs = tuple(t.to(exported.input_dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                   for t in inputs)
    params = exported.params
    run = lambda: exported.run(inputs)  # noqa: E731
    times = []
    with torch.no_grad():
        try:
            for _ in range(3):
                run()
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1000)
        except Exception as exc:
            raise SecateursError(f"'{path}' does not run on inputs of shape "
                                 f"{[list(t.shape) for t in inputs]} ({first_line(exc)}): pass --input-shape") from None
    return {"path": str(path), "format": path.suffix.lstrip("."), "size_bytes": path.stat().st_size,
            "params": params, "latency_ms": statistics.median(times), "input_shape": list(inputs[0].shape)}
