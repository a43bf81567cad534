"""HTML reports: self-contained pages, checked as files and in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import pytest

from conftest import needs
from secateurs.cli import main

pytestmark = needs("matplotlib")

CNN = ["secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A channel-pruned model written with --report, and a sensitivity scan of it."""
    root = tmp_path_factory.mktemp("reports")
    assert main(["prune", *CNN, "--method", "channel", "--ratio", "0.5", "--no-latency", "--report",
                 "--out", str(root / "channel")]) == 0
    assert main(["prune", *CNN, "--method", "unstructured", "--sparsity", "0.7", "--no-latency",
                 "--out", str(root / "sparse")]) == 0
    assert main(["sensitivity", *CNN, "--data", "digits", "--ratios", "0.5,0.9", "--calib-batches", "1",
                 "--out", str(root / "sens.json")]) == 0
    assert main(["report", str(root / "sparse"), "--sensitivity", str(root / "sens.json")]) == 0
    assert main(["prune", *CNN, "--method", "channel", "--target-macs", "0.5", "--allocate", "sensitivity",
                 "--data", "digits", "--calib-batches", "1", "--no-latency", "--report",
                 "--out", str(root / "allocated")]) == 0
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_page_is_self_contained_with_decodable_charts(reports):
    from PIL import Image

    for name, expected_images in (("channel", 4), ("sparse", 4)):
        page = (reports / name / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>")
        assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing to fetch or run
        images = _images(page)
        assert len(images) >= expected_images
        for png in images:
            with Image.open(io.BytesIO(png)) as im:
                im.verify()  # a complete, valid PNG
        assert "How it was made" in page and "secateurs prune" in page  # the exact command
    channel = (reports / "channel" / "report.html").read_text()
    assert "Pruning plan" in channel and "importance distribution" in channel
    assert "Sensitivity" in (reports / "sparse" / "report.html").read_text()
    assert "Sensitivity" in (reports / "allocated" / "report.html").read_text()  # the curves behind the allocation
    assert "Sensitivity" not in channel


def test_report_command_errors(tmp_path, capsys, reports):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no report.json" in capsys.readouterr().err
    model = reports / "channel"
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    for name in ("secateurs.json", "model.safetensors", "report.json"):  # never over the model's own files
        assert main(["report", str(model), "--out", str(model / name), "--overwrite"]) == 2
        assert "model's own files" in capsys.readouterr().err
    not_a_scan = ["report", str(model), "--out", str(tmp_path / "r.html"), "--sensitivity", str(model / "report.json")]
    assert main(not_a_scan) == 2
    assert "not a sensitivity scan" in capsys.readouterr().err
    (tmp_path / "dir.html").mkdir()
    assert main(["report", str(model), "--out", str(tmp_path / "dir.html"), "--overwrite"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_layer_pruning_report_follows_the_renumbered_blocks(tmp_path):
    from secateurs.surgery.layers import name_after_drop

    assert name_after_drop("stage3.2.conv1", ["stage2.0", "stage3.0", "stage3.1"]) == "stage3.0.conv1"
    assert name_after_drop("stage3.1.conv1", ["stage3.1"]) is None
    assert name_after_drop("head.fc", ["stage3.1"]) == "head.fc"
    out = tmp_path / "layers"
    assert main(["prune", "secateurs.zoo:SmallResNet", "--input-shape", "1,1,8,8", "--method", "layer",
                 "--layers", "3", "--no-latency", "--report", "--out", str(out)]) == 0
    result = json.loads((out / "report.json").read_text())
    dropped = result["pruning"]["plan"]["drop"]
    page = (out / "report.html").read_text()
    rows = dict(re.findall(r"<tr><td>([\w.]+)</td><td>[\dx]+</td><td>(removed|[\dx]+)</td>", page))
    removed = {name for name, after in rows.items() if after == "removed"}
    assert removed and removed == {n for n in rows if any(n.startswith(d + ".") for d in dropped)}


def test_report_json_records_the_command(reports):
    result = json.loads((reports / "channel" / "report.json").read_text())
    assert result["command"].startswith("secateurs prune secateurs.zoo:DigitsCNN")
    assert result["pruning"]["importance"]["criterion"] == "l2"


def _chromium() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser")), shutil.which("chromedriver")


@needs("selenium")
@pytest.mark.skipif(None in _chromium(), reason="Chromium and chromedriver are not installed "
                    "(Debian: apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(reports):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        for name in ("channel", "sparse"):
            driver.get((reports / name / "report.html").as_uri())
            decoded = driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "Promise.all(Array.from(document.images).map(i => i.decode().then(() => [i.naturalWidth, "
                "i.naturalHeight], () => [0, 0]))).then(done);")
            assert len(decoded) >= 4 and all(w > 0 and h > 0 for w, h in decoded), decoded
            errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
            assert errors == [], errors
            assert driver.find_element("tag name", "h1").text.startswith("secateurs:")
    finally:
        driver.quit()
