"""Loading a model folder is data-only by default: a hostile manifest or weights file gets a SecateursError.

Every folder starts as a valid ``secateurs.save(DigitsCNN(), d)`` and is then edited.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from security_helpers import (  # noqa: F401 - fixtures, used by name
    MANIFEST,
    WEIGHTS,
    assert_one_line_error,
    assert_refusal,
    edit_manifest,
    model_dir_fixture,
    no_network_fixture,
    outcome_of,
    read_manifest,
    refused,
    run_cli,
    saved_model,
    time_limit,
)

import secateurs
from conftest import needs
from secateurs.zoo import DigitsCNN


def set_source(folder: Path, source: dict) -> None:
    edit_manifest(folder, source=source)


# ---- A1: a folder that ships its own code ----------------------------------------------------------

@pytest.fixture
def code_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A model folder that is also an importable package whose import leaves sentinel files.

    Its manifest names ``PKG.arch:Net``, an ``nn.Module`` subclass (so a check made
    only after importing comes too late).
    """
    pkg = f"shipped_{uuid.uuid4().hex[:10]}"
    folder = saved_model(tmp_path / pkg)
    sentinels = {"init": tmp_path / "SENTINEL_INIT", "arch": tmp_path / "SENTINEL_ARCH"}
    (folder / "__init__.py").write_text(f"open({str(sentinels['init'])!r}, 'w').close()\n")
    (folder / "arch.py").write_text(
        f"open({str(sentinels['arch'])!r}, 'w').close()\n"
        "from secateurs.zoo import DigitsCNN\n\n\n"
        "class Net(DigitsCNN):\n"
        "    pass\n"
    )
    set_source(folder, {"kind": "factory", "target": f"{pkg}.arch:Net"})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield folder, pkg, sentinels
    for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[name]


def assert_not_imported(pkg: str, sentinels: dict[str, Path]) -> None:
    assert pkg not in sys.modules and f"{pkg}.arch" not in sys.modules, "the folder's code was imported"
    for which, path in sentinels.items():
        assert not path.exists(), f"the folder's code ran ({which} sentinel written)"


def test_folder_code_is_not_imported_without_trust(code_folder):
    folder, pkg, sentinels = code_folder
    outcome = outcome_of(lambda: secateurs.load(folder))
    assert_not_imported(pkg, sentinels)
    exc = assert_refusal(outcome, "trust")
    assert pkg in str(exc) and "Net" in str(exc), f"the error does not name the target: {exc}"


def test_folder_code_is_not_imported_by_the_cli_without_trust(code_folder, capsys):
    folder, pkg, sentinels = code_folder
    code, out, err = run_cli(["analyze", folder, "--no-latency"], capsys)
    assert_one_line_error(code, err, "--trust-code")
    assert_not_imported(pkg, sentinels)


def test_trust_code_is_the_opt_in(code_folder):
    folder, pkg, sentinels = code_folder
    model = secateurs.load(folder, trust_code=True)
    assert type(model).__name__ == "Net"
    assert sentinels["arch"].exists()


# ---- A2: stdlib modules whose import has side effects ----------------------------------------------

SIDE_EFFECT_TARGETS = [
    ("this:X", {}),  # prints the Zen of Python
    ("antigravity:X", {}),  # opens a web browser
    ("venv.__main__:X", {}),  # runs venv's command line (creates a virtual environment)
    ("os:system", {"command": "touch PWNED"}),
]


