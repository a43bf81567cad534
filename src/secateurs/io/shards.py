"""Read and write sharded safetensors one tensor at a time, without memory-mapping whole files.

Streaming pruning (:mod:`secateurs.methods.stream`) holds one layer of a model
at a time. Memory-mapped reads would let every page of every shard touched so
far count as the process's own memory until the file is closed, so tensors are
read with plain ``readinto`` into a fresh buffer instead. Output shards are laid
out before the first tensor is known (pruning keeps every shape and dtype), so
each tensor is written at its place as soon as it is ready, in any order, and
freed; the files are byte-for-byte the standard safetensors format.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import SecateursError
from ..utils import first_line
from .policy import is_plain_file_name

__all__ = ["INDEX", "ShardWriter", "SafetensorsFolder", "TensorInfo", "plan_shards"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HEADER_LIMIT = 100 << 20  # safetensors' own limit on a header's size

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the file's data."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The data offset and the header of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SecateursError(f"'{path}' is not a safetensors file (too short): check the folder")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_HEADER_LIMIT, size - 8):
            raise SecateursError(f"'{path}' is not a valid safetensors file (header of {length} bytes): "
                                 "the file is truncated or damaged")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise SecateursError(f"'{path}' has a damaged safetensors header: download or convert it again") from None
    if not isinstance(header, dict):
        raise SecateursError(f"'{path}' has a damaged safetensors header: download or convert it again")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            dtype = _DTYPES[entry["dtype"]]
            ok = 0 <= begin <= end <= size - 8 - length and end - begin == math.prod(shape) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SecateursError(f"'{path}' describes tensor {name!r} wrongly (dtype, shape or offsets), or the "
                                 "file is cut short: download or convert it again")
    return 8 + length, header


class SafetensorsFolder:
    """The safetensors weights of a model folder (one file, or shards with ``model.safetensors.index.json``).

    Every file the index names must exist and hold the tensors the index puts
    there; each tensor is read on its own with :meth:`read`.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise SecateursError(f"'{index}' is not a valid index (no weight_map): check the folder") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise SecateursError(f"'{index}' is not a valid index (no weight_map of file names): check the folder")
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise SecateursError(f"'{self.folder}' has no safetensors weights ({SINGLE} or {INDEX}): streaming "
                                 "reads safetensors only; convert the weights, or prune in memory (--no-stream)")
        self.tensors: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        for name in files:
            if not is_plain_file_name(name):
                raise SecateursError(f"the index of '{self.folder}' names {name[:80]!r}, which is not a file inside "
                                     "the folder: check the folder")
            path = self.folder / name
            if not path.is_file() or path.is_symlink():
                raise SecateursError(f"the weights file '{path}' is missing (the index names it): the download is "
                                     "incomplete; fetch the missing shard")
            start, header = _read_header(path)
            self._offsets[name] = start
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                self.tensors.setdefault(key, TensorInfo(name, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                                        begin, end))
        if weight_map is not None:
            for key, name in weight_map.items():
                info = self.tensors.get(key)
                if info is None or info.file != name:
                    raise SecateursError(f"the index of '{self.folder}' puts {key!r} in {name}, which does not hold "
                                         "it: the shards do not match the index; download the folder again")

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, key: str, device: torch.device | str = "cpu") -> Tensor:
        """Tensor ``key``, read into a new buffer (no memory map), then moved to ``device``."""
        info = self.tensors[key]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            with open(self.folder / info.file, "rb") as f:
                f.seek(self._offsets[info.file] + info.begin)
                if f.readinto(buffer.numpy()) != info.nbytes:
                    raise OSError("the file is shorter than its header says")
        except OSError as exc:
            raise SecateursError(f"cannot read {key!r} from '{self.folder / info.file}' ({first_line(exc)}): "
                                 "check the folder") from None
        tensor = buffer.view(info.dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape,
                                                                                            dtype=info.dtype)
        return tensor.to(device)


def plan_shards(infos: dict[str, TensorInfo], max_shard_size: int | None) -> dict[str, str]:
    """Which output file each tensor goes to: the input's own files, or new ones of at most
    ``max_shard_size`` bytes (a tensor larger than that gets a file of its own), in key order."""
    if max_shard_size is None:
        files = sorted({info.file for info in infos.values()})
        if len(files) == 1:
            return dict.fromkeys(infos, SINGLE)
        rename = {old: f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files, 1)}
        return {key: rename[info.file] for key, info in infos.items()}
    groups: list[list[str]] = [[]]
    used = 0
    for key in sorted(infos):
        size = infos[key].nbytes
        if groups[-1] and used + size > max_shard_size:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    if len(groups) == 1:
        return dict.fromkeys(groups[0], SINGLE)
    return {key: f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i, group in enumerate(groups, 1)
            for key in group}


class ShardWriter:
    """Write tensors of known names, dtypes and shapes into safetensors shards, in any order.

    Each file's header is written first, from the plan; :meth:`write` puts a
    tensor's bytes at its place. :meth:`close` checks that every planned tensor
    was written and writes the index (when there are several files).
    """

    def __init__(self, folder: str | os.PathLike[str], infos: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 files: dict[str, str], metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self._where: dict[str, tuple[str, int, int]] = {}
        self._pending = set(infos)
        self.sizes: dict[str, int] = {}
        self.tensor_bytes = 0
        by_file: dict[str, list[str]] = {}
        for key in sorted(infos):
            by_file.setdefault(files[key], []).append(key)
        self.weight_map = {key: files[key] for key in sorted(infos)}
        for name, keys in by_file.items():
            header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
            offset = 0
            for key in keys:
                dtype, shape = infos[key]
                if dtype not in _NAMES:
                    raise SecateursError(f"{key!r} has dtype {dtype}, which safetensors cannot store")
                nbytes = math.prod(shape) * dtype.itemsize
                header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            self.tensor_bytes += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
            start = 8 + len(raw)
            try:
                with open(self.folder / name, "wb") as f:
                    f.write(struct.pack("<Q", len(raw)) + raw)
                    f.truncate(start + offset)
            except OSError as exc:
                raise SecateursError(f"cannot write '{self.folder / name}' ({first_line(exc)}): check the free disk "
                                     "space, or choose another --out") from None
            self.sizes[name] = start + offset
            for key in keys:
                begin, end = header[key]["data_offsets"]
                self._where[key] = (name, start + begin, end - begin)

    def write(self, key: str, tensor: Tensor) -> None:
        """Put ``tensor`` (of the planned dtype and shape) into its file."""
        name, start, nbytes = self._where[key]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise SecateursError(f"{key!r} has {data.numel()} bytes, but {nbytes} were planned: a pruning step "
                                 "changed its shape or dtype")
        try:
            with open(self.folder / name, "r+b") as f:
                f.seek(start)
                f.write(data.numpy())
        except OSError as exc:
            raise SecateursError(f"cannot write {key!r} to '{self.folder / name}' ({first_line(exc)}): check the "
                                 "free disk space, or choose another --out") from None
        self._pending.discard(key)

    def close(self) -> list[str]:
        """The files written (the index included); every planned tensor must have been written."""
        if self._pending:
            missing = sorted(self._pending)
            raise SecateursError(f"{len(missing)} tensors were never written ({', '.join(missing[:3])}...): "
                                 "the streamed model is incomplete")
        names = sorted(self.sizes)
        for name in names:  # the folder is renamed into place next: its data must be on disk first
            with open(self.folder / name, "r+b") as f:
                os.fsync(f.fileno())
        if len(names) > 1:
            index = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": self.weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))
            names.append(INDEX)
        return names
