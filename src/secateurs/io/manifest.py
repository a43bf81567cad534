"""The files secateurs writes beside a model's weights: the manifest and its shared fields.

Both save paths use these pieces: :mod:`.checkpoint` (secateurs' own layout and plain
transformers folders) and :mod:`.compressed` (quantized compressed-tensors folders), as does
streaming pruning (:mod:`secateurs.methods.stream`), which writes transformers folders shard by
shard. Reading and checking a manifest stays in :mod:`.checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..masks import pack_bits
from .atomic import PARTIAL
from .inputs import INPUT_ATTR
from .policy import is_plain_file_name

__all__ = ["FORMAT_VERSION", "HISTORY_ATTR", "KEPT_ZEROS", "MANIFEST", "WEIGHTS", "WEIGHTS_METADATA",
           "finish_transformers_folder", "jsonable", "manifest_fields", "package_version",
           "transformers_tensor_record", "write_extra_files"]

MANIFEST = "secateurs.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 1: secateurs layout; 2 adds the transformers layout (older secateurs cannot read it)
# transformers layout: where kept weights that are exactly zero are marked (their masks cannot come from zeros)
KEPT_ZEROS = "secateurs-kept-zeros.safetensors"
HISTORY_ATTR = "_secateurs_history"
WEIGHTS_METADATA = {"format": "pt"}  # the safetensors header's metadata (what transformers expects)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (anything JSON cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(obj, default=str))


def package_version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("secateurs")
    except PackageNotFoundError:
        from ..version import __version__

        return __version__


def write_extra_files(tmp: Path, extra_files: dict[str, Any] | None, size: int, keep: set[str] = frozenset()) -> None:
    """Write ``extra_files`` (names relative to the folder, ``/`` between parts) into ``tmp``; names in
    ``keep`` are already written and stay (a tokenizer's config must not replace the model's)."""
    for fname, data in (extra_files or {}).items():
        parts = fname.split("/")
        if not all(is_plain_file_name(part) for part in parts):
            raise SecateursError(f"extra file name {fname[:80]!r} leaves the model folder: use a relative path")
        if parts[0] in (MANIFEST, PARTIAL, KEPT_ZEROS):
            raise SecateursError(f"extra file name {fname[:80]!r} is secateurs' own: choose another name")
        if fname in keep:
            continue
        target = tmp.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data(size) if callable(data) else data)


def manifest_fields(model: nn.Module, report: dict[str, Any] | None, input_shape: Any) -> dict[str, Any]:
    """The manifest fields both layouts share: versions, the example input, the history with ``report``."""
    recorded_input = getattr(model, INPUT_ATTR, None)
    return {
        "format": "secateurs",
        "format_version": FORMAT_VERSION,
        "secateurs_version": package_version(),
        "torch_version": torch.__version__,
        "input": {"shape": list(input_shape)} if input_shape is not None else recorded_input,
        "history": [*getattr(model, HISTORY_ATTR, []), *([report] if report is not None else [])],
    }


def transformers_tensor_record(name: str, tensor: Tensor, mask: Tensor | None,
                               kept_zeros: dict[str, Tensor]) -> dict[str, Any]:
    """The manifest entry of one tensor of a transformers folder; a masked tensor's kept weights that are
    exactly zero go into ``kept_zeros`` (packed bits), since its mask comes back from its zeros."""
    record = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "format": "dense",
              "masked": mask is not None}
    if mask is not None and "::" not in name:
        extra = mask.cpu() & (tensor.detach().cpu() == 0)
        if bool(extra.any()):
            kept_zeros[name] = pack_bits(extra)
            record["kept_zeros"] = True
    return record


def finish_transformers_folder(tmp: Path, model: nn.Module, *, manifest: dict[str, Any],
                               tensors: dict[str, Any], kept_zeros: dict[str, Tensor], written: list[str],
                               extra_files: dict[str, Any], size: int, layout: str = "transformers",
                               fields: dict[str, Any] | None = None) -> None:
    """Add secateurs' files to a transformers folder being written in ``tmp`` (the weights, config and
    ``written`` files already there): the kept-zeros file, the manifest (of ``layout``, with more
    ``fields``), then ``extra_files``."""
    written = list(written)
    if kept_zeros:
        from safetensors.torch import save_file

        save_file(kept_zeros, str(tmp / KEPT_ZEROS), metadata=WEIGHTS_METADATA)
        written.append(KEPT_ZEROS)
    manifest = manifest | {
        "layout": layout,
        "source": {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()},
        "structure": [],  # the config describes the pruned shapes
        "weights": [name for name in written if name.endswith(".safetensors") and name != KEPT_ZEROS],
        "tensors": tensors,
        "aliases": {},
        **(fields or {}),
        "files": sorted({*written, MANIFEST, *extra_files}),
    }
    (tmp / MANIFEST).write_text(json.dumps(jsonable(manifest), indent=2))
    write_extra_files(tmp, extra_files, size, keep=set(written))
