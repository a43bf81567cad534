"""Export a (pruned) model for deployment: ONNX, TorchScript or a torch.export archive.

Every export is checked, not assumed: the written file is loaded back with
the runtime that will run it (onnxruntime, ``torch.jit.load``,
``torch.export.load``) and its outputs are compared with the eager model's on
the example inputs. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..masks import finalize_
from ..selection import call_model
from ..surgery.fold import fold_batchnorm_
from ..utils import eval_mode, first_line, first_tensor
from .arch import require

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

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size_bytes": self.size_bytes,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "folded_batchnorms": len(self.folded), "half": self.half}


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
        traced = torch.jit.trace(model, inputs, check_trace=False)
        traced.save(str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        shapes = tuple({0: batch} if isinstance(t, Tensor) and t.dim() > 0 else None for t in inputs)
        program = torch.export.export(model, inputs, dynamic_shapes=shapes)
        torch.export.save(program, str(path))


def run_exported(path: str | os.PathLike[str], inputs: tuple[Any, ...]) -> Tensor:
    """Run an exported file on ``inputs`` with its own runtime; returns the first output."""
    path = Path(path)
    suffix = path.suffix
    if suffix == ".onnx":
        ort = require("onnxruntime", "onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
        return torch.from_numpy(session.run(None, feeds)[0])
    device = next((t.device for t in inputs if isinstance(t, Tensor)), torch.device("cpu"))
    if suffix == ".ts":
        with torch.no_grad():
            return first_tensor(torch.jit.load(str(path), map_location=device)(*inputs))
    if suffix == ".pt2":
        with torch.no_grad():
            return first_tensor(torch.export.load(str(path)).module().to(device)(*inputs))
    raise SecateursError(f"unknown export file type '{suffix}': expected one of {', '.join(EXPORT_FORMATS.values())}")


def export_model(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    fold_bn: bool = False,
    half: bool = False,
    overwrite: bool = False,
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

    Returns:
        An :class:`ExportResult` with the largest absolute difference found.
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
    inputs = _inputs_tuple(example_inputs)
    if any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in inputs):
        # a batch of one would be specialised to a constant by the tracers: export (and check) with two
        inputs = tuple(t.expand(2, *t.shape[1:]).clone() if isinstance(t, Tensor) and t.dim() > 0 else t
                       for t in inputs)
    work = finalize_(copy.deepcopy(model)).eval()
    with torch.no_grad():
        reference = first_tensor(call_model(work, inputs)).float().cpu()
    folded = fold_batchnorm_(work, inputs) if fold_bn else []
    device = torch.device("cuda") if half and torch.cuda.is_available() else torch.device("cpu")
    if half:
        work = work.half().to(device)
        inputs = tuple(t.half().to(device) if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), eval_mode(work):
            try:
                _write(work, inputs, format, tmp)
            except SecateursError:
                raise
            except Exception as exc:
                raise SecateursError(f"{format} export failed ({first_line(exc)}): try another --format") from None
        try:
            got = run_exported(tmp, inputs).float().cpu()
        except Exception as exc:
            raise SecateursError(f"the exported {format} file does not run ({first_line(exc)}): "
                                 "try another --format") from None
        diff = float((got - reference).abs().max())
        scale = float(reference.abs().max().clamp_min(1e-6))
        tolerance = (2e-2 if half else 1e-4) * scale
        if not diff <= tolerance:
            raise SecateursError(f"the exported {format} file's outputs differ from the model's by {diff:.3g} "
                                 f"(tolerance {tolerance:.3g}): do not deploy it; try without --half/--fold-bn")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=str(path), format=format, size_bytes=path.stat().st_size, max_abs_diff=diff,
                        tolerance=tolerance, folded=folded, half=half)


def exported_input_dtype(path: str | os.PathLike[str]) -> torch.dtype:
    """float16 for a ``--half`` export, else float32 (read from the ONNX graph or the weights)."""
    path = Path(path)
    if path.suffix == ".onnx":
        onnx = require("onnx", "onnx")
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        half = inputs and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        return torch.float16 if half else torch.float32
    module = torch.jit.load(str(path), map_location="cpu") if path.suffix == ".ts" else \
        torch.export.load(str(path)).module()
    first = next(iter(module.state_dict().values()), None)
    return torch.float16 if first is not None and first.dtype == torch.float16 else torch.float32


def exported_input_shape(path: str | os.PathLike[str]) -> list[int] | None:
    """The input shape an ONNX file declares (a symbolic batch becomes 1); None for other formats."""
    if Path(path).suffix != ".onnx":
        return None
    onnx = require("onnx", "onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None
    return [d.dim_value if d.HasField("dim_value") else 1 for d in inputs[0].type.tensor_type.shape.dim]


def analyze_exported(path: str | os.PathLike[str], inputs: tuple[Any, ...], *, repeats: int = 20) -> dict[str, Any]:
    """File size, stored parameters and median latency of an exported file in its own runtime."""
    import statistics
    import time

    path = Path(path)
    if path.suffix == ".onnx":
        onnx = require("onnx", "onnx")
        from onnx import numpy_helper

        ort = require("onnxruntime", "onnx")
        graph = onnx.load(str(path)).graph
        params = sum(int(numpy_helper.to_array(i).size) for i in graph.initializer)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
        run = lambda: session.run(None, feeds)  # noqa: E731
    else:
        module = torch.jit.load(str(path), map_location="cpu") if path.suffix == ".ts" else \
            torch.export.load(str(path)).module()
        params = sum(t.numel() for t in module.state_dict().values())
        run = lambda: module(*inputs)  # noqa: E731
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
