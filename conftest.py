"""Docstring examples run with the suite: pyproject.toml collects src/secateurs with --doctest-modules.

An example that imports an optional package (torchvision, transformers, ...) is skipped, naming the
package, where that package is not installed, so an install with only the core dependencies still
collects and passes. This file sits at the root, not in tests/, so that it also applies to
``pytest --doctest-modules src/secateurs``; tests/conftest.py keeps the shared fixtures.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

_FROM = re.compile(r"\s*from\s+(\w+)")
_IMPORT = re.compile(r"\s*import\s+(.+)")


def imported_packages(source: str) -> list[str]:
    """The top-level packages an example's source imports (relative imports are not packages)."""
    names = []
    for line in source.splitlines():
        if m := _FROM.match(line):
            names.append(m.group(1))
        elif m := _IMPORT.match(line):
            names += [part.split()[0].split(".")[0] for part in m.group(1).split(",") if part.strip()]
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        examples = getattr(getattr(item, "dtest", None), "examples", ())
        absent = sorted({name for example in examples for name in imported_packages(example.source)
                         if importlib.util.find_spec(name) is None})
        if absent:
            item.add_marker(pytest.mark.skip(reason=f"optional package '{absent[0]}' is not installed"))
