"""Save and load pruned models as safetensors + a JSON manifest, never pickle.

Layout of a saved directory::

    secateurs.json      manifest: how to rebuild the architecture, tensor layout,
                        masks, example input, pruning history
    model.safetensors   the tensors; sparse ones as a packed bitmask + kept values

A tensor whose zeros make the bitmask form smaller than the dense form is
stored compactly, so an 80%-sparse model really takes about a quarter of the
disk. Masked tensors (live masks from unstructured / N:M pruning) always use
the bitmask form and get their masks back on load, so fine-tuning after a
reload still keeps pruned weights at zero.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..masks import (
    bake_on_save_pretrained,
    effective_state_dict,
    mask_tied_,
    pack_bits,
    unpack_bits,
)
from ..semi_structured import refuse_semi_structured
from ..surgery import STRUCTURE_ATTR, Plan
from ..surgery.hf import config_misfits
from ..utils import first_line, is_transformers_model
from .arch import BuildError, attach_source, build_pruned, check_rebuildable, describe, source_of
from .atomic import PARTIAL, atomic_dir
from .compressed import check_compressed, load_compressed, save_compressed
from .hf import load_hf, quiet_transformers
from .inputs import INPUT_ATTR, MAX_INPUT_ELEMENTS
from .manifest import (
    FORMAT_VERSION,
    HISTORY_ATTR,
    KEPT_ZEROS,
    MANIFEST,
    WEIGHTS,
    WEIGHTS_METADATA,
    finish_transformers_folder,
    jsonable,
    manifest_fields,
    transformers_tensor_record,
    write_extra_files,
)
from .policy import (
    check_depth,
    check_source,
    is_plain_file_name,
    module_budget,
    module_budget_for,
    offline,
)

__all__ = ["MANIFEST", "WEIGHTS", "check_layout", "save", "load", "read_manifest", "pack_state", "unpack_state",
           "is_saved_model", "serialized_size"]

LAYOUTS = ("auto", "transformers", "secateurs", "compressed-tensors")

log = logging.getLogger(__name__)

_COMPACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _storage_key(t: Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def pack_state(
    state: dict[str, Tensor], masks: dict[str, Tensor], *, compact: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, str]]:
    """Turn a plain state dict into safetensors-ready tensors.

    Returns ``(tensors, layout, aliases)``: ``layout`` says per name how it is
    stored; ``aliases`` maps tied names to the one stored copy.
    """
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        key = _storage_key(t)
        if key in seen and t.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu()
        entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        mask = masks.get(name)
        use_bits = mask is not None
        if not use_bits and compact and t.dtype in _COMPACT_DTYPES and t.numel() >= 64:
            nonzero = int(t.count_nonzero())
            dense_bytes = t.numel() * t.element_size()
            use_bits = nonzero * t.element_size() + (t.numel() + 7) // 8 < dense_bytes
            if use_bits:
                mask = t != 0
        if use_bits:
            assert mask is not None
            mask = mask.cpu()
            tensors[f"{name}::bits"] = pack_bits(mask)
            tensors[f"{name}::values"] = t[mask].contiguous()
            entry["format"] = "bitmask"
            entry["masked"] = name in masks
        else:
            tensors[name] = t.contiguous()
            entry["format"] = "dense"
        layout[name] = entry
    return tensors, layout, aliases


def unpack_state(
    tensors: dict[str, Tensor], layout: dict[str, Any], aliases: dict[str, str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Inverse of :func:`pack_state`: ``(state, masks)``."""
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for name, entry in layout.items():
        if entry["format"] == "dense":
            state[name] = tensors[name]
            continue
        mask = unpack_bits(tensors[f"{name}::bits"], entry["shape"])
        values = tensors[f"{name}::values"]
        if int(mask.sum()) != values.numel():
            raise SecateursError(f"tensor '{name}' is inconsistent in the weights file: re-save the model")
        full = values.new_zeros(entry["shape"])
        full[mask] = values
        state[name] = full
        if entry.get("masked"):
            masks[name] = mask
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state, masks


