"""Examples in docstrings are kept (the suite runs them) and the README's are executed."""

import doctest
import importlib
import pathlib
import re

import pytest

# Modules whose users start from their examples: each must keep at least one (the suite runs every
# module's examples through --doctest-modules; this guards against an example silently deleted).
MODULES = [
    "secateurs.methods.registry",
    "secateurs.methods.unstructured",
    "secateurs.methods.nm",
    "secateurs.analysis",
    "secateurs.io.checkpoint",
    "secateurs.io.inputs",
    "secateurs.io.specs",
    "secateurs.graph.registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_keeps_its_examples(name):
    finder = doctest.DocTestFinder()
    assert any(t.examples for t in finder.find(importlib.import_module(name))), name


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks, "the README should show the Python API"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
