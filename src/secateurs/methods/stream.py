"""Prune a transformers model bigger than memory: one layer at a time, from its safetensors shards to new ones.

The model's skeleton is built on the meta device (:func:`~secateurs.io.hf.hf_skeleton`);
no weight exists until it is needed. Data-free methods (magnitude by ratio or
threshold, N:M) read, prune and write one tensor at a time. Calibrated methods
(Wanda, SparseGPT) run the calibration batches through the model up to its
first layer, materialising only the modules that run (the embeddings), then for
each layer of the model's stack: read its weights from the input shards, collect
statistics of its inputs, prune, run the *pruned* layer to produce the next
layer's inputs, write its weights into the output shards and free them. This is
the same computation, in the same order, as the in-memory path
(:mod:`secateurs.methods.oneshot`), so the result is the same. Layer pruning by
block influence walks the dense model the same way to score every layer, then
copies the layers it keeps under their new names, with the config updated. Channel
pruning by widths (every layer the same shape, a criterion that needs no data) plans
on the skeleton, reading each weight from disk when the criterion scores it, then
copies every tensor cut to its new widths, with the config updated; with
reconstruction, the dense and the pruned layer are read side by side, one layer at a
time, each fed its own model's activations, and the refitted layer is written.

Memory holds one layer, its statistics and the calibration activations (which
spill to disk beyond a budget); the output folder is a standard transformers
folder (config, sharded safetensors in the model's own dtype) with secateurs'
manifest beside it, written atomically.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..graph.blocks import repeated_blocks
from ..importance.channel import channel_importance
from ..importance.layer import block_influence
from ..importance.stats import StopForward, calibration_list, forward_may_stop, split_batch
from ..io.convert import ConvertedFolder, Reverter, converted_folder
from ..masks import finalize_, masked_tensors
from ..progress import Progress
from ..selection import Target, select_targets, stacked_weight_names
from ..surgery import Plan, apply_plan_, kept_indices
from ..surgery.layers import name_after_drop
from ..utils import (
    first_tensor,
    map_tensors,
    release_freed_memory,
    run_experts_eagerly,
    total_memory,
)
from .channels import Channels, plan_as_applied, plan_uniform_widths
from .common import config_to_dict, layer_report, make_generator
from .layers import Layers
from .nm import NM, nm_keep
from .oneshot import (
    SparseGPT,
    Wanda,
    calibration_batches,
    capture_block_inputs,
    oneshot_targets,
    prune_block,
)
from .reconstruct import advance_calls, reconstruction_targets, refit_block
from .report import LayerReport, PruneReport
from .unstructured import Unstructured, layer_keep

__all__ = ["StreamStats", "check_streamable", "prune_streaming"]

log = logging.getLogger(__name__)

_SERIAL = itertools.count()  # names of spilled activation files, unique across stores

# Files of the input folder that describe the model and stay valid after pruning in place.
_COPIED = ("config.json", "generation_config.json")


@dataclass
class StreamStats:
    """What a streamed prune read, wrote and kept in memory."""

    params: int = 0
    nonzero_params: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    layers: int = 0
    spilled_bytes: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    gpu_peak_bytes: int | None = None  # on a GPU: the most its allocator held at once (torch.cuda.max_memory_allocated)
    gpu_reserved_bytes: int | None = None  # ... and the most it reserved from the driver (max_memory_reserved)
    per_layer_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "per_layer_seconds"} | {
            "slowest_layer_seconds": max(self.per_layer_seconds, default=0.0)}


def check_streamable(config: Any) -> None:
    """Refuse, in one line, a method or option that needs the whole model at once."""
    if isinstance(config, (Wanda, SparseGPT, NM)):
        return
    if isinstance(config, Layers):
        if config.importance not in (None, "block_influence") or config.n is None:
            raise SecateursError("streaming chooses layers by block influence, a given number of them (--layers K): "
                                 "other importances and targets need the whole model; drop --stream")
        if config.include is not None or config.ignore or config.filter_fn is not None:
            raise SecateursError("streaming chooses among all of the model's layers: drop --include/--ignore, or "
                                 "--stream")
        return
    if isinstance(config, Channels):
        criterion = channel_importance(config.importance)
        if (criterion.needs_data and not criterion.forward_only) or config.scope == "global" \
                or config.allocate != "uniform" or config.include is not None or config.filter_fn is not None \
                or config.target_macs is not None or config.target_latency is not None or config.steps != 1 \
                or config.compensate or config.recalibrate_bn:
            raise SecateursError("streaming channel pruning cuts every layer to the same widths (--ratio or "
                                 "--width) by a criterion that needs no data (l1, l2, ...) or only runs forwards "
                                 "(minitron, activation), and may --reconstruct; taylor and obs, targets, global "
                                 "ranking, steps and other repairs need the whole model: drop --stream")
        return
    if isinstance(config, Unstructured):
        if config.scope == "global":
            raise SecateursError("--scope global ranks every layer's weights together, which needs the whole model "
                                 "in memory: use --scope layer with --stream, or prune in memory (--no-stream)")
        if config.allocate != "uniform":
            raise SecateursError("--allocate sensitivity measures the whole model: prune in memory (--no-stream)")
        return
    raise SecateursError(f"--method {config.method} needs the whole model in memory; streaming prunes with "
                         "wanda, sparsegpt, unstructured (per layer), nm or layer: drop --stream")


def _device(device: str | torch.device | None) -> torch.device:
    """The device to stream on: the CPU, or a CUDA GPU with its index (``cuda`` is the current one)."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:
        raise SecateursError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise SecateursError(f"--device {device}: streaming computes on cpu or cuda[:N], not on {dev.type}")
    if not torch.cuda.is_available():
        raise SecateursError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SecateursError(f"--device {device}: there are only {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    # an explicit index: tensors compare equal by device, and nothing depends on the current device
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def _check_compute(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot multiply in, before any layer is read."""
    def multiply(dt: torch.dtype) -> None:
        a = torch.ones(4, 4, dtype=dt, device=device)
        torch.nn.functional.linear(a, a)

    try:
        multiply(dtype)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        try:
            multiply(torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):  # not the dtype: the device itself is broken
            raise SecateursError(f"{device} cannot compute at all ({str(exc).splitlines()[0][:100]}): check the "
                                 "GPU and its driver (nvidia-smi), or use --device cpu") from None
        raise SecateursError(f"the weights are {str(dtype).removeprefix('torch.')}, which {device} cannot compute "
                             f"in ({str(exc).splitlines()[0][:100]}): use another --device") from None


def _check_disk(out: Path, need: int) -> None:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    need = int(need * 1.02) + (64 << 20)  # the manifest, the index and a margin
    if free < need:
        raise SecateursError(f"--out needs about {_bytes(need)} free on '{parent}', which has {_bytes(free)}: "
                             "free some space or choose another --out")


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _spill_estimate(model: nn.Module, batches: list[Any] | None, dtype: torch.dtype, budget: int) -> int:
    """Bytes of calibration activations that would go to disk: a layer's inputs and outputs beyond ``budget``."""
    hidden = getattr(model.config, "hidden_size", None)
    if not batches or not isinstance(hidden, int):
        return 0
    ids = [b.get("input_ids") if isinstance(b, dict) else first_tensor(b) for b in batches]
    tokens = sum(int(t.numel()) for t in ids if isinstance(t, Tensor))
    return max(0, 2 * tokens * hidden * dtype.itemsize - budget)


def _default_budget(device: torch.device) -> int:
    """Activations kept in memory before spilling to disk: an eighth of the machine's (or GPU's) memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 8
    memory = total_memory()
    return memory // 8 if memory else 2 << 30


def _all_finite(t: Tensor) -> bool:
    """``t.isfinite().all()`` a few million entries at a time: for a bf16 embedding table the one-shot
    check would briefly need more memory than the table itself."""
    flat = t.reshape(-1)
    return all(bool(chunk.isfinite().all()) for chunk in flat.split(1 << 22))


class _Slots:
    """Where each stored tensor lives in the skeleton, and swapping real tensors in and out of it."""

    def __init__(self, model: nn.Module, stored: dict[str, Any]) -> None:
        self.owner: dict[str, tuple[nn.Module, str, bool]] = {}
        modules = dict(model.named_modules(remove_duplicate=False))
        names: dict[str, tuple[nn.Module, str, bool]] = {}
        aliases: dict[int, str] = {}
        for full, module in modules.items():
            for attr, value in [*module._parameters.items(), *module._buffers.items()]:
                if value is None:
                    continue
                key = f"{full}.{attr}" if full else attr
                is_param = attr in module._parameters
                if is_param or attr not in module._non_persistent_buffers_set:
                    names[key] = (module, attr, is_param)
                    aliases.setdefault(id(value), key)
        for key, info in stored.items():
            if key not in names:
                raise SecateursError(f"the folder stores {key!r}, which the model its config builds does not have "
                                     "(renamed weights?): prune in memory (--no-stream), which converts them")
            module, attr, _ = names[key]
            want = tuple(getattr(module, attr).shape)
            if want != tuple(info.shape):
                raise SecateursError(f"the folder stores {key!r} with shape {tuple(info.shape)}, but its config "
                                     f"builds {want}: the folder's files do not match its config")
            self.owner[key] = names[key]
        stored_ids = {id(getattr(m, a)) for m, a, _ in self.owner.values()}
        for key, (module, attr, _) in names.items():
            if key not in self.owner and id(getattr(module, attr)) not in stored_ids and getattr(module, attr).is_meta:
                raise SecateursError(f"the folder does not store {key!r}: the download is incomplete "
                                     "(a shard is missing from the index?)")
        self.key_of = {id(getattr(m, a)): k for k, (m, a, _) in self.owner.items()}
        self._saved: list[tuple[nn.Module, str, bool, Any]] = []

    def put(self, key: str, tensor: Tensor) -> None:
        module, attr, is_param = self.owner[key]
        store = module._parameters if is_param else module._buffers
        self._saved.append((module, attr, is_param, store[attr]))
        store[attr] = nn.Parameter(tensor, requires_grad=False) if is_param else tensor

    def move_buffers(self, module: nn.Module, device: torch.device) -> None:
        """Computed (non-stored) buffers of ``module`` go with it to ``device``."""
        for attr, value in module._buffers.items():
            if value is not None and not value.is_meta and value.device != device:
                self._saved.append((module, attr, False, value))
                module._buffers[attr] = value.to(device)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype the skeleton holds stored tensor ``key`` in."""
        module, attr, _ = self.owner[key]
        return getattr(module, attr).dtype

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.owner if k.startswith(prefix + ".")]

    def release(self) -> None:
        """Put every swapped-in tensor's meta (or original) value back: the memory is free again."""
        for module, attr, is_param, value in reversed(self._saved):
            (module._parameters if is_param else module._buffers)[attr] = value
        self._saved.clear()


class _Activations:
    """The calibration activations between two layers: in memory up to a budget, then on disk."""

    def __init__(self, budget: int, folder: Path, device: torch.device, stats: StreamStats) -> None:
        self.budget, self.folder, self.device, self.stats = budget, folder, device, stats
        self.used = 0
        self._mem: dict[int, Tensor] = {}
        self._files: dict[int, Path] = {}

    def put(self, i: int, t: Tensor) -> None:
        from safetensors.torch import save_file

        nbytes = t.numel() * t.element_size()
        if self.used + nbytes <= self.budget:
            self._mem[i] = t
            self.used += nbytes
            return
        path = self.folder / f"act-{next(_SERIAL)}.safetensors"
        save_file({"h": t.detach().to("cpu").contiguous()}, str(path))
        self._files[i] = path
        self.stats.spilled_bytes += nbytes

    def get(self, i: int) -> Tensor:
        from safetensors.torch import load_file

        if i in self._mem:
            return self._mem[i]
        return load_file(str(self._files[i]))["h"].to(self.device)

    def drop(self, i: int) -> None:
        t = self._mem.pop(i, None)
        if t is not None:
            self.used -= t.numel() * t.element_size()
        path = self._files.pop(i, None)
        if path is not None:
            path.unlink()


class _Calls:
    """A layer's calls on the current activations, walked as often as needed (spilled ones are read again)."""

    def __init__(self, acts: _Activations, templates: list[tuple[tuple, dict, bool]]) -> None:
        self.acts, self.templates = acts, templates

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        return (_call(self.acts.get(i), *template) for i, template in enumerate(self.templates))


def _take_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict, bool]:
    """Split a layer call into its main tensor and the rest (which every layer receives alike)."""
    if args and isinstance(args[0], Tensor):
        return args[0], args[1:], kwargs, True
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], args, {k: v for k, v in kwargs.items() if k != "hidden_states"}, False
    raise SecateursError("cannot tell which input of the model's first layer is its hidden states: prune in "
                         "memory (--no-stream)")


