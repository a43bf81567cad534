"""Checkpoint names and model names: transformers' weight conversions, one tensor at a time.

transformers 5 loads some checkpoints into parameters of other names and shapes: a mixture of experts
stored with one matrix per expert (``block_sparse_moe.experts.3.w1.weight``) becomes one 3-D
``mlp.experts.gate_up_proj``. ``from_pretrained`` applies the model's conversion mapping as it loads,
and ``save_pretrained`` reverts it, so a saved folder has the checkpoint's names again. Streaming reads
and writes the shards itself, so it applies the same mapping, transformers' own, per tensor:

* :class:`ConvertedFolder` shows a folder under the model's names: reading a model tensor reads its
  checkpoint tensors and converts them (only that tensor's sources are in memory);
* :class:`Reverter` splits a model tensor into the checkpoint tensors ``save_pretrained`` would write.

A folder whose names are the model's own (most models) is left as it is: no conversion is involved.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..utils import first_line
from .shards import SafetensorsFolder, TensorInfo

__all__ = ["ConvertedFolder", "Reverter", "converted_folder"]


def _conversions(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """The model's weight renamings and converters, as ``from_pretrained`` uses them (none: not transformers')."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    try:
        mapping = get_model_conversion_mapping(model)
    except (AttributeError, TypeError, ValueError):  # not a transformers model
        return [], []
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)])


class ConvertedFolder:
    """The tensors of ``folder`` under ``model``'s names (see the module's docstring).

    Attributes:
        tensors: model name -> :class:`TensorInfo` (dtype and shape as the model holds it; the file of its
            first checkpoint tensor, so that an output can keep the input's files).
        sources: model name -> the checkpoint tensors it is made of.
    """

    def __init__(self, folder: SafetensorsFolder, model: nn.Module, renamings: list[Any], converters: list[Any],
                 meta: dict[str, Tensor]) -> None:
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        self.folder, self.model = folder, model
        prefix = getattr(model, "base_model_prefix", None)
        self._converter_of = {p: c for c in converters for p in c.source_patterns}
        self.sources: dict[str, list[tuple[str, str | None]]] = {}
        for key in sorted(folder.tensors, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if name not in meta:  # unknown to the model: kept under its own name (and refused as such later)
                name, pattern = key, None
            self.sources.setdefault(name, []).append((key, pattern))
        self.tensors: dict[str, TensorInfo] = {}
        for name, parts in self.sources.items():
            first = folder.tensors[parts[0][0]]
            if parts[0][1] is None and len(parts) == 1:
                self.tensors[name] = first
            else:
                shape = tuple(meta[name].shape)
                size = math.prod(shape) * first.dtype.itemsize
                self.tensors[name] = TensorInfo(first.file, first.dtype, shape, 0, size)

    @property
    def nbytes(self) -> int:
        return self.folder.nbytes

    def read(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """Model tensor ``name``, made from its checkpoint tensors, on ``device``."""
        parts = self.sources[name]
        if len(parts) == 1 and parts[0][1] is None:
            return self.folder.read(parts[0][0], device)
        converter = copy.deepcopy(self._converter_of[parts[0][1]])
        for key, pattern in parts:
            converter.add_tensor(name, key, pattern, self.folder.read(key, device))
        try:
            made = converter.convert(name, model=self.model, config=self.model.config)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise SecateursError(f"cannot build {name!r} from the folder's {len(parts)} tensors "
                                 f"({first_line(exc)}): check the folder") from None
        tensor = made[name]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        info = self.tensors[name]
        if tuple(tensor.shape) != info.shape:
            raise SecateursError(f"the folder's tensors make {name!r} of shape {tuple(tensor.shape)}, but its config "
                                 f"builds {info.shape}: the folder's files do not match its config")
        return tensor


def converted_folder(folder: SafetensorsFolder, model: nn.Module) -> SafetensorsFolder | ConvertedFolder:
    """``folder`` under ``model``'s names: itself when every name is the model's already."""
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return folder
    meta = model.state_dict()  # the skeleton's: names and shapes, no data
    if all(key in meta for key in folder.tensors):
        return folder
    converted = ConvertedFolder(folder, model, renamings, converters, meta)
    return converted if any(name not in folder.tensors for name in converted.tensors) else folder


class Reverter:
    """Model tensors back under the checkpoint's names, split as ``save_pretrained`` writes them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def split(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        """The checkpoint tensors of model tensor ``name`` (a meta tensor gives their names and shapes)."""
        from transformers.core_model_loading import revert_weight_conversion

        try:
            parts = revert_weight_conversion(self.model, {name: tensor})
        except (RuntimeError, ValueError, IndexError) as exc:
            raise SecateursError(f"cannot write {name!r} under the checkpoint's names ({first_line(exc)}): prune "
                                 "in memory (--no-stream)") from None
        return {key: value.contiguous() for key, value in parts.items()}

    def infos(self, name: str, info: TensorInfo) -> dict[str, TensorInfo]:
        """Where the checkpoint tensors of ``name`` go: the model tensor's file, their own shapes."""
        parts = self.split(name, torch.empty(info.shape, dtype=info.dtype, device="meta"))
        return {key: TensorInfo(info.file, info.dtype, tuple(part.shape), 0, part.numel() * info.dtype.itemsize)
                for key, part in parts.items()}
