"""Example inputs for a model: float images/features, video clips, token ids, a detector's list of
images or an optical-flow model's image pair."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from ..errors import SecateursError
from ..selection import declared_module
from ..utils import first_line

__all__ = ["ExampleInputs", "KINDS", "parse_shape", "default_input", "example_inputs"]

INPUT_ATTR = "_secateurs_input"
DEFAULT_TOKENS = 128
# 1 GiB of float32: far above any input needed to trace, time or calibrate a model, and a shape
# like 100000,1,1000,1000 otherwise ends in the allocator's traceback (or the OOM killer)
MAX_INPUT_ELEMENTS = 2**28


def _check_size(dims: tuple[int, ...]) -> None:
    count = math.prod(dims)
    if count > MAX_INPUT_ELEMENTS:
        raise SecateursError(
            f"an example input of shape {','.join(map(str, dims))} has {count:,} elements, more than the "
            f"{MAX_INPUT_ELEMENTS:,} allowed: pass a smaller --input-shape (batch 1 is enough to trace a model)"
        )


def parse_shape(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or a sequence) into a tuple of positive ints."""
    try:
        dims = tuple(int(d) for d in (text.replace("x", ",").split(",") if isinstance(text, str) else text))
    except ValueError:
        raise SecateursError(
            f"input shape must be comma-separated positive integers like 1,3,224,224, got '{text}'"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise SecateursError(
            f"input shape must be comma-separated positive integers like 1,3,224,224, got '{text}'"
        )
    _check_size(dims)
    return dims


def _vocab_size(model: nn.Module) -> int | None:
    emb = declared_module(model, "get_input_embeddings")
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


# what a torchvision task's models take (kind), and the least input that traces every one of them
# (mvit and s3d need 16 frames of 224x224; RAFT pools its correlation volume four times: 128x128)
_TASKS = {"detection": "images", "video": "float", "optical_flow": "pair"}
_TASK_MIN_SIZE = {"detection": (224, 224), "video": (112, 112), "optical_flow": (128, 128)}
KINDS = ("float", "tokens", "images", "pair")


def _torchvision_task(model: nn.Module) -> tuple[str | None, str | None]:
    """``(task, builder name)`` of a torchvision model: detection, video, optical_flow, segmentation or None.

    Read from the recorded source (``torchvision:NAME``), else from the detector and RAFT base classes
    when torchvision is already imported (a model built by the user's own code).
    """
    from .arch import SOURCE_ATTR

    tv = sys.modules.get("torchvision.models")
    if tv is None:
        return None, None
    source = getattr(model, SOURCE_ATTR, None)
    if isinstance(source, dict) and source.get("kind") == "torchvision":
        name = source.get("name")
        for task in ("detection", "video", "optical_flow", "segmentation"):
            if name in tv.list_models(module=getattr(tv, task)):
                return task, name
        return None, name
    detection = tv.detection
    detection_bases = (detection.generalized_rcnn.GeneralizedRCNN, detection.ssd.SSD, detection.retinanet.RetinaNet,
                       detection.fcos.FCOS)
    if isinstance(model, detection_bases):
        return "detection", None
    if isinstance(model, tv.optical_flow.raft.RAFT):
        return "optical_flow", None
    return None, None


def _min_size(name: str | None) -> tuple[tuple[int, int], int]:
    """The smallest ``(H, W)`` and frame count torchvision's weights metadata gives for ``name`` (no download:
    the metadata ships with torchvision)."""
    if name is None:
        return (1, 1), 1
    tv = sys.modules["torchvision.models"]
    try:
        meta = next(iter(tv.get_model_weights(name))).meta
    except (ValueError, KeyError, StopIteration):
        return (1, 1), 1
    size = meta.get("min_size", (1, 1))
    return (int(size[0]), int(size[1])), int(meta.get("min_temporal_size", 1))


def _task_input(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    task, name = _torchvision_task(model)
    if task not in _TASKS:
        return None
    (h, w), frames = _min_size(name)
    h, w = max(h, _TASK_MIN_SIZE[task][0]), max(w, _TASK_MIN_SIZE[task][1])
    if task == "video":
        return (1, 3, max(16, frames), h, w), "float"
    return (1, 3, h, w), _TASKS[task]


def default_input(model: nn.Module) -> tuple[tuple[int, ...], str]:
    """Guess ``(shape, kind)`` for a model; kind is one of :data:`KINDS` (see :func:`example_inputs`).

    Order: what was recorded when the model was saved; a torchvision detection, video or
    optical-flow model's own kind and least size; timm's ``pretrained_cfg``; token ids for
    models whose input is an embedding; then the first layer's type.
    """
    recorded = getattr(model, INPUT_ATTR, None)
    if recorded and recorded.get("shape"):
        shape = tuple(recorded["shape"])
        return shape, recorded.get("kind") or _kind_for(model)
    task = _task_input(model)
    if task is not None:
        return task
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (1, *cfg["input_size"]), "float"
    if _vocab_size(model) is not None:
        config = getattr(model, "config", None)
        max_pos = getattr(config, "max_position_embeddings", None) or DEFAULT_TOKENS
        return (1, min(DEFAULT_TOKENS, int(max_pos))), "tokens"
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return (1, DEFAULT_TOKENS), "tokens"
        if isinstance(module, nn.Conv2d):
            return (1, module.in_channels, 224, 224), "float"
        if isinstance(module, nn.Conv1d):
            return (1, module.in_channels, 256), "float"
        if isinstance(module, nn.Conv3d):
            return (1, module.in_channels, 16, 112, 112), "float"
        if isinstance(module, nn.Linear):
            return (1, module.in_features), "float"
    raise SecateursError(
        f"cannot guess an input for {type(model).__name__}: pass --input-shape (e.g. 1,3,224,224)"
    )


def _kind_for(model: nn.Module) -> str:
    task, _ = _torchvision_task(model)
    if task in _TASKS:
        return _TASKS[task]
    if _vocab_size(model) is not None:
        return "tokens"
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return "tokens"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return "float"
    return "float"


class ExampleInputs(tuple):
    """The positional arguments of a model whose input is not one tensor: a detector's ``([image, ...],)``
    or an optical-flow model's ``(image1, image2)``. ``shape`` is the batch shape they were made from
    (``N, 3, H, W``), as for a tensor input, so they are recorded and reported the same way."""

    @property
    def shape(self) -> torch.Size:
        first = self[0]
        if isinstance(first, list):
            return torch.Size((len(first), *first[0].shape)) if first else torch.Size((0,))
        return first.shape


def _check_kind(model: nn.Module, shape: tuple[int, ...], kind: str) -> None:
    """Refuse a shape that cannot be what a detector, video or optical-flow model takes."""
    task, name = _torchvision_task(model)
    what = f"torchvision:{name}" if name else type(model).__name__
    given = ",".join(map(str, shape))
    if task == "video" and len(shape) != 5:
        raise SecateursError(f"{what} takes video clips (N,3,T,H,W): pass --input-shape like 1,3,16,112,112, "
                             f"not {given}")
    if kind in ("images", "pair") and (len(shape) != 4 or shape[1] != 3):
        example = "1,3,320,320" if kind == "images" else "1,3,128,128"
        takes = "a batch of RGB images (N,3,H,W)" if kind == "images" else "a pair of RGB image batches (N,3,H,W)"
        raise SecateursError(f"{what} takes {takes}: pass --input-shape like {example}, not {given}")


def example_inputs(
    model: nn.Module, input_shape: Any = None, *, seed: int = 0
) -> Any:
    """A deterministic example input for ``model``.

    Args:
        model: the model the input is for.
        input_shape: e.g. ``"1,3,224,224"`` or ``(1, 128)``; guessed when None.
        seed: seed for the random values.

    Returns:
        A float tensor (images, features, video clips ``(N, 3, T, H, W)``), a tensor of token
        ids for language models, for torchvision detectors ``([image, ...],)``: one argument
        holding a list of ``N`` images of ``(3, H, W)`` in [0, 1], and for optical-flow models
        ``(image1, image2)``, two batches of ``input_shape``.

    Example:
        >>> import torch, secateurs
        >>> secateurs.example_inputs(torch.nn.Conv2d(3, 8, 3)).shape
        torch.Size([1, 3, 224, 224])
    """
    if input_shape is None:
        shape, kind = default_input(model)
    else:
        shape, kind = parse_shape(input_shape), _kind_for(model)
    shape = parse_shape(shape)  # a recorded shape comes from a manifest: check it like a typed one
    _check_kind(model, shape, kind)
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        if kind == "tokens":
            vocab = _vocab_size(model)
            if vocab is None:
                vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
            if vocab is None:
                raise SecateursError(f"token ids were asked for, but {type(model).__name__} has no embedding to "
                                     "take them: pass --input-shape for its real input")
            return torch.randint(0, vocab, shape, generator=gen).to(device)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        if kind == "images":  # detectors normalise images in [0, 1] themselves, one image at a time
            batch = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
            return ExampleInputs((list(batch.unbind(0)),))
        if kind == "pair":  # RAFT takes images in [-1, 1]
            return ExampleInputs(torch.rand(shape, generator=gen).to(device=device, dtype=dtype) * 2 - 1
                                 for _ in range(2))
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:  # out of memory (host or device) for the input alone
        raise SecateursError(
            f"cannot allocate an example input of shape {','.join(map(str, shape))} on {device} "
            f"({first_line(exc)}): pass a smaller --input-shape"
        ) from None