def _call(hidden: Tensor, rest: tuple, kwargs: dict, positional: bool) -> tuple[tuple, dict]:
    return ((hidden, *rest), kwargs) if positional else (rest, {**kwargs, "hidden_states": hidden})


@contextmanager
def _materialise_on_call(modules: list[nn.Module], slots: _Slots, read: Any,
                         device: torch.device) -> Iterator[list[Any]]:
    """Modules outside the layer stack get their stored tensors (and move their computed buffers) when first
    called: running the model up to its first layer touches only the embeddings. Gives the hooks' handles."""
    def hook(module: nn.Module, args: Any) -> None:
        for value in [*module._parameters.values(), *module._buffers.values()]:
            key = slots.key_of.get(id(value)) if value is not None else None
            if key is not None and value.is_meta:
                slots.put(key, read(key))
        slots.move_buffers(module, device)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def prune_streaming(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: Any,
    *,
    data: Any = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    extra_files: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    trust_code: bool = False,
    activation_budget: int | None = None,
    outcome_files: Callable[[PruneReport, StreamStats], dict[str, bytes]] | None = None,
) -> tuple[PruneReport, StreamStats]:
    """Prune the transformers folder ``source`` into the folder ``out``, one layer at a time.

    Args:
        source: a transformers model folder with safetensors weights (one file or shards + index).
        out: the output folder (written atomically; never the input).
        config: :class:`~secateurs.Wanda`, :class:`~secateurs.SparseGPT`, :class:`~secateurs.NM`,
            :class:`~secateurs.Unstructured` with ``scope="layer"``, or :class:`~secateurs.Layers` with
            ``n`` (chosen by block influence).
        data: calibration batches of token ids (Wanda, SparseGPT, Layers).
        device: where each layer and its activations are computed (``cpu``, ``cuda``, ``cuda:N``);
            the rest of the model stays on disk.
        max_shard_size: largest output shard in bytes (default: the input's own sharding).
        extra_files: more files for ``out`` (tokenizer files, a report; a callable gets the weights' size).
        input_shape: the example input shape to record in the manifest.
        activation_budget: bytes of calibration activations kept in memory before spilling to disk
            (default: an eighth of the machine's memory, or of the GPU's free memory).
        outcome_files: makes more files for ``out`` from the finished report and stats (a
            report.json), written in the same atomic step.

    Returns:
        ``(report, stats)``: the pruning report (as :func:`secateurs.prune_` gives) and what was
        read, written and kept.
    """
    from ..data.text import check_token_ids
    from ..io.atomic import atomic_dir
    from ..io.checkpoint import is_saved_model, read_manifest
    from ..io.hf import hf_skeleton
    from ..io.manifest import (
        HISTORY_ATTR,
        finish_transformers_folder,
        manifest_fields,
        transformers_tensor_record,
    )
    from ..io.shards import SafetensorsFolder, ShardWriter, plan_shards

    check_streamable(config)
    start = time.perf_counter()
    folder, out = Path(source), Path(out)
    if not folder.is_dir():
        raise SecateursError(f"'{folder}' is not a folder: streaming reads a transformers folder (hf:DIR)")
    if out.resolve() == folder.resolve():
        raise SecateursError("--out is the input folder: write the pruned model to a new folder")
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    weights = SafetensorsFolder(folder)
    floats = [i.dtype for i in weights.tensors.values() if i.dtype.is_floating_point]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise SecateursError(f"the weights are stored in {str(dtype).removeprefix('torch.')}, and streaming computes "
                             "in the stored dtype: convert the folder to bfloat16, float16 or float32 first")
    _check_compute(dtype, dev)
    if isinstance(config, Layers) and data is None:
        raise SecateursError("layers are chosen on calibration text: pass data= (CLI: --data pydoc or text:FILE)")
    batches = calibration_batches(config, data) if isinstance(config, (Wanda, SparseGPT, Layers)) else None
    model = hf_skeleton(folder, trust_code=trust_code, dtype=dtype, stored=weights.tensors)
    # a checkpoint whose tensors transformers converts on load (one matrix per expert, fused into one 3-D
    # weight) is read under the model's names, and written back under the checkpoint's, as save_pretrained does
    weights = converted_folder(weights, model)
    run_experts_eagerly(model)  # this run's own skeleton: statistics and traces follow each expert
    reverter = Reverter(model) if isinstance(weights, ConvertedFolder) else None
    if batches is not None:
        check_token_ids(model, batches)
    budget = activation_budget if activation_budget is not None else _default_budget(dev)
    _check_disk(out, weights.nbytes + _spill_estimate(model, batches, dtype, budget))
    slots = _Slots(model, weights.tensors)
    # floating tensors stored in another dtype than the skeleton holds them in (float32 norms beside bfloat16
    # weights) are computed and written in the skeleton's, as transformers (and the in-memory path) load them
    recast = {k: slot for k, i in weights.tensors.items()
              if i.dtype.is_floating_point and (slot := slots.dtype(k)).is_floating_point and slot != i.dtype}
    if recast:
        log.info("%d tensors stored in another floating dtype (%s) are computed and written in the model's",
                 len(recast), next(iter(recast)))
    prior = read_manifest(folder) if is_saved_model(folder) else {}
    setattr(model, HISTORY_ATTR, prior.get("history", []))
    prior_masked = {k for k, v in prior.get("tensors", {}).items() if isinstance(v, dict) and v.get("masked")}
    report = PruneReport(method=config.method, config=config_to_dict(config))
    stats = StreamStats(device=str(dev))
    records: dict[str, Any] = {}
    kept_zeros: dict[str, Tensor] = {}

    def read(key: str) -> Tensor:
        # what the last tensors used is free by now: glibc would keep it (a freed embedding table stays
        # resident in the heap), and the next read would come on top
        release_freed_memory()
        t = weights.read(key, dev)
        if key in recast:
            t = t.to(recast[key])
        stats.bytes_read += t.numel() * t.element_size()
        if t.is_floating_point() and not getattr(config, "allow_nonfinite", False) and not _all_finite(t):
            raise SecateursError(f"weights of {key} contain NaN/inf: fix the model or pass allow_nonfinite=True "
                                 "(CLI: --allow-nonfinite)")
        return t

    renamed = {key: key for key in weights.tensors}  # stored name -> written name (None: removed)
    if isinstance(config, Layers):
        with torch.no_grad(), tempfile.TemporaryDirectory(dir=out.resolve().parent, prefix=".activations-") as spill:
            renamed = _choose_layers(model, config, batches, slots, read, report, stats, dev, budget, Path(spill))
    cuts: dict[str, dict[int, Tensor]] = {}  # channel pruning: stored name -> dim -> the indices kept
    width_plan = None
    if isinstance(config, Channels):
        if config.reconstruct and data is None:
            raise SecateursError("reconstruct refits layers on data: pass data= (CLI: --data)")
        report, cuts, width_plan = _plan_widths(model, config, slots, read, input_shape, data, dev)
        stats.layers = len(repeated_blocks(model))
    infos = {renamed[k]: _cut_info(_with_dtype(info, recast[k]) if k in recast else info, cuts.get(k))
             for k, info in weights.tensors.items() if renamed[k] is not None}
    if reverter is not None:  # the checkpoint's tensors, each in the file of the model tensor it is part of
        infos = {name: part for key, info in infos.items() for name, part in reverter.infos(key, info).items()}
    files = plan_shards(infos, max_shard_size)
    done: set[str] = set()  # the model tensors written
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, {k: (i.dtype, i.shape) for k, i in infos.items()}, files)

        def write(key: str, tensor: Tensor, mask: Tensor | None) -> None:
            done.add(key)
            if mask is None and key in prior_masked:
                mask = tensor != 0  # pruned before: its zeros stay pruned
            new = renamed[key]
            # the manifest has the model's names, as in memory (what secateurs.load restores masks by)
            records[new] = transformers_tensor_record(new, tensor, mask, kept_zeros)
            for name, part in (reverter.split(new, tensor) if reverter is not None else {new: tensor}).items():
                writer.write(name, part)  # the checkpoint's names, as save_pretrained writes them
            stats.bytes_written += tensor.numel() * tensor.element_size()
            if tensor.is_floating_point():
                stats.params += tensor.numel()
                stats.nonzero_params += int(tensor.count_nonzero())

        with torch.no_grad():
            # layer pruning chose above: its kept layers are copied below under their new names
            if isinstance(config, Channels) and config.reconstruct:
                dense = hf_skeleton(folder, trust_code=trust_code, dtype=dtype, stored=weights.tensors)
                run_experts_eagerly(dense)
                report.reconstruction = [f.to_dict() for f in _stream_reconstruct(
                    dense, model, width_plan, config, data, _Slots(dense, weights.tensors), slots, read,
                    lambda key: _cut(read(key), cuts.get(key)), write, dev)]
            elif isinstance(config, Channels):
                pass  # planned above: the tensors are cut as they are copied below
            elif batches is None:
                _stream_data_free(model, config, slots, read, write, report, stats)
            elif not isinstance(config, Layers):
                with tempfile.TemporaryDirectory(dir=tmp, prefix=".activations-") as spill:
                    _stream_calibrated(model, config, batches, slots, read, write, report, stats, dev, budget,
                                       Path(spill))
            for key in weights.tensors:  # everything the method left alone, as it was (or narrower)
                if renamed[key] is not None and key not in done:
                    write(key, _cut(read(key), cuts.get(key)), None)
        written = writer.close()
        if isinstance(config, (Layers, Channels)):  # the config now says how many layers there are, or how wide
            model.config.to_json_file(str(tmp / "config.json"))
            written.append("config.json")
        for name in _COPIED:
            if (folder / name).is_file() and name not in (extra_files or {}) and name not in written:
                shutil.copyfile(folder / name, tmp / name)
                written.append(name)
        stats.seconds = time.perf_counter() - start
        if dev.type == "cuda":
            stats.gpu_peak_bytes = torch.cuda.max_memory_allocated(dev)
            stats.gpu_reserved_bytes = torch.cuda.max_memory_reserved(dev)
        report.outcome["streamed"] = stats.to_dict()
        extra = {**(extra_files or {}), **(outcome_files(report, stats) if outcome_files else {})}
        finish_transformers_folder(tmp, model, manifest=manifest_fields(model, report.to_dict(), input_shape),
                                   tensors=records, kept_zeros=kept_zeros, written=sorted(written),
                                   extra_files=extra, size=stats.bytes_written)
    return report, stats


