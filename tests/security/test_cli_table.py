"""Table-driven bad input for the CLI.

Every case: exit status 2, exactly one ``secateurs: error:`` line on stderr and no
traceback, nothing written at ``--out`` (or anywhere else in the test folder), and
the input files byte-identical before and after.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from security_helpers import (
    MANIFEST,
    WEIGHTS,
    assert_one_line_error,
    edit_manifest,
    new_entries,
    run_cli,
    saved_model,
    tree_digest,
)

from conftest import has
from secateurs.zoo import DigitsCNN

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class PickledPayload:
    """Unpickling this runs ``touch PWNED`` in the current directory."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@dataclass
class Case:
    id: str
    build: Callable[[Path], list]  # makes the inputs under the test folder, returns argv
    needs: tuple[str, ...] = ()
    needs_permissions: bool = False  # root ignores file permissions


def model(tmp: Path) -> Path:
    return saved_model(tmp / "m")


def prune(spec, tmp: Path, *extra) -> list:
    return ["prune", spec, "--method", "unstructured", "--sparsity", "0.5", "--no-latency", *extra,
            *([] if "--out" in extra else ["--out", tmp / "out"])]


def finetune(spec, tmp: Path, *extra) -> list:
    return ["finetune", spec, "--data", "digits", "--epochs", "1", "--batch-size", "256", *extra,
            *([] if "--out" in extra else ["--out", tmp / "out"])]