def serialized_size(model: nn.Module) -> int:
    """Bytes the model's weights take in a secateurs save (without writing a file)."""
    from safetensors.torch import save as st_save

    state, masks = effective_state_dict(model)
    tensors, _, _ = pack_state(state, masks)
    return len(st_save(tensors, metadata=WEIGHTS_METADATA))


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    input_shape: list[int] | tuple[int, ...] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, bytes | Callable[[int], bytes]] | None = None,
    compact: bool = True,
    layout: str = "auto",
    max_shard_size: int | str | None = None,
    transformers_files: dict[str, bytes] | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
) -> int:
    """Save ``model`` to directory ``path`` without pickle; return the weights' size in bytes.

    A transformers model whose config describes its (pruned) shapes is written
    as a standard transformers folder: ``config.json``, ``generation_config.json``
    and safetensors shards (with ``model.safetensors.index.json`` when there are
    several) in the model's own dtype, masks baked in, so stock
    ``from_pretrained`` loads it without secateurs. The manifest (``secateurs.json``,
    with the pruning history and which weights carry masks) sits beside it;
    :func:`load` restores the masks from it. Any other model, or ``layout="secateurs"``,
    gets secateurs' own layout: one safetensors file whose sparse tensors are
    stored as a bitmask plus the kept values (smaller on disk).

    Args:
        model: the (possibly pruned, possibly masked) model. It is not modified.
        path: target directory; written atomically. A non-empty existing one is
            refused unless ``overwrite``.
        arch: how to rebuild the architecture (``torchvision:NAME``, ``timm:NAME``,
            ``package.module:factory``); needed only when secateurs did not load
            the model and cannot work it out.
        report: a pruning report dict to append to the model's history.
        input_shape: example input shape to record (used by later commands).
        extra_files: more files to write into the directory in the same atomic step;
            a callable value is called with the weights' size in bytes.
        compact: store sparse tensors as bitmask + values when that is smaller
            (secateurs layout).
        layout: ``auto`` (transformers for transformers models whose config fits,
            secateurs otherwise), ``transformers`` (refused when the config cannot
            describe the model) or ``secateurs``.
        max_shard_size: the largest weights file of a transformers folder, in bytes
            or as ``"5GB"`` (default: transformers' own).
        transformers_files: like ``extra_files``, written only when the folder is a
            transformers folder (files that describe it to other tools, such as
            sentence-transformers' ``modules.json``).
        quantize: ``int8`` or ``int4``: with ``layout="compressed-tensors"``, a transformers folder
            whose Linear weights compressed-tensors quantized (see :mod:`secateurs.io.compressed`).
        group_size: inputs per quantization scale (default: per channel for int8, 128 for int4).

    Example:
        >>> import tempfile, torch, secateurs
        >>> from secateurs.zoo import DigitsCNN
        >>> model = DigitsCNN()
        >>> d = tempfile.mkdtemp()
        >>> _ = secateurs.save(model, d, overwrite=True)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> torch.allclose(secateurs.load(d)(x), model.eval()(x), atol=1e-6)
        True
    """
    from safetensors.torch import save_file

    refuse_semi_structured(model, "save")  # safetensors stores plain tensors only
    if layout == "compressed-tensors" or quantize is not None:
        check_layout(model, layout, quantize, group_size)
        return save_compressed(model, path, quantize or "int8", group_size=group_size, report=report,
                               input_shape=input_shape, overwrite=overwrite, max_shard_size=max_shard_size,
                               extra_files={**(extra_files or {}), **(transformers_files or {})})
    if _chosen_layout(model, layout) == "transformers":
        return _save_transformers(model, path, manifest=manifest_fields(model, report, input_shape), overwrite=overwrite,
                                  extra_files={**(extra_files or {}), **(transformers_files or {})},
                                  max_shard_size=max_shard_size)
    source = source_of(model, arch)
    check_rebuildable(model, source)
    state, masks = effective_state_dict(model)
    tensors, layout, aliases = pack_state(state, masks, compact=compact)
    manifest = manifest_fields(model, report, input_shape) | {
        "format_version": 1,
        "layout": "secateurs",
        "source": source,
        "structure": list(getattr(model, STRUCTURE_ATTR, [])),
        "weights": WEIGHTS,
        "tensors": layout,
        "aliases": aliases,
        "files": sorted({WEIGHTS, MANIFEST, *(extra_files or {})}),  # what --overwrite may replace
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata=WEIGHTS_METADATA)
        except Exception as exc:  # safetensors reports a full disk as its own SafetensorError
            raise SecateursError(f"cannot write the weights to '{path}' ({first_line(exc)}): "
                                 "check the free disk space, or choose another --out") from None
        (tmp / MANIFEST).write_text(json.dumps(jsonable(manifest), indent=2))
        size = (tmp / WEIGHTS).stat().st_size
        write_extra_files(tmp, extra_files, size)
    return size


