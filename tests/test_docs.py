"""Examples in docstrings and in the README are executed."""

import doctest
import importlib
import pathlib
import re

import pytest

MODULES = [
    "secateurs.methods.registry",
    "secateurs.methods.unstructured",
    "secateurs.methods.nm",
    "secateurs.analysis",
    "secateurs.io.checkpoint",
    "secateurs.io.inputs",
    "secateurs.io.specs",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks, "the README should show the Python API"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
