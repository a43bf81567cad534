"""Prune, then quantize: transformers folders in the compressed-tensors format (what vLLM serves).

A pruned transformers model is saved with its Linear weights quantized to integers,
weight-only and symmetric (``int8`` per output channel, ``int4`` in groups along the
input), by the ``compressed-tensors`` library: it computes the scales, packs the
integers and writes the ``quantization_config`` block of ``config.json``, exactly as
llm-compressor does. Stock ``transformers`` (with ``compressed-tensors`` installed)
loads such a folder and decompresses it to dense weights, on CPU too; vLLM runs it.

Symmetric quantization has no zero point, so a pruned weight (exactly 0) stays
exactly 0 after dequantization: the sparsity survives quantization.

Why there is no sparse-only compressed-tensors output: compressed-tensors 0.15 removed
its sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``), llm-compressor 0.11
stopped writing them, vLLM 0.19 refuses checkpoints that declare them, and transformers
reads compressed-tensors folders only with compressed-tensors 0.15 or later. A
folder in those formats would load nowhere current, so a pruned model that is not
quantized is saved as a plain transformers folder (or secateurs' own bitmask layout,
which is smaller on disk) instead.

Layout of a saved directory: ``config.json`` (with ``quantization_config``),
``generation_config.json``, safetensors shards holding ``weight_packed`` /
``weight_scale`` / ``weight_shape`` per quantized Linear and plain tensors for the rest,
and ``secateurs.json`` (layout ``compressed-tensors``): the history, and which weights
carry masks. :func:`secateurs.load` dequantizes and restores the masks from the zeros.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SecateursError
from ..masks import effective_state_dict, finalize_
from ..selection import stacked_weight_names
from ..surgery.hf import config_misfits
from ..utils import first_line, is_transformers_model
from .arch import attach_source, require
from .atomic import PARTIAL, atomic_dir
from .hf import check_hf_sizes, hf_class, hf_stored_elements, quiet_transformers
from .manifest import finish_transformers_folder, manifest_fields
from .policy import offline

__all__ = ["LAYOUT", "QUANTIZE_SCHEMES", "Quantization", "check_compressed", "load_compressed", "save_compressed"]

LAYOUT = "compressed-tensors"
QUANTIZE_SCHEMES = {"int8": 8, "int4": 4}  # weight-only, symmetric; the bits per weight
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128}  # None: one scale per output channel
EXTRA = "compressed"  # pip install 'secateurs[compressed]'
NO_SPARSE_FORMAT = ("compressed-tensors has no sparse-only format any more (0.15 removed it; transformers and vLLM "
                    "no longer read it), so the pruned weights must be quantized: add --quantize int8 or int4 "
                    "(quantize='int8'), or save with --save-format transformers (or secateurs, smaller on disk)")


@dataclass(frozen=True)
class Quantization:
    """Weight-only integer quantization of every Linear layer but the output head.

    Args:
        scheme: ``int8`` (8-bit weights) or ``int4`` (4-bit weights, packed 8 to an int32).
        group_size: inputs that share one scale. ``None``: ``int8`` gets one scale per output
            channel, ``int4`` groups of 128. Must divide every quantized layer's input size.

    Example:
        >>> Quantization("int4", group_size=64).bits
        4
    """

    scheme: str = "int8"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in QUANTIZE_SCHEMES:
            raise SecateursError(f"unknown quantization '{str(self.scheme)[:40]}': choose one of "
                                 f"{', '.join(QUANTIZE_SCHEMES)} (--quantize)")
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size < 1):
            raise SecateursError(f"group size {str(self.group_size)[:40]} is not a positive whole number: "
                                 "pass e.g. --group-size 128, or leave it out")
        if self.group_size is None and DEFAULT_GROUP_SIZE[self.scheme] is not None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.scheme])

    @property
    def bits(self) -> int:
        return QUANTIZE_SCHEMES[self.scheme]

    def weight_args(self) -> Any:
        """compressed-tensors' ``QuantizationArgs`` for the weights."""
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=True, dynamic=False,
                                strategy="channel" if self.group_size is None else "group",
                                group_size=self.group_size)


def _as_quantization(quantize: str | Quantization | None, group_size: int | None) -> Quantization | None:
    if quantize is None:
        if group_size is not None:
            raise SecateursError("--group-size sets the quantization groups: also pass --quantize int4 or int8")
        return None
    if isinstance(quantize, Quantization):
        if group_size is not None and group_size != quantize.group_size:
            raise SecateursError("pass the group size once: in Quantization(group_size=...) or as group_size")
        return quantize
    return Quantization(quantize, group_size)


def _require_library() -> Any:
    require("transformers", "hf")
    return require("compressed_tensors", EXTRA)