class _StoredTensors(Mapping):
    """The skeleton's parameters and buffers by name, each read from the input shards when asked for
    (and not kept): what a data-free criterion scores without the model in memory."""

    def __init__(self, model: nn.Module, slots: _Slots, read: Callable[[str], Tensor]) -> None:
        self._keys = {name: slots.key_of[id(t)] for name, t in [*model.named_parameters(), *model.named_buffers()]
                      if id(t) in slots.key_of}
        self._read = read

    def __getitem__(self, name: str) -> Tensor:
        return self._read(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _plan_widths(model: nn.Module, config: Channels, slots: _Slots, read: Callable[[str], Tensor],
                 input_shape: list[int] | None, data: Any, device: torch.device,
                 ) -> tuple[PruneReport, dict[str, dict[int, Tensor]], Plan]:
    """Channel pruning by widths on the skeleton: the plan from the weights on disk (read tensor by tensor
    for the scores; a data-driven criterion runs its forwards with each layer read as it runs), applied
    to the skeleton (its config takes the new widths); per stored tensor, the indices each dim keeps."""
    from ..io.inputs import example_inputs

    stacks = stacked_weight_names(model)
    if stacks:  # the trace runs on the meta skeleton, and routing tokens to experts depends on their values
        raise SecateursError(f"width pruning streams by tracing the model without its weights, and a mixture of "
                             f"experts ({stacks[0]}) routes each token by its values: prune in memory (--no-stream)")
    x = example_inputs(model, input_shape)
    if data is not None:
        data = [map_tensors(b, lambda t: t.to(device)) for b in calibration_list(data, config.calib_batches, "channels")]
    plan, report = plan_uniform_widths(model, config, x, tensors=_StoredTensors(model, slots, read), data=data,
                                       runnable=lambda: _streamed_forward(model, slots, read, device))
    if "config" in report.skipped:
        raise SecateursError("the transformers config cannot describe these widths, and a streamed folder must "
                             "reload with from_pretrained: keep widths a multiple of the head count (--round-to) "
                             "or prune in memory (--no-stream)")
    plan = plan.normalized()
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    cuts: dict[str, dict[int, Tensor]] = {}
    for name, dims in plan.remove.items():
        key = slots.key_of.get(id(named[name]))
        if key is None:
            continue  # a computed buffer: the skeleton's surgery below narrows it
        for dim, gone in dims.items():
            cuts.setdefault(key, {})[dim] = kept_indices(named[name].shape[dim], gone)
    apply_plan_(model, plan)  # meta tensors: only the shapes, the sizes and the config change
    report.plan = plan_as_applied(model, report.plan)
    return report, cuts, plan


def _stream_reconstruct(dense: nn.Module, pruned: nn.Module, plan: Plan, config: Channels, data: Any,
                        dense_slots: _Slots, slots: _Slots, read: Callable[[str], Tensor],
                        read_cut: Callable[[str], Tensor], write: Any, device: torch.device) -> list[Any]:
    """Reconstruction (:mod:`.reconstruct`) one layer at a time: the dense and the pruned layer in memory
    together, each fed its own model's activations, the pruned one refitted and written, then both freed."""
    targets = reconstruction_targets(dense, plan)
    pruned_blocks, dense_blocks = repeated_blocks(pruned), repeated_blocks(dense)
    blocks = [name for name, _ in pruned_blocks]
    outside = [t for t in targets if not any(t.startswith(b + ".") for b in blocks)]
    if outside:
        raise SecateursError(f"streaming reconstructs layers inside the model's layer stack; {outside[0]} is "
                             "outside it (a pruned hidden size reaches the LM head): prune in memory "
                             "(--no-stream) or leave the hidden size (--width heads,ffn)")
    batches = calibration_list(data, config.calib_batches, "reconstruct")
    dense_calls = _first_layer_calls(dense, dense_blocks, batches, dense_slots, read, device)
    pruned_calls = _first_layer_calls(pruned, pruned_blocks, batches, slots, read_cut, device)
    fits: list[Any] = []
    bar = Progress(len(blocks), f"reconstructing {len(blocks)} layers", enabled=None)
    for (name, pruned_block), (_, dense_block) in zip(pruned_blocks, dense_blocks, strict=True):
        _load_layer(dense_slots, read, name, dense_block, device)
        _load_layer(slots, read_cut, name, pruned_block, device)
        inside = {t[len(name) + 1:]: keep for t, keep in targets.items() if t.startswith(name + ".")}
        if inside:
            fits += refit_block(dense_block, pruned_block, dense_calls, pruned_calls, inside,
                                prefix=name, damp=config.reconstruct_damp)
        dense_calls = advance_calls(dense_block, dense_calls)
        pruned_calls = advance_calls(pruned_block, pruned_calls)
        for key in slots.keys_under(name):  # refitted: written as they are now
            module, attr, _ = slots.owner[key]
            write(key, getattr(module, attr).detach().cpu(), None)
        dense_slots.release()
        slots.release()
        release_freed_memory()
        bar.update(layer=name)
    bar.close()
    order = list(targets)
    return sorted(fits, key=lambda f: order.index(f.name))


@contextmanager
def _streamed_forward(model: nn.Module, slots: _Slots, read: Callable[[str], Tensor],
                      device: torch.device) -> Iterator[None]:
    """The skeleton runs: every module reads its stored tensors when it is called, and what was read is
    freed each time a layer of the stack returns (so a forward holds one layer, plus the embeddings).

    A forward run by :func:`~secateurs.importance.stats.forward_batches` (which keeps only what hooks
    see) ends after the last layer of the stack when nothing still to run (the final norm, the LM head,
    the model's own forward hooks) is watched by a hook: the statistics a criterion collects inside the
    layers need neither the LM head's weights nor its logits. Any other forward runs to its output."""
    blocks = repeated_blocks(model)
    in_stack = {id(m) for _, b in blocks for m in b.modules()}
    outside = [m for m in model.modules() if id(m) not in in_stack]
    started: set[int] = set()
    finished: set[int] = set()
    ours: set[int] = set()

    def free(_m: nn.Module, _args: Any, _out: Any) -> None:
        slots.release()
        release_freed_memory()

    def end_after_stack(_m: nn.Module, _args: Any, _out: Any) -> None:
        if forward_may_stop() and not _watched_from_here(outside, started, finished, ours):
            raise StopForward

    def start(m: nn.Module, _args: Any) -> None:
        if m is model:  # a new forward
            started.clear()
            finished.clear()
        started.add(id(m))

    handles = [block.register_forward_hook(free) for _, block in blocks]
    if blocks:
        handles.append(blocks[-1][1].register_forward_hook(end_after_stack))
    for m in outside:
        handles.append(m.register_forward_pre_hook(start))
        handles.append(m.register_forward_hook(lambda m, _a, _o: finished.add(id(m))))
    try:
        with torch.no_grad(), _materialise_on_call(list(model.modules()), slots, read, device) as materialising:
            ours.update(h.id for h in [*handles, *materialising])
            yield
    finally:
        for h in handles:
            h.remove()
        slots.release()


def _watched_from_here(outside: list[nn.Module], started: set[int], finished: set[int], ours: set[int]) -> bool:
    """Whether a hook other than ours would still see something of this forward: a forward hook of a module
    that has not returned yet, a pre-hook of one that has not started, or a global module hook."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    for m in outside:
        if id(m) not in finished and any(k not in ours for k in m._forward_hooks):
            return True
        if id(m) not in started and any(k not in ours for k in m._forward_pre_hooks):
            return True
    return False


def _cut(t: Tensor, keep: dict[int, Tensor] | None) -> Tensor:
    for dim, idx in (keep or {}).items():
        t = t.index_select(dim, idx.to(t.device))
    return t


def _with_dtype(info: Any, dtype: torch.dtype) -> Any:
    """A stored tensor's record as written in ``dtype``."""
    return dataclasses.replace(info, dtype=dtype, end=info.begin + math.prod(info.shape) * dtype.itemsize)


def _cut_info(info: Any, keep: dict[int, Tensor] | None) -> Any:
    """A stored tensor's record with the shape it will be written in."""
    if not keep:
        return info
    shape = list(info.shape)
    for dim, idx in keep.items():
        shape[dim] = int(idx.numel())
    size = math.prod(shape) * info.dtype.itemsize
    return dataclasses.replace(info, shape=tuple(shape), end=info.begin + size)


def _owning_block(t: Target, blocks: Iterable[str]) -> str | None:
    """The layer of the stack (by name) that holds target ``t``; None outside the stack."""
    return next((b for b in blocks if t.module_name.startswith(b + ".")), None)


def _stream_data_free(model: nn.Module, config: Any, slots: _Slots, read: Any, write: Any,
                      report: PruneReport, stats: StreamStats) -> None:
    """Magnitude (per layer, or by threshold) and N:M: each weight on its own, in the in-memory order."""
    targets, skipped = select_targets(model, config, stacked=isinstance(config, Unstructured))
    report.skipped.update(skipped)
    gen = make_generator(config.seed)
    # progress and stats count the model's layers (a weight outside the stack, such as the head, is one)
    blocks = [name for name, _ in repeated_blocks(model)]

    def layer_of(t: Target) -> str:
        return _owning_block(t, blocks) or t.name

    count = len({layer_of(t) for t in targets})
    bar = Progress(count, f"streaming {count} layers", enabled=None)
    for layer, weights in itertools.groupby(targets, key=layer_of):
        for t in weights:
            key = slots.key_of[id(t.weight)]
            weight = read(key)
            keep = nm_keep(config, t.module, t.tensor, weight, gen) if isinstance(config, NM) else \
                layer_keep(config, weight, None, gen, stacked=t.stacked)
            if isinstance(keep, str):  # N:M cannot apply to this weight
                report.skipped[t.name] = keep
                write(key, weight, None)
            else:
                write(key, weight.masked_fill(~keep, 0), keep)
                report.layers.append(layer_report(t.name, keep))
        stats.layers += 1
        bar.update(layer=layer)
    bar.close()
    if isinstance(config, NM) and not report.layers:
        raise SecateursError(f"no selected layer has an input size divisible by {config.m}; choose a smaller M or "
                             "other layers")


def _stream_calibrated(model: nn.Module, config: Wanda | SparseGPT, batches: list[Any], slots: _Slots, read: Any,
                       write: Any, report: PruneReport, stats: StreamStats, device: torch.device,
                       budget: int, spill: Path) -> None:
    """Wanda and SparseGPT: each layer is pruned on its inputs, then its pruned outputs feed the next."""
    blocks = repeated_blocks(model)
    targets = oneshot_targets(model, config, None, report)
    inside: dict[str, list[Target]] = {name: [] for name, _ in blocks}
    for t in targets:
        owner = _owning_block(t, inside)
        if owner is None:
            report.skipped[t.name] = "outside the model's layer stack (streaming prunes inside it; prune in memory " \
                                     "to include it)"
        else:
            inside[owner].append(t)
    masks: dict[str, Tensor] = {}

    def prune(name: str, block: nn.Module, calls: Iterable[tuple[tuple, dict]]) -> None:
        # the widest layer (the MLP's down projection) alone first: its Hessian is not held with the others'
        prune_block(model, block, inside[name], config, report, calls, widest_first=True)
        # baked before the outputs pass: the same numbers as masked weights, without a masked copy of
        # every weight in every call
        masks.clear()
        masks.update({f"{name}.{n}" if n else name: m for n, _, _, m in masked_tensors(block)})
        finalize_(block)

    def save(name: str, block: nn.Module) -> None:
        for key in slots.keys_under(name):
            module, attr, _ = slots.owner[key]
            write(key, getattr(module, attr), masks.get(key))
        masks.clear()  # (a byte per weight: not held through the next layer's calibration and pruning)

    _walk_layers(model, blocks, batches, slots, read, stats, device, budget, spill, before=prune, done=save)


def _first_layer_calls(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[Any], slots: _Slots,
                       read: Callable[[str], Tensor], device: torch.device) -> list[tuple[tuple, dict]]:
    """The arguments the first layer of the stack gets for every calibration batch: the model run up to
    it, reading only the modules that run before it (the embeddings), which are freed again."""
    in_stack = {id(m) for _, b in blocks for m in b.modules()}
    outside = [m for m in model.modules() if id(m) not in in_stack]
    on_device = [map_tensors(split_batch(b)[0], lambda x: x.to(device)) for b in batches]
    with _materialise_on_call(outside, slots, read, device):
        try:
            calls = capture_block_inputs(model, blocks[0][1], on_device)
        except SecateursError:
            raise
        except Exception as exc:
            raise SecateursError(f"cannot run the model up to its first layer with weights read on demand "
                                 f"({str(exc).splitlines()[0][:120]}): prune in memory (--no-stream)") from None
    slots.release()
    release_freed_memory()
    if len(calls) != len(batches):
        raise SecateursError("the model's first layer did not run on every calibration batch: prune in memory "
                             "(--no-stream)")
    return calls


def _load_layer(slots: _Slots, read: Callable[[str], Tensor], name: str, block: nn.Module,
                device: torch.device) -> None:
    """Layer ``name``'s stored tensors read into the skeleton, its computed buffers moved to ``device``."""
    for key in slots.keys_under(name):
        slots.put(key, read(key))
    for sub in block.modules():
        slots.move_buffers(sub, device)


def _walk_layers(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[Any], slots: _Slots,
                 read: Any, stats: StreamStats, device: torch.device, budget: int, spill: Path, *,
                 before: Callable[[str, nn.Module, Iterable[tuple[tuple, dict]]], None] | None = None,
                 each: Callable[[str, Tensor, Tensor], None] | None = None,
                 done: Callable[[str, nn.Module], None] | None = None) -> None:
    """Walk the calibration batches through the layer stack, one layer in memory at a time.

    For each layer: its tensors are read; ``before(name, layer, calls)`` sees its inputs (and may
    prune it; it can walk ``calls`` more than once); its outputs are computed (``each(name, input,
    output)`` for every batch) and become the next layer's inputs; ``done(name, layer)`` runs; its
    tensors are freed.
    """
    if not blocks:
        raise SecateursError("the model has no stack of layers of one kind to stream through: prune in memory "
                             "(--no-stream)")
    calls = _first_layer_calls(model, blocks, batches, slots, read, device)
    acts = _Activations(budget, spill, device, stats)
    templates = []
    for i, (args, kwargs) in enumerate(calls):
        hidden, rest, kw, positional = _take_hidden(args, kwargs)
        templates.append((rest, kw, positional))
        acts.put(i, hidden)
    del calls
    bar = Progress(len(blocks), f"streaming {len(blocks)} layers", enabled=None)
    for name, block in blocks:
        began = time.perf_counter()
        _load_layer(slots, read, name, block, device)
        if before is not None:
            before(name, block, _Calls(acts, templates))
        nxt = _Activations(budget, spill, device, stats)
        for i in range(len(templates)):
            x = acts.get(i)
            args, kwargs = _call(x, *templates[i])
            y = first_tensor(block(*args, **kwargs))
            if each is not None:
                each(name, x, y)
            nxt.put(i, y)
            acts.drop(i)
        acts = nxt
        if done is not None:
            done(name, block)
        slots.release()
        release_freed_memory()
        stats.layers += 1
        stats.per_layer_seconds.append(time.perf_counter() - began)
        bar.update(layer=name)
    bar.close()


def _choose_layers(model: nn.Module, config: Layers, batches: list[Any], slots: _Slots, read: Any,
                   report: PruneReport, stats: StreamStats, device: torch.device, budget: int,
                   spill: Path) -> dict[str, str | None]:
    """Layer pruning by block influence (ShortGPT): one streamed pass of the dense model scores every
    layer by ``1 - cos`` of its input and output, the ``config.n`` lowest go; the skeleton loses them
    (its config too) and each stored name maps to its name after the removal, or None."""
    blocks = repeated_blocks(model)
    if len(blocks) <= config.n and not config.allow_empty_stage:
        raise SecateursError(f"the model has {len(blocks)} layers: removing {config.n} would leave none; ask for fewer")
    share = 1 / len(batches)
    influence = dict.fromkeys((name for name, _ in blocks), 0.0)

    def score(name: str, x: Tensor, y: Tensor) -> None:
        influence[name] += float(block_influence(x.detach(), y.detach())) * share

    _walk_layers(model, blocks, batches, slots, read, stats, device, budget, spill, each=score)
    chosen = sorted(influence, key=influence.__getitem__)[: config.n]
    chosen.sort(key=[name for name, _ in blocks].index)
    sizes = {name: sum(p.numel() for p in block.parameters()) for name, block in blocks}
    report.outcome["importance_used"] = "block_influence"
    report.layers = [LayerReport(name=n, shape=[sizes[n]], numel=sizes[n], zeros=sizes[n] if n in chosen else 0)
                     for n, _ in blocks]
    report.plan = {"drop": chosen, "candidates": [{"name": n, "stage": "", "score": influence[n],
                                                   "removed": n in chosen} for n, _ in blocks]}
    apply_plan_(model, Plan(drop=chosen))
    renamed: dict[str, str | None] = {}
    for key in slots.owner:
        module, _, attr = key.rpartition(".")
        after = name_after_drop(module, chosen)
        renamed[key] = None if after is None else f"{after}.{attr}" if after else attr
    return renamed
