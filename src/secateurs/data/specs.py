"""Checking a ``--data`` spec before anything slow runs (it names bundled data, a folder or a file)."""

from __future__ import annotations

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
    elif spec.startswith("imagefolder:") and not path.is_dir():
        raise SecateursError(f"image folder '{path}' does not exist: check the path")
    elif spec.startswith("text:") and not path.is_file():
        raise SecateursError(f"text file '{path}' does not exist: check the path")