def check_compressed(model: nn.Module, layout: str, quantize: str | Quantization | None = None,
                     group_size: int | None = None) -> Quantization | None:
    """Refuse, before any slow work, a compressed-tensors request that cannot be met whatever pruning does;
    return the quantization asked for (``None`` for none).

    ``quantize`` is only valid with ``layout='compressed-tensors'``, which only transformers
    models can have and which needs ``quantize`` (see the module's docstring for why).
    """
    quantization = _as_quantization(quantize, group_size)
    if layout != LAYOUT:
        if quantization is not None:
            raise SecateursError("--quantize writes compressed-tensors' quantized format: add --save-format "
                                 "compressed-tensors (layout='compressed-tensors')")
        return None
    if not is_transformers_model(model):
        raise SecateursError(f"{type(model).__name__} is not a transformers model, and compressed-tensors folders "
                             "are transformers folders: save it with --save-format secateurs")
    if quantization is None:
        raise SecateursError(NO_SPARSE_FORMAT)
    stacks = stacked_weight_names(model)
    if stacks:
        raise SecateursError(f"'{stacks[0]}' is a fused 3-D weight holding every expert's matrix ({len(stacks)} such "
                             "weights in the model): compressed-tensors quantizes experts only as separate Linear "
                             "layers, and stock transformers cannot load a compressed-tensors folder whose experts "
                             "stay unquantized: save it with --save-format transformers")
    _require_library()
    _quantized_layers(model, quantization)
    return quantization


def _quantized_layers(model: nn.Module, quantization: Quantization) -> dict[str, nn.Linear]:
    """The Linear layers to quantize (all but the output head), by name; refuses layers that compute
    like a Linear but are another type (compressed-tensors would leave them in floating point), and
    group sizes that do not divide a layer's inputs."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            raise SecateursError(f"layer '{name}' is a transformers Conv1D, which compressed-tensors cannot quantize "
                                 "(it quantizes nn.Linear): save this model with --save-format transformers")
        if isinstance(module, nn.Linear) and module is not head:
            layers[name] = module
    if not layers:
        raise SecateursError(f"{type(model).__name__} has no Linear layer besides its output head, so there is "
                             "nothing to quantize: save it with --save-format transformers")
    group = quantization.group_size
    if group is not None:
        odd = {name: m.in_features for name, m in layers.items() if m.in_features % group}
        if odd:
            name, width = next(iter(odd.items()))
            widths = {m.in_features for m in layers.values()}
            fits = [g for g in (256, 128, 64, 32, 16, 8) if g < group and all(w % g == 0 for w in widths)]
            hint = f"--group-size {fits[0]} fits every layer" if fits else "leave --quantize int8 per channel"
            raise SecateursError(f"layer '{name}' has {width} inputs, not a multiple of the group size {group} "
                                 f"(vLLM needs whole groups): {hint}")
    return layers


def _compress_copy(model: nn.Module, quantization: Quantization) -> tuple[nn.Module, Any]:
    """A copy of ``model`` with its masks baked in and its Linear weights quantized and packed by
    compressed-tensors; and the library's compressor that writes the config."""
    _require_library()
    from compressed_tensors import ModelCompressor
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    work = finalize_(copy.deepcopy(model))  # the caller's model keeps its masks and float weights
    layers = _quantized_layers(work, quantization)
    args = quantization.weight_args()
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=[name for name, m in work.named_modules()
                                        if isinstance(m, nn.Linear) and name not in layers])
    try:
        apply_quantization_config(work, config, show_progress=False)
        with torch.no_grad():
            for name, layer in layers.items():
                weight = layer.weight
                # per output channel, or per group of `group_size` inputs: the range the scale must cover
                view = weight if quantization.group_size is None else \
                    weight.unflatten(-1, (-1, quantization.group_size))
                low = view.amin(-1, keepdim=quantization.group_size is None)
                high = view.amax(-1, keepdim=quantization.group_size is None)
                scale, zero_point = calculate_qparams(low, high, args)
                layer.weight_scale.copy_(scale)
                layer.weight_zero_point.copy_(zero_point)
                # 0 quantizes to the zero point and dequantizes to (q - zero_point) * scale: exactly 0 when the
                # zero point is 0, which symmetric quantization promises; a library that broke it would unprune
                if bool(zero_point.any()):
                    raise SecateursError(f"compressed-tensors gave '{name}' a nonzero zero point, which would make "
                                         "pruned weights nonzero: this is a bug, please report it")
                layer.quantization_status = QuantizationStatus.FROZEN
        compressor = ModelCompressor.from_pretrained_model(work)
        for layer in layers.values():
            compress_module(layer)
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    except SecateursError:
        raise
    except (ValueError, RuntimeError, TypeError) as exc:  # the library's refusals (pydantic, shapes)
        raise SecateursError(f"compressed-tensors cannot quantize this model ({first_line(exc)}): "
                             "save it with --save-format transformers") from None
    return work, compressor


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    quantize: str | Quantization = "int8",
    *,
    group_size: int | None = None,
    report: dict[str, Any] | None = None,
    input_shape: list[int] | tuple[int, ...] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
) -> int:
    """Write a pruned transformers model as a quantized compressed-tensors folder; return the weights' bytes.

    Quantizing after pruning keeps the pruned weights at exactly zero (symmetric
    quantization), and a quantized folder is what vLLM and stock transformers read:
    4x (int8) to 8x (int4) smaller Linear weights than float32. The model itself is
    not changed. Written atomically; the manifest lets :func:`secateurs.load` restore
    the masks. :func:`secateurs.save` with ``layout='compressed-tensors'`` calls this.

    Args:
        model: a (pruned, possibly masked) transformers model whose config describes its shapes.
        path: target directory; a non-empty one is refused unless ``overwrite``.
        quantize: ``int8`` or ``int4`` (or a :class:`Quantization`).
        group_size: inputs per scale (see :class:`Quantization`).
        report: a pruning report to append to the model's history.
        input_shape: example input shape to record.
        overwrite: replace a non-empty ``path``.
        extra_files: more files (a tokenizer, a report) written in the same atomic step; a callable
            value is called with the weights' size in bytes.
        max_shard_size: the largest weights file, in bytes or as ``"5GB"``.

    Returns:
        The size of the safetensors files in bytes.

    Example:
        >>> import tempfile, torch, transformers, secateurs
        >>> from secateurs.io.compressed import save_compressed
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> _ = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5), example_inputs=torch.zeros(1, 4).long())
        >>> size = save_compressed(model, tempfile.mkdtemp(), "int4", group_size=32, overwrite=True)
    """
    quantization = check_compressed(model, LAYOUT, quantize, group_size)
    assert quantization is not None
    misfit = config_misfits(model)
    if misfit:
        raise SecateursError(f"the model's config does not describe its pruned shapes (a config rebuilds {misfit}), "
                             "so no compressed-tensors reader could load it: prune with widths every layer shares, "
                             "or save with --save-format secateurs")
    state, masks = effective_state_dict(model)
    tensors = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "format": "dense",
                      "masked": name in masks} for name, t in state.items()}
    work, compressor = _compress_copy(model, quantization)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        try:
            with quiet_transformers():
                type(work).save_pretrained(work, str(tmp), **options)
            compressor.update_config(str(tmp))  # the library writes its own quantization_config block
        except (OSError, ValueError, RuntimeError) as exc:
            raise SecateursError(f"cannot write the compressed-tensors folder '{path}' ({first_line(exc)}): check "
                                 "the free disk space and --max-shard-size") from None
        written = sorted(p.name for p in tmp.iterdir() if p.name != PARTIAL)
        size = sum((tmp / name).stat().st_size for name in written if name.endswith(".safetensors"))
        finish_transformers_folder(tmp, model, manifest=manifest_fields(model, report, input_shape),
                                   tensors=tensors, kept_zeros={}, written=written, extra_files=extra_files or {},
                                   size=size, layout=LAYOUT, fields={"quantization": asdict(quantization)})
    return size