@pytest.mark.parametrize("target, kwargs", SIDE_EFFECT_TARGETS, ids=[t for t, _ in SIDE_EFFECT_TARGETS])
def test_stdlib_targets_with_import_side_effects_are_refused_unimported(
    target, kwargs, model_dir, tmp_path, monkeypatch, capsys
):
    import webbrowser

    module = target.partition(":")[0]
    monkeypatch.chdir(tmp_path)
    # Contain the damage should the module be imported after all, and make it visible.
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    monkeypatch.setattr(sys, "argv", ["venv", "--without-pip", str(tmp_path / "venv_made")])
    fresh = module not in ("os",)  # os is always imported; the others must not be
    if fresh:
        monkeypatch.delitem(sys.modules, module, raising=False)
    before = set(tmp_path.iterdir())
    set_source(model_dir, {"kind": "factory", "target": target, **({"kwargs": kwargs} if kwargs else {})})
    capsys.readouterr()
    try:
        outcome = outcome_of(lambda: secateurs.load(model_dir))
        out, _ = capsys.readouterr()
        if fresh:
            assert module not in sys.modules, f"{module} was imported"
        assert out == "", f"the import printed: {out[:200]!r}"
        assert not opened, f"a browser was opened at {opened}"
        assert set(tmp_path.iterdir()) == before, "a file was created"
        assert_refusal(outcome, "trust")
    finally:
        if fresh:
            sys.modules.pop(module, None)


# ---- A3: kwargs that reach downloads, files or huge allocations ------------------------------------

@needs("torchvision")
@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("kwargs, name", [
    ({"weights_backbone": "DEFAULT"}, "weights_backbone"),
    ({"weights": "DEFAULT"}, "weights"),
], ids=["weights_backbone", "weights"])
def test_torchvision_kwargs_that_download_are_refused(model_dir, kwargs, name):
    set_source(model_dir, {"kind": "torchvision", "name": "fasterrcnn_mobilenet_v3_large_320_fpn", "kwargs": kwargs})
    refused(lambda: secateurs.load(model_dir), name)


@needs("timm")
@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("name", ["checkpoint_path", "pretrained"])
def test_timm_kwargs_that_read_files_or_download_are_refused(model_dir, tmp_path, name):
    ckpt = tmp_path / "elsewhere.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(3)}}, ckpt)
    value = str(ckpt) if name == "checkpoint_path" else True
    set_source(model_dir, {"kind": "timm", "name": "resnet18", "kwargs": {name: value}})
    refused(lambda: secateurs.load(model_dir), name)


