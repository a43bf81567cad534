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

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..masks import effective_state_dict, mask_tied_
from ..surgery import STRUCTURE_ATTR
from ..utils import first_line
from .arch import attach_source, build_pruned, check_rebuildable, source_of
from .atomic import atomic_dir
from .inputs import INPUT_ATTR

__all__ = ["MANIFEST", "WEIGHTS", "save", "load", "read_manifest", "pack_state", "unpack_state",
           "is_saved_model", "serialized_size"]

MANIFEST = "secateurs.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
HISTORY_ATTR = "_secateurs_history"

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, shape: list[int]) -> Tensor:
    numel = 1
    for s in shape:
        numel *= s
    unpacked = (bits.unsqueeze(1) & _BIT_WEIGHTS).ne(0).reshape(-1)
    return unpacked[:numel].reshape(shape)


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


WEIGHTS_METADATA = {"format": "pt"}  # the safetensors header's metadata (what transformers expects)


def serialized_size(model: nn.Module) -> int:
    """Bytes the model's weights take in a secateurs save (without writing a file)."""
    from safetensors.torch import save as st_save

    state, masks = effective_state_dict(model)
    tensors, _, _ = pack_state(state, masks)
    return len(st_save(tensors, metadata=WEIGHTS_METADATA))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


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
) -> int:
    """Save ``model`` to directory ``path`` without pickle; return the weights' size in bytes.

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
        compact: store sparse tensors as bitmask + values when that is smaller.

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

    source = source_of(model, arch)
    check_rebuildable(model, source)
    state, masks = effective_state_dict(model)
    tensors, layout, aliases = pack_state(state, masks, compact=compact)
    history = list(getattr(model, HISTORY_ATTR, []))
    if report is not None:
        history.append(report)
    recorded_input = getattr(model, INPUT_ATTR, None)
    manifest = {
        "format": "secateurs",
        "format_version": FORMAT_VERSION,
        "secateurs_version": _version(),
        "torch_version": torch.__version__,
        "source": source,
        "structure": list(getattr(model, STRUCTURE_ATTR, [])),
        "input": {"shape": list(input_shape)} if input_shape is not None else recorded_input,
        "weights": WEIGHTS,
        "tensors": layout,
        "aliases": aliases,
        "history": history,
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=WEIGHTS_METADATA)
        (tmp / MANIFEST).write_text(json.dumps(_jsonable(manifest), indent=2))
        size = (tmp / WEIGHTS).stat().st_size
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data(size) if callable(data) else data)
    return size


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("secateurs")
    except PackageNotFoundError:
        return "unknown"


def is_saved_model(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a saved model's manifest."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise SecateursError(f"'{path}' is not a secateurs model directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SecateursError(f"{mpath} is not valid JSON ({first_line(exc)}): re-save the model") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "secateurs"
        or not isinstance(manifest.get("tensors"), dict)
        or not isinstance(manifest.get("source"), dict)
        or not isinstance(manifest.get("aliases", {}), dict)
        or not isinstance(manifest.get("format_version"), int)
    ):
        raise SecateursError(f"{mpath} is not a valid secateurs manifest: re-save the model")
    if manifest["format_version"] > FORMAT_VERSION:
        raise SecateursError(
            f"{path} was saved by a newer secateurs (format {manifest['format_version']}): upgrade secateurs"
        )
    return manifest


def load(path: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save`, without unpickling anything.

    The architecture is rebuilt from the manifest, weights come from
    safetensors, tied weights are tied again and live masks are re-applied.

    Args:
        path: the saved directory.
        trust_code: allow the manifest to name a factory *function* (rather
            than an ``nn.Module`` class) to rebuild the model. Only for folders
            you trust: the function is imported and called.

    Returns:
        The model, in eval mode.
    """
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    wpath = Path(path) / str(manifest.get("weights", WEIGHTS))
    if not wpath.is_file():
        raise SecateursError(f"weights file {wpath} is missing: re-save the model")
    try:
        tensors = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise SecateursError(
            f"weights file {wpath} is corrupt or truncated ({first_line(exc)}): re-save the model"
        ) from None
    try:
        state, masks = unpack_state(tensors, manifest["tensors"], manifest.get("aliases", {}))
    except (KeyError, TypeError, RuntimeError) as exc:
        raise SecateursError(
            f"weights file {wpath} does not match its manifest ({first_line(exc)}): re-save the model"
        ) from None
    structure = manifest.get("structure", [])
    if not isinstance(structure, list):
        raise SecateursError(f"the manifest in {path} has a malformed structure list: re-save the model")
    model = build_pruned(manifest["source"], structure, trust_code=trust_code)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise SecateursError(
            f"saved weights do not fit the rebuilt architecture (they differ at {diff[:3]}): "
            "the architecture's code changed since saving"
        )
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, manifest.get("aliases", {}))
    for name, mask in masks.items():
        mod_name, _, tname = name.rpartition(".")
        mask_tied_(model, model.get_submodule(mod_name), mask, tname)
    attach_source(model, manifest["source"])
    setattr(model, HISTORY_ATTR, manifest.get("history", []))
    if manifest.get("input"):
        setattr(model, INPUT_ATTR, manifest["input"])
    return model.eval()


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make aliased parameters one ``Parameter`` again (``assign=True`` split them)."""
    for alias, target in aliases.items():
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        shared = getattr(model.get_submodule(t_mod), t_name)
        if isinstance(shared, nn.Parameter):
            setattr(model.get_submodule(a_mod), a_name, shared)
