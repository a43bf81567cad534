"""Checking a ``--data`` spec before anything slow runs (it names bundled data, a folder or a file)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SecateursError
from .bundled import DATASETS

__all__ = ["check_data_spec", "data_path"]


def data_path(spec: str) -> Path | None:
    """The folder or file a spec reads (``imagefolder:PATH``, ``text:FILE``), or None for bundled data."""
    for prefix in ("imagefolder:", "text:"):
        if spec.startswith(prefix):
            return Path(spec[len(prefix):])
    return None


def check_data_spec(spec: str, *, images: bool = True, text: bool = True) -> None:
    """Refuse a spec that names nothing we can read, without reading it.

    Args:
        spec: ``digits``, ``mnist5k``, ``imagefolder:PATH``, ``pydoc`` or ``text:FILE``.
        images: labelled images are acceptable here.
        text: text is acceptable here.
    """
    from .loaders import DATA_HELP
    from .text import TEXT_HELP, is_text_spec

    kinds = " or ".join(h for ok, h in ((images, DATA_HELP), (text, TEXT_HELP)) if ok)
    if is_text_spec(spec) and not text or not is_text_spec(spec) and not images:
        raise SecateursError(f"--data '{spec}' is not usable here: use {kinds}")
    path = data_path(spec)
    if path is None:
        if spec not in DATASETS and spec != "pydoc":
            raise SecateursError(f"unknown data '{spec}': use {kinds}")
    elif spec.startswith("imagefolder:"):
        if not path.is_dir():
            raise SecateursError(f"image folder '{path}' does not exist: check the path")
        _check_image_folder(path)
    elif spec.startswith("text:"):
        if not path.is_file():
            raise SecateursError(f"text file '{path}' does not exist: check the path")
        if path.stat().st_size == 0:
            raise SecateursError(f"text file '{path}' is empty: name a file with text in it")


# torchvision's ImageFolder reads these (torchvision.datasets.folder.IMG_EXTENSIONS)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _has_image(folder: Path) -> bool:
    """Whether any file below ``folder`` is an image ImageFolder would read (stops at the first)."""
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(_IMAGE_SUFFIXES) for name in files):
            return True
    return False


def _check_image_folder(root: Path) -> None:
    """The folders an ``imagefolder:`` spec reads (``train/`` and ``val/`` when present, else the folder
    itself) each hold class subfolders, each with an image: what ImageFolder would refuse later, found now."""
    splits = [root / name for name in ("train", "val") if (root / name).is_dir()] or [root]
    for folder in splits:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not classes:
            raise SecateursError(f"image folder '{folder}' has no class subfolders: put each class's images in "
                                 "a subfolder named after it")
        empty = [c for c in classes if not _has_image(folder / c)]
        if empty:
            raise SecateursError(f"image folder '{folder}' has class subfolders without images "
                                 f"({', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}): add images "
                                 f"({', '.join(_IMAGE_SUFFIXES)}) or remove them")