def _restore_record(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """What a loaded model gets back from its manifest besides weights: history, example input, a
    ``save_pretrained`` that keeps its masks; in eval mode."""
    bake_on_save_pretrained(model)
    setattr(model, HISTORY_ATTR, manifest.get("history", []))
    if manifest.get("input"):
        setattr(model, INPUT_ATTR, manifest["input"])
    return model.eval()


def check_layout(model: nn.Module, layout: str, quantize: str | None = None, group_size: int | None = None) -> None:
    """Refuse a ``layout`` (and quantization) for :func:`save` that cannot apply to ``model`` whatever pruning
    does to it."""
    if layout not in LAYOUTS:
        raise SecateursError(f"unknown layout '{layout}': choose one of {', '.join(LAYOUTS)}")
    if layout == "compressed-tensors" or quantize is not None or group_size is not None:
        check_compressed(model, layout, quantize, group_size)
    if layout == "transformers" and not is_transformers_model(model):
        raise SecateursError(f"{type(model).__name__} is not a transformers model: save it with layout='secateurs' "
                             "(CLI: --save-format secateurs)")


def _chosen_layout(model: nn.Module, layout: str) -> str:
    """``transformers`` or ``secateurs``: what :func:`save` writes for ``layout`` (see there), saying why
    when a transformers model cannot be a transformers folder."""
    check_layout(model, layout)
    if layout == "secateurs" or not is_transformers_model(model):
        return "secateurs"
    misfit = config_misfits(model)
    if not misfit:
        return "transformers"
    why = (f"the model's config does not describe its pruned shapes (a config rebuilds {misfit}), so stock "
           "from_pretrained could not load it")
    if layout == "transformers":
        raise SecateursError(f"{why}: prune with widths every layer shares (the default for transformers models), "
                             "or save with layout='secateurs' (CLI: --save-format secateurs) and load with secateurs")
    log.warning("%s: saving in secateurs' own layout, which secateurs.load reads (prune with widths every layer "
                "shares for a transformers folder)", why)
    return "secateurs"


def _save_transformers(model: nn.Module, path: str | os.PathLike[str], *, manifest: dict[str, Any],
                       overwrite: bool, extra_files: dict[str, Any], max_shard_size: int | str | None) -> int:
    """A standard transformers folder with the manifest (its shared fields given) beside it (see :func:`save`)."""
    state, masks = effective_state_dict(model)
    kept_zeros: dict[str, Tensor] = {}
    tensors = {name: transformers_tensor_record(name, t, masks.get(name), kept_zeros) for name, t in state.items()}
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        try:
            with quiet_transformers():
                # the class's own method: an instance-level one (masks.bake_on_save_pretrained) adds nothing here
                type(model).save_pretrained(model, str(tmp), state_dict=dict(state), **options)
        except (OSError, ValueError, RuntimeError) as exc:  # a full disk; a shard size transformers rejects
            raise SecateursError(f"cannot write the transformers folder '{path}' ({first_line(exc)}): check the "
                                 "free disk space and --max-shard-size") from None
        written = sorted(p.name for p in tmp.iterdir() if p.name != PARTIAL)
        size = sum((tmp / name).stat().st_size for name in written if name.endswith(".safetensors"))
        finish_transformers_folder(tmp, model, manifest=manifest, tensors=tensors, kept_zeros=kept_zeros,
                                   written=written, extra_files=extra_files, size=size)
    return size


def is_saved_model(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


MAX_MANIFEST_BYTES = 64 * 2**20  # histories of large models take a few MB
_INPUT_KINDS = (None, "float", "tokens")


def _regular_file(folder: Path, name: Any, what: str) -> Path:
    """``folder/name``, refusing anything but a plain file name of a regular file inside ``folder``."""
    if not is_plain_file_name(name):
        raise SecateursError(f"the manifest in '{folder}' names the {what} {str(name)[:80]!r}, which is not a file "
                             "name inside the folder: re-save the model")
    path = folder / name
    if path.is_symlink():
        raise SecateursError(f"the {what} '{path}' is a symlink: copy the real file into the folder "
                             "(a model folder must not read files outside itself)")
    if not path.is_file():
        raise SecateursError(f"{what} '{path}' is missing: re-save the model")
    return path


def _check_manifest(manifest: Any, mpath: Path) -> None:
    check_depth(manifest)
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "secateurs"
        or not isinstance(manifest.get("tensors"), dict)
        or not isinstance(manifest.get("source"), dict)
        or not isinstance(manifest.get("aliases", {}), dict)
        or not isinstance(manifest.get("structure", []), list)
        or not isinstance(manifest.get("history", []), list)
        or type(manifest.get("format_version")) is not int
    ):
        raise SecateursError(f"{mpath} is not a valid secateurs manifest: re-save the model")
    if manifest["format_version"] > FORMAT_VERSION:
        raise SecateursError(
            f"{mpath.parent} was saved by a newer secateurs (format {manifest['format_version']}): upgrade secateurs"
        )
    if manifest.get("layout", "secateurs") not in ("secateurs", "transformers", "compressed-tensors"):
        raise SecateursError(f"{mpath} names an unknown layout {str(manifest.get('layout'))[:40]!r}: upgrade "
                             "secateurs, or re-save the model")
    for name, entry in manifest["tensors"].items():
        if not (
            isinstance(entry, dict)
            and entry.get("format") in ("dense", "bitmask")
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in entry["shape"])
        ):
            raise SecateursError(f"{mpath} describes tensor {name[:80]!r} wrongly: re-save the model")
    if not all(isinstance(k, str) and isinstance(v, str) and v in manifest["tensors"]
               for k, v in manifest.get("aliases", {}).items()):
        raise SecateursError(f"{mpath} has aliases to tensors it does not store: re-save the model")
    check_input_record(manifest.get("input"), f"{mpath}: ")