@needs("torchvision")
def test_a_huge_size_kwarg_is_a_clear_error(model_dir):
    set_source(model_dir, {"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10**12}})
    with time_limit(60):
        refused(lambda: secateurs.load(model_dir))


@pytest.mark.parametrize("kwargs", [
    {"num_classes": {"nested": {"deeper": 1}}},
    {"num_classes": [10, 10]},
    {"width": "x" * 1_000_000},
], ids=["nested-dict", "list", "long-string"])
def test_factory_kwargs_that_are_not_plain_values_are_refused(model_dir, kwargs):
    set_source(model_dir, {"kind": "factory", "target": "secateurs.zoo:DigitsCNN", "kwargs": kwargs})
    refused(lambda: secateurs.load(model_dir))


def test_the_zoo_factory_with_plain_kwargs_loads_without_trust(tmp_path):
    source = {"kind": "factory", "target": "secateurs.zoo:DigitsCNN", "kwargs": {"num_classes": 5, "width": 8}}
    secateurs.save(DigitsCNN(num_classes=5, width=8), tmp_path / "m", arch=source)
    model = secateurs.load(tmp_path / "m")
    assert model.classifier[2].out_features == 5 and model.features[0].out_channels == 8


# ---- A4: the weights file must be the folder's own -------------------------------------------------

def test_weights_outside_the_folder_through_dotdot_are_refused(model_dir, tmp_path):
    shutil.copy(model_dir / WEIGHTS, tmp_path / "outside.safetensors")
    edit_manifest(model_dir, weights="../outside.safetensors")
    exc = refused(lambda: secateurs.load(model_dir))
    assert "weights" in str(exc).lower() or "outside.safetensors" in str(exc), exc


def test_weights_given_as_an_absolute_path_are_refused(model_dir, tmp_path):
    shutil.copy(model_dir / WEIGHTS, tmp_path / "abs.safetensors")
    edit_manifest(model_dir, weights=str(tmp_path / "abs.safetensors"))
    exc = refused(lambda: secateurs.load(model_dir))
    assert "weights" in str(exc).lower() or "abs.safetensors" in str(exc), exc


def test_weights_that_are_a_symlink_out_of_the_folder_are_refused(model_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(model_dir / WEIGHTS, elsewhere)
    os.symlink(elsewhere, model_dir / WEIGHTS)
    exc = refused(lambda: secateurs.load(model_dir))
    assert "weights" in str(exc).lower() or WEIGHTS in str(exc), exc


# ---- A5: the manifest's size and shape -------------------------------------------------------------

def test_a_deeply_nested_manifest_is_a_secateurs_error_not_a_recursion_error(model_dir):
    depth = 100_000
    text = json.dumps({**read_manifest(model_dir), "history": "@DEEP@"})
    (model_dir / MANIFEST).write_text(text.replace('"@DEEP@"', "[" * depth + "]" * depth))
    with time_limit(30):
        refused(lambda: secateurs.load(model_dir))


def test_a_100_mb_manifest_is_refused_quickly(model_dir):
    text = json.dumps(read_manifest(model_dir))
    with open(model_dir / MANIFEST, "w") as f:  # valid JSON: trailing whitespace
        f.write(text)
        f.write(" " * (100 * 1024 * 1024))
    start = time.perf_counter()
    with time_limit(60):
        refused(lambda: secateurs.load(model_dir))
    assert time.perf_counter() - start < 5


def test_200000_empty_structure_plans_load_or_are_refused_within_10_s(model_dir):
    edit_manifest(model_dir, structure=[{"remove": {}, "attrs": {}}] * 200_000)
    start = time.perf_counter()
    with time_limit(20):
        try:
            secateurs.load(model_dir)
        except secateurs.SecateursError:
            pass
    assert time.perf_counter() - start < 10


BAD_PLANS = {
    "string": "remove everything",
    "int": 7,
    "null": None,
    "remove-is-a-list": {"remove": [], "attrs": {}},
    "missing-tensor": {"remove": {"nosuch.weight": {"0": [0]}}, "attrs": {}},
    "dim-out-of-range": {"remove": {"classifier.0.bias": {"3": [0]}}, "attrs": {}},
    "dim-negative": {"remove": {"classifier.0.bias": {"-5": [0]}}, "attrs": {}},
    "dim-not-a-number": {"remove": {"classifier.0.bias": {"x": [0]}}, "attrs": {}},
    "index-negative": {"remove": {"classifier.0.bias": {"0": [-1]}}, "attrs": {}},
    "index-out-of-range": {"remove": {"classifier.0.bias": {"0": [10**6]}}, "attrs": {}},
    "index-huge": {"remove": {"classifier.0.bias": {"0": [10**30]}}, "attrs": {}},
    "index-not-a-number": {"remove": {"classifier.0.bias": {"0": ["a"]}}, "attrs": {}},
    "drop-missing-module": {"remove": {}, "attrs": {}, "drop": ["nosuch"]},
}


@pytest.mark.parametrize("plan", BAD_PLANS.values(), ids=BAD_PLANS.keys())
def test_malformed_structure_plans_are_secateurs_errors(model_dir, plan):
    edit_manifest(model_dir, structure=[plan])
    refused(lambda: secateurs.load(model_dir))


@pytest.fixture
def channel_pruned_dir(tmp_path: Path) -> Path:
    """A folder whose manifest holds one real (non-empty) structural plan."""
    torch.manual_seed(0)
    model = DigitsCNN()
    secateurs.prune_(model, secateurs.Channels(ratio=0.25), example_inputs=torch.randn(1, 1, 8, 8))
    secateurs.save(model, tmp_path / "ch")
    return tmp_path / "ch"


def test_a_channel_pruned_folder_loads(channel_pruned_dir):
    """The control for the attrs cases below: the untouched plan replays fine."""
    assert secateurs.load(channel_pruned_dir).features[0].out_channels == 24


BAD_ATTRS = {
    "of-a-missing-module": {"nosuch": {"out_features": 3}},
    "value-not-an-int": {"classifier.0": {"out_features": "many"}},
    "sets-__class__": {"classifier.0": {"__class__": 1}},
    "sets-forward": {"classifier.0": {"forward": 1}},
    "not-a-dict": {"classifier.0": [1, 2]},
}


@pytest.mark.parametrize("attrs", BAD_ATTRS.values(), ids=BAD_ATTRS.keys())
def test_malformed_plan_attrs_are_secateurs_errors(channel_pruned_dir, attrs):
    """Merged into a real plan, so the plan is replayed (an empty one may be skipped)."""

    def inject(manifest):
        manifest["structure"][0]["attrs"].update(attrs)

    edit_manifest(channel_pruned_dir, inject)
    refused(lambda: secateurs.load(channel_pruned_dir))


BAD_SOURCES = {
    "target-int": {"kind": "factory", "target": 42},
    "target-list": {"kind": "factory", "target": ["secateurs.zoo", "DigitsCNN"]},
    "target-null": {"kind": "factory", "target": None},
    "kind-unknown": {"kind": "pickle", "target": "secateurs.zoo:DigitsCNN"},
    "kind-int": {"kind": 1},
    "kwargs-list": {"kind": "factory", "target": "secateurs.zoo:DigitsCNN", "kwargs": [1, 2]},
    "torchvision-name-int": {"kind": "torchvision", "name": 5},
}


@pytest.mark.parametrize("source", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_malformed_sources_are_secateurs_errors(model_dir, source):
    set_source(model_dir, source)
    refused(lambda: secateurs.load(model_dir))


BAD_INPUTS = {
    "negative": {"shape": [-1, 1, 8, 8]},
    "zero": {"shape": [0, 1, 8, 8]},
    "string": {"shape": "abc"},
    "floats": {"shape": [1.5, 1, 8, 8]},
    "huge": {"shape": [10**12, 1, 8, 8]},
    "unknown-kind": {"shape": [1, 1, 8, 8], "kind": "bogus"},
    "not-an-object": "1,1,8,8",
}


@pytest.mark.parametrize("recorded", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_malformed_recorded_inputs_fail_cleanly_when_used(model_dir, recorded, capsys):
    edit_manifest(model_dir, input=recorded)
    with time_limit(60):
        code, _, err = run_cli(["analyze", model_dir, "--no-latency"], capsys)
    assert_one_line_error(code, err)


# ---- A6: the weights' dtypes and shapes must match the manifest ------------------------------------

def rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def test_a_tensor_stored_in_another_dtype_than_the_manifest_says_is_refused(model_dir):
    assert read_manifest(model_dir)["tensors"]["classifier.0.weight"]["dtype"] == "float32"
    rewrite_weights(model_dir, lambda t: t.update({"classifier.0.weight": t["classifier.0.weight"].half()}))
    refused(lambda: secateurs.load(model_dir), "float16")  # the error names the dtype found


def test_weights_stored_as_int64_are_refused(model_dir):
    def to_int64(tensors):
        for name, t in tensors.items():
            tensors[name] = t.to(torch.int64)

    rewrite_weights(model_dir, to_int64)
    refused(lambda: secateurs.load(model_dir), "int64")


def test_a_tensor_of_another_shape_in_the_weights_file_is_refused(model_dir):
    rewrite_weights(model_dir, lambda t: t.update({"classifier.0.bias": t["classifier.0.bias"][:5].clone()}))
    refused(lambda: secateurs.load(model_dir))


def test_a_manifest_shape_that_disagrees_with_the_weights_file_is_refused(model_dir):
    def shrink(manifest):
        manifest["tensors"]["classifier.0.bias"]["shape"] = [5]

    edit_manifest(model_dir, shrink)
    refused(lambda: secateurs.load(model_dir))
