"""Batches for calibration and data-driven importance, from a short spec string."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from ..errors import SecateursError
from ..io.arch import require
from ..utils import first_line
from .bundled import DATASETS, load_dataset

__all__ = ["DATA_HELP", "batches", "dataset"]

DATA_HELP = "digits, mnist5k, or imagefolder:PATH (a folder with class subfolders, or train/ and val/ inside)"

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _fit(x: Tensor, shape: Sequence[int] | None) -> Tensor:
    """Resize/replicate channels so bundled images match the model's input shape."""
    if shape is None or len(shape) != 4:
        return x
    _, c, h, w = shape
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True).expand(-1, c, -1, -1).contiguous()
    return x


def dataset(
    spec: str, *, split: str = "train", input_shape: Sequence[int] | None = None, seed: int = 0,
    limit: int | None = None,
) -> TensorDataset:
    """The labelled images named by ``spec`` (see ``DATA_HELP``) as a dataset of ``(x, y)`` pairs.

    ``split`` is ``train`` or ``test`` (an image folder's ``val/``); images are
    resized and their channels replicated to fit ``input_shape``. Bundled
    datasets have a fixed shuffled split, so train and test never overlap.
    """
    if split not in ("train", "test"):
        raise SecateursError(f"split must be 'train' or 'test', got '{split}'")
    if spec in DATASETS:
        data = load_dataset(spec, seed=seed)
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        x, y = _fit(x[:limit], input_shape), y[:limit]
    elif spec.startswith("imagefolder:"):
        x, y = _image_folder(Path(spec.split(":", 1)[1]), split, input_shape, limit or 1_000_000_000, seed)
    else:
        raise SecateursError(f"unknown data '{spec}': use {DATA_HELP}")
    return TensorDataset(x, y)


def batches(
    spec: str, *, batch_size: int = 64, input_shape: Sequence[int] | None = None, split: str = "train",
    max_batches: int | None = None, seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Load ``(x, y)`` batches named by ``spec`` (see ``DATA_HELP``), shaped for ``input_shape``."""
    limit = batch_size * max_batches if max_batches else None
    x, y = dataset(spec, split=split, input_shape=input_shape, seed=seed, limit=limit).tensors
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _refuse_linked_folders(folder: Path) -> None:
    """torchvision's ImageFolder follows symlinked folders: a link to a parent loops for ever, and links
    lead outside the folder. Refuse them up front (linked image files are fine)."""
    for top, dirs, _ in os.walk(folder):
        for name in dirs:
            if os.path.islink(os.path.join(top, name)):
                raise SecateursError(f"image folder '{folder}' holds a symlinked folder "
                                     f"'{os.path.join(top, name)}': copy it in instead (a link can loop or lead "
                                     "outside the folder)")


def _image_folder(root: Path, split: str, input_shape: Sequence[int] | None, limit: int, seed: int) -> tuple[Tensor, Tensor]:
    datasets = require("torchvision.datasets", "vision")
    transforms = require("torchvision.transforms", "vision")
    if not root.is_dir():
        raise SecateursError(f"image folder '{root}' does not exist: check the path")
    sub = root / ("train" if split == "train" else "val")
    folder = sub if sub.is_dir() else root
    h, w = (input_shape[-2], input_shape[-1]) if input_shape and len(input_shape) == 4 else (224, 224)
    tf = transforms.Compose([transforms.Resize(max(h, w)), transforms.CenterCrop((h, w)), transforms.ToTensor()])
    _refuse_linked_folders(folder)
    try:
        ds = datasets.ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SecateursError(f"cannot read images from '{folder}' ({exc}): expected one subfolder per class") from None
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
    from PIL import Image  # torchvision's ImageFolder reads with PIL

    samples = []
    for i in order.tolist():
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes it all anyway
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                samples.append(ds[i])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SecateursError(f"image '{ds.samples[i][0]}' is too large to decode ({first_line(exc)}): "
                                 "remove or shrink the file") from None
        except MemoryError:
            raise SecateursError(f"image '{ds.samples[i][0]}' is too large to decode (out of memory): "
                                 "remove or shrink the file") from None
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise SecateursError(f"cannot read image '{ds.samples[i][0]}' ({first_line(exc)}): "
                                 "remove or replace the file") from None
    xs, ys = zip(*samples, strict=True)
    x = (torch.stack(xs) - _MEAN) / _STD
    return _fit(x, input_shape), torch.tensor(ys)