def check_input_record(record: Any, where: str = "") -> None:
    """Refuse a recorded example input that is not ``{"shape": [positive ints], "kind": float|tokens}``."""
    if record is None:
        return
    shape = record.get("shape") if isinstance(record, dict) else None
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(d) is int and d > 0 for d in shape)
        or math.prod(shape) > MAX_INPUT_ELEMENTS
        or record.get("kind") not in _INPUT_KINDS
    ):
        raise SecateursError(f"{where}the recorded example input {str(record)[:80]} is not a shape of positive "
                             f"sizes (at most {MAX_INPUT_ELEMENTS} elements) of kind float or tokens: "
                             "re-save the model, or pass --input-shape")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a saved model's manifest (bounded in size and depth; every field typed)."""
    folder = Path(path)
    mpath = folder / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise SecateursError(f"'{path}' is not a secateurs model directory (no {MANIFEST})")
    mpath = _regular_file(folder, MANIFEST, "manifest")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise SecateursError(f"{mpath} is {size / 2**20:.0f} MiB, more than any secateurs manifest "
                             f"({MAX_MANIFEST_BYTES // 2**20} MiB): it was not written by secateurs")
    try:
        manifest = json.loads(mpath.read_bytes())
    except ValueError as exc:  # bad JSON, bad UTF-8, an integer of thousands of digits
        raise SecateursError(f"{mpath} is not valid JSON ({first_line(exc)}): re-save the model") from None
    except RecursionError:
        raise SecateursError(f"{mpath} is nested too deeply to be a secateurs manifest: re-save the model") from None
    _check_manifest(manifest, mpath)
    return manifest