def read_only(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def corrupt_manifest(tmp: Path) -> list:
    (model(tmp) / MANIFEST).write_text('{"format": "secateurs", "format_version": 1, "source": {')
    return ["analyze", tmp / "m", "--no-latency"]


def truncated_weights(tmp: Path) -> list:
    weights = model(tmp) / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["analyze", tmp / "m", "--no-latency"]


def format_version_99(tmp: Path) -> list:
    edit_manifest(model(tmp), format_version=99)
    return ["analyze", tmp / "m", "--no-latency"]


def out_is_a_file(tmp: Path) -> list:
    return prune(model(tmp), tmp, "--out", a_file(tmp), "--overwrite")


def a_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("my notes\n")
    return tmp / "notes.txt"


def pickled_model(tmp: Path) -> list:
    torch.save(DigitsCNN(), tmp / "whole.pt")
    return prune(tmp / "whole.pt", tmp)


def pickled_payload(tmp: Path) -> list:
    torch.save({"conv.weight": torch.zeros(3), "extra": PickledPayload()}, tmp / "evil.pt")
    return ["analyze", tmp / "evil.pt", "--arch", "secateurs.zoo:DigitsCNN", "--no-latency"]


def report_folder(report: object) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        saved_model(tmp / "m", extra_files={"report.json": json.dumps(report).encode()})
        return ["report", tmp / "m"]

    return build


def tiny_llama_folder(tmp: Path) -> Path:
    from transformers import LlamaConfig

    folder = tmp / "llama"
    LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def hf_pickled_weights(tmp: Path) -> list:
    folder = tiny_llama_folder(tmp)
    torch.save({"model.embed_tokens.weight": torch.zeros(32, 8), "extra": PickledPayload()},
               folder / "pytorch_model.bin")
    return ["analyze", f"hf:{folder}", "--no-latency"]


def hf_truncated_safetensors(tmp: Path) -> list:
    folder = tiny_llama_folder(tmp)
    (folder / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return ["analyze", f"hf:{folder}", "--no-latency"]


def gguf_file(content: bytes) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        (tmp / "x.gguf").write_bytes(content)
        return ["analyze", "hf:x.gguf", "--no-latency"]  # relative: the test runs in tmp

    return build


CASES = [
    Case("unknown-spec", lambda t: ["analyze", "nosuchthing", "--no-latency"]),
    Case("missing-folder", lambda t: ["analyze", t / "missing", "--no-latency"]),
    Case("corrupt-manifest-json", corrupt_manifest),
    Case("truncated-safetensors", truncated_weights),
    Case("format-version-99", format_version_99),
    Case("out-equal-to-input", lambda t: prune(model(t), t, "--out", t / "m", "--overwrite")),
    Case("out-inside-input", lambda t: prune(model(t), t, "--out", t / "m" / "sub", "--overwrite")),
    Case("out-is-a-file", out_is_a_file),
    Case("sparsity-1.5", lambda t: ["prune", model(t), "--method", "unstructured", "--sparsity", "1.5",
                                    "--out", t / "out"]),
    Case("nm-4:2", lambda t: ["prune", model(t), "--method", "nm", "--nm", "4:2", "--out", t / "out"]),
    Case("input-shape-0,1", lambda t: ["analyze", model(t), "--input-shape", "0,1", "--no-latency"]),
    Case("input-shape-abc", lambda t: ["analyze", model(t), "--input-shape", "abc", "--no-latency"]),
    Case("pickled-model-without-trust-pickle", pickled_model),
    Case("pickled-payload-as-weights", pickled_payload),
    Case("imagefolder-nonexistent", lambda t: prune(model(t), t, "--allocate", "sensitivity",
                                                    "--data", "imagefolder:/nonexistent"), needs=("sklearn",)),
    Case("checkpoint-dir-read-only", lambda t: finetune(model(t), t, "--checkpoint-dir", read_only(t / "ro") / "ck"),
         needs=("sklearn",), needs_permissions=True),
    Case("checkpoint-dir-under-a-file", lambda t: finetune(model(t), t, "--checkpoint-dir", a_file(t) / "ck"),
         needs=("sklearn",)),
    Case("out-under-a-file", lambda t: prune(model(t), t, "--out", a_file(t) / "out")),
    Case("out-in-read-only-folder", lambda t: prune(model(t), t, "--out", read_only(t / "ro") / "out"),
         needs_permissions=True),
    Case("report-wrong-types", report_folder({"method": 5, "before": "x", "after": [1], "config": 3})),
    Case("report-wrong-nested-types", report_folder({
        "method": "unstructured", "config": {"sparsity": "half"}, "seconds": "soon",
        "before": {"params": "many", "nonzero_params": None, "macs": [], "size_bytes": {}, "layers": 7},
        "after": {"params": -1, "nonzero_params": "x", "macs": None, "size_bytes": "big", "layers": [1, "a"]},
    })),
    Case("report-not-an-object", report_folder([1, 2, 3])),
    Case("hf-pickled-weights", hf_pickled_weights, needs=("transformers",)),
    Case("hf-truncated-safetensors", hf_truncated_safetensors, needs=("transformers",)),
    Case("gguf-random-bytes", gguf_file(bytes(range(7, 23))), needs=("transformers", "gguf")),
    Case("gguf-truncated-after-magic", gguf_file(b"GGUF\x03\x00\x00\x00\x05\x00"), needs=("transformers", "gguf")),
]


def _param(case: Case):
    marks = []
    missing = [m for m in case.needs if not has(m)]
    if missing:
        marks.append(pytest.mark.skip(reason=f"optional package '{missing[0]}' is not installed"))
    if case.needs_permissions and IS_ROOT:
        marks.append(pytest.mark.skip(reason="running as root: file permissions are not enforced"))
    return pytest.param(case, id=case.id, marks=marks)


def _restore_permissions(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)


def _out_of(argv: list[str]) -> Path | None:
    return Path(argv[argv.index("--out") + 1]) if "--out" in argv else None


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case: Case, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative specs resolve here; a PWNED payload would land here
    try:
        argv = [str(a) for a in case.build(work)]
        out = _out_of(argv)
        out_existed = out is not None and (out.exists() or out.is_symlink())
        before = {p.name: tree_digest(p) for p in work.iterdir()}

        code, stdout, err = run_cli(argv, capsys)

        assert_one_line_error(code, err)
        assert stdout == "", stdout[-300:]
        if out is not None and not out_existed:
            assert not out.exists() and not out.is_symlink(), f"--out {out} was written"
        after = {name: tree_digest(work / name) for name in before}
        changed = [name for name in before if after[name] != before[name]]
        assert changed == [], f"inputs changed: {changed}"
        assert new_entries(work, set(before)) == [], "something was written next to the inputs"
    finally:
        _restore_permissions(work)