def _quantization_block(path: Path) -> dict[str, Any]:
    """The ``quantization_config`` of a folder's config.json, checked to be compressed-tensors'."""
    try:
        block = json.loads((path / "config.json").read_bytes()).get("quantization_config")
    except (OSError, ValueError, AttributeError) as exc:
        raise SecateursError(f"cannot read '{path / 'config.json'}' ({first_line(exc)}): re-save the model") from None
    if not isinstance(block, dict) or block.get("quant_method") != "compressed-tensors":
        raise SecateursError(f"'{path}' is not a compressed-tensors folder (its config.json has no compressed-tensors "
                             "quantization_config): re-save the model")
    return block


def _min_bits(block: dict[str, Any]) -> int:
    """The fewest bits any weight is stored in (how many weights one stored element may hold)."""
    bits = [group.get("weights", {}).get("num_bits") for group in (block.get("config_groups") or {}).values()
            if isinstance(group, dict) and isinstance(group.get("weights"), dict)]
    bits = [b for b in bits if type(b) is int and 1 <= b <= 32]
    return min(bits, default=32)


def load_compressed(path: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Load a compressed-tensors folder as a dense model (weights dequantized), with transformers' own
    compressed-tensors support, after the checks :func:`secateurs.load_model` gives any transformers folder.

    The result is a plain transformers model in the folder's dtype: saving it again writes
    dense weights (no ``quantization_config``).
    """
    _require_library()
    import transformers

    folder = Path(path)
    cls = hf_class(transformers, folder, trust_code)
    block = _quantization_block(folder)
    try:
        with quiet_transformers(), offline():
            if not trust_code:
                # one stored int32 holds up to 32 / bits packed weights
                stored = hf_stored_elements(folder) * max(1, 32 // _min_bits(block))
                config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
                check_hf_sizes(transformers, cls, config, stored, f"the folder '{folder}'")
            with warnings.catch_warnings():  # "the folder's quantization_config is used": only dequantize=True is ours
                warnings.simplefilter("ignore", UserWarning)
                model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                            quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    except SecateursError:
        raise
    except Exception as exc:  # transformers and compressed-tensors raise many types for damaged folders
        raise SecateursError(f"cannot load the compressed-tensors folder '{folder}' ({first_line(exc)}): check "
                             "that its files are complete") from None
    # dequantized on load: drop the marks that would make transformers save it as quantized again
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return attach_source(model.eval(), {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()})