def _expected_tensors(layout: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """What the weights file must hold, by name: ``(dtype, shape)``."""
    want: dict[str, tuple[str, list[int]]] = {}
    for name, entry in layout.items():
        if entry["format"] == "dense":
            want[name] = (entry["dtype"], entry["shape"])
        else:
            want[f"{name}::bits"] = ("uint8", [(math.prod(entry["shape"]) + 7) // 8])
            want[f"{name}::values"] = (entry["dtype"], [-1])  # as many as the mask keeps
    return want


def _read_weights(wpath: Path, layout: dict[str, Any]) -> dict[str, Tensor]:
    """The weights file's tensors, after checking its header against the manifest (nothing read before)."""
    from safetensors import safe_open

    want = _expected_tensors(layout)
    try:
        with safe_open(str(wpath), framework="pt") as f:
            names = set(f.keys())
            if names != set(want):
                odd = sorted(names ^ set(want))[:2]
                raise SecateursError(f"weights file {wpath} does not match its manifest (differs at {odd}): "
                                     "re-save the model")
            for name, (dtype, shape) in want.items():
                info = f.get_slice(name)
                got_dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype())
                got_shape = list(info.get_shape())
                if got_dtype != dtype or (shape != got_shape and not (shape == [-1] and len(got_shape) == 1)):
                    raise SecateursError(
                        f"tensor '{name}' in {wpath} is {got_dtype} {got_shape}, but the manifest says {dtype} "
                        f"{shape}: the file was changed after saving; re-save the model")
            return {name: f.get_tensor(name) for name in want}
    except SecateursError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise SecateursError(
            f"weights file {wpath} is corrupt or truncated ({first_line(exc)}): re-save the model"
        ) from None


# safetensors' header names -> torch's
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                       "U64": "uint64"}


def _signature(state: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Shape and whether it holds floating-point numbers, per tensor name."""
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}


def _meta_signature(source: dict[str, Any], plans: list[Plan], trust_code: bool) -> dict[str, Any]:
    """The rebuilt architecture's tensors, from a build on the meta device (no memory spent)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a check of ours: the constructor's warnings come with the real build
        model = build_pruned(source, plans, trust_code=trust_code)
    return _signature(model.state_dict())


def load(path: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save`, without unpickling anything.

    The folder is treated as data: the manifest is checked, the architecture it
    names must be one :mod:`secateurs.io.policy` allows (or ``trust_code``), it is
    first built on the meta device and compared with the weights file, and only
    then built for real. Weights come from safetensors, tied weights are tied
    again and live masks are re-applied.

    Args:
        path: the saved directory.
        trust_code: allow the manifest to name any factory (a function or a class
            outside secateurs' zoo, torchvision, timm and transformers) and any
            constructor keywords. Only for folders you trust: the code is imported
            and called.

    Returns:
        The model, in eval mode.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest.get("layout") in ("transformers", "compressed-tensors"):
        return _load_transformers(folder, manifest, trust_code)
    layout = manifest["tensors"]
    wpath = _regular_file(folder, manifest.get("weights", WEIGHTS), "weights file")
    plans = [plan for plan in map(Plan.from_dict, manifest.get("structure", [])) if not plan.is_empty()]
    stored = {k: (tuple(e["shape"]), e["dtype"] in _FLOAT_NAMES) for k, e in layout.items()}
    expected = stored | {k: stored[v] for k, v in manifest.get("aliases", {}).items()}
    source = manifest["source"]
    check_source(source, trust_code=trust_code)  # before anything is imported

    def budget() -> contextlib.AbstractContextManager[None]:  # per build: each counts its own modules
        if trust_code:
            return contextlib.nullcontext()
        return module_budget(module_budget_for(len(layout)), f"the model folder '{folder}'")

    with contextlib.nullcontext() if trust_code else offline():
        try:
            with budget():
                rebuilt = _meta_signature(source, plans, trust_code)
        except SecateursError as exc:
            if not isinstance(exc, BuildError):
                raise
            rebuilt = _unchecked(source, trust_code, exc)
        except Exception as exc:
            rebuilt = _unchecked(source, trust_code, exc)
        if rebuilt is not None:
            _mismatch(rebuilt, expected)
        tensors = _read_weights(wpath, layout)
        try:
            state, masks = unpack_state(tensors, layout, manifest.get("aliases", {}))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise SecateursError(
                f"weights file {wpath} does not match its manifest ({first_line(exc)}): re-save the model"
            ) from None
        with budget():
            model = build_pruned(source, plans, trust_code=trust_code)
    if rebuilt is None:
        _mismatch(_signature(model.state_dict()), expected)
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, manifest.get("aliases", {}))
    for name, mask in masks.items():
        mod_name, _, tname = name.rpartition(".")
        mask_tied_(model, model.get_submodule(mod_name), mask, tname)
    attach_source(model, manifest["source"])
    return _restore_record(model, manifest)


def _load_transformers(folder: Path, manifest: dict[str, Any], trust_code: bool) -> nn.Module:
    """A transformers folder written by :func:`save`: loaded as transformers loads it (with the same checks
    as any transformers folder), then the manifest's masks, history and example input are restored."""
    if manifest.get("layout") == "compressed-tensors":  # dequantized on load; masks from its zeros
        model = load_compressed(folder, trust_code=trust_code)
    else:
        model = load_hf(folder, trust_code=trust_code)
    state, _ = effective_state_dict(model)
    recorded = manifest["tensors"]
    have = {k: list(v.shape) for k, v in state.items()}
    want = {k: e["shape"] for k, e in recorded.items()}
    if have != want:
        diff = sorted(set(have) ^ set(want)) or [k for k in have if have[k] != want[k]]
        log.warning("the weights in '%s' were changed after secateurs saved them (they differ at %s): loading them "
                    "as a plain transformers folder, without the pruning masks and history", folder, diff[:2])
        return model
    kept_zeros = _read_kept_zeros(folder, recorded)
    with torch.no_grad():
        for name, entry in recorded.items():
            if entry.get("masked") is True:
                mask = state[name] != 0
                if name in kept_zeros:
                    mask |= kept_zeros[name].to(mask.device)
                mod_name, _, tname = name.rpartition(".")
                mask_tied_(model, model.get_submodule(mod_name), mask, tname)
    return _restore_record(model, manifest)


def _read_kept_zeros(folder: Path, recorded: dict[str, Any]) -> dict[str, Tensor]:
    """The positions of masked tensors whose kept weights are exactly zero, by name (see :func:`save`)."""
    names = [name for name, entry in recorded.items() if entry.get("kept_zeros") is True and entry.get("masked")]
    if not names:
        return {}
    layout = {name: {"format": "dense", "dtype": "uint8", "shape": [(math.prod(recorded[name]["shape"]) + 7) // 8]}
              for name in names}
    bits = _read_weights(_regular_file(folder, KEPT_ZEROS, "mask file"), layout)
    return {name: unpack_bits(bits[name], recorded[name]["shape"]) for name in names}


def _unchecked(source: dict[str, Any], trust_code: bool, exc: BaseException) -> None:
    """Some constructors cannot run on meta tensors (torchvision's RegNets): build for real, unless the
    folder chose the sizes (constructor options, a transformers config) and the user did not opt in."""
    if not trust_code and (source.get("kwargs") or source.get("kind") == "hf"):
        raise SecateursError(f"cannot check the sizes the model folder asks for before building {describe(source)} "
                             f"({first_line(exc)}): load it with trust_code=True (CLI: --trust-code) only if you "
                             "trust where it came from") from None


def _mismatch(have: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse weights whose names, shapes or kind of numbers (float or not) differ from the architecture's."""
    if have != want:
        diff = sorted(set(have) ^ set(want)) or [f"{k}: {want[k]} for {have[k]}" for k in have if have[k] != want[k]]
        raise SecateursError(
            f"saved weights do not fit the rebuilt architecture (they differ at {diff[:3]}; (shape, floating)): "
            "the architecture's code changed since saving, or the manifest was edited"
        )


_FLOAT_NAMES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make aliased parameters one ``Parameter`` again (``assign=True`` split them)."""
    for alias, target in aliases.items():
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        shared = getattr(model.get_submodule(t_mod), t_name)
        if isinstance(shared, nn.Parameter):
            setattr(model.get_submodule(a_mod), a_name, shared)
