"""Bad input found by an attacker-style trial: each ends in one clear line (or a warning), never a traceback."""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs
from secateurs import SecateursError
from secateurs.cli import main

CNN = "secateurs.zoo:DigitsCNN"


def one_error_line(capsys) -> str:
    """The CLI's stderr: exactly one ``secateurs: error:`` line, and nothing else."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateurs: error:"), err
    return lines[0]


# 1. MAC counting on a model that hands a parameter's view to a child module (timm's PiT)


class _Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, cls = pair
        return self.fc(x) + cls, cls


class _ClsTokenModel(nn.Module):
    """``cls_token.expand(...)`` under no_grad is a view that requires grad but has no grad_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.stage = _Stage()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.stage((x, self.cls_token.expand(x.shape[0], -1, -1)))
        return x


def test_macs_count_a_parameter_view_passed_to_a_child_module():
    model = _ClsTokenModel()
    stats = secateurs.analyze(model, torch.randn(2, 3, 4), latency=False, size=False)
    assert stats.macs == 2 * 3 * 4 * 4  # the Linear: batch x tokens x in x out
    assert all(p.requires_grad for p in model.parameters())  # restored after counting


@pytest.mark.slow
@needs("timm")
def test_analyze_timm_pit_counts_macs(capsys):
    assert main(["analyze", "timm:pit_s_224", "--no-latency", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["macs"] > 2e9  # PiT-S: about 2.9 GMACs at 224x224


# 2. a pruned width the transformers config validation rejects


@needs("transformers")
def test_channel_pruning_a_width_the_hf_config_rejects_is_reported(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    model = secateurs.load_model(f"hf:{tmp_path / 'llama'}")
    x = secateurs.example_inputs(model)
    # 10% of 64 leaves a hidden size of 58, which LlamaConfig refuses (not a multiple of 4 heads). By default
    # widths are chosen among those the config accepts (60 here); include asks for this one group as it is
    report = secateurs.prune_(model, secateurs.Channels(ratio=0.1, include=["model.embed_tokens"]), example_inputs=x)
    assert model.model.embed_tokens.weight.shape[1] == 58
    assert model.config.hidden_size == 64  # left as it was, and said so
    assert "round_to" in report.skipped["config"] and "secateurs.save" in report.skipped["config"]
    assert model(x).logits.shape == (1, x.shape[1], 128)


# 3. a --round-to larger than the layers: nothing can be cut


def test_round_to_larger_than_every_layer_warns(cnn, digits_input, caplog):
    with caplog.at_level(logging.WARNING, logger="secateurs"):
        report = secateurs.prune_(cnn, secateurs.Channels(ratio=0.5, round_to=100000), example_inputs=digits_input)
    assert report.outcome["achieved_ratio"] == 0.0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "round_to 100000" in warning and "lower --round-to" in warning


# 4. NaN / inf weights


def _nan_model() -> nn.Module:
    from secateurs.zoo import DigitsCNN

    model = DigitsCNN()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
        model.classifier[0].bias[0] = float("inf")
    return model


def test_prune_refuses_nonfinite_weights_unless_allowed(digits_input):
    with pytest.raises(SecateursError, match=r"weights of 'features.0.weight', 'classifier.0.bias' contain NaN/inf"
                       r".*allow_nonfinite=True \(CLI: --allow-nonfinite\)"):
        secateurs.prune_(_nan_model(), secateurs.Unstructured(sparsity=0.5))
    report = secateurs.prune_(_nan_model(), secateurs.Unstructured(sparsity=0.5, allow_nonfinite=True))
    assert report.sparsity > 0.4


def test_cli_prune_refuses_nonfinite_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file(_nan_model().state_dict(), str(tmp_path / "nan.safetensors"))
    argv = ["prune", str(tmp_path / "nan.safetensors"), "--arch", CNN, "--input-shape", "1,1,8,8",
            "--method", "unstructured", "--sparsity", "0.5", "--no-latency", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # analyze's warning may come first; the run ends with one error line and writes nothing
    assert err[-1].startswith("secateurs: error: weights of") and "--allow-nonfinite" in err[-1]
    assert not any("Traceback" in line for line in err) and not (tmp_path / "out").exists()
    assert main([*argv, "--allow-nonfinite"]) == 0
    assert (tmp_path / "out" / "report.json").is_file()


def test_analyze_warns_about_nonfinite_weights(digits_input, caplog):
    with caplog.at_level(logging.WARNING, logger="secateurs"):
        stats = secateurs.analyze(_nan_model(), digits_input, latency=False, size=False)
    assert stats.params > 0
    assert any("contain NaN/inf" in r.getMessage() and "features.0.weight" in r.getMessage() for r in caplog.records)


# 5. integer tensors for floating-point parameters


def test_state_dict_with_int64_weights_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from secateurs.zoo import DigitsCNN

    state = {k: (v * 100).to(torch.int64) if v.is_floating_point() else v for k, v in DigitsCNN().state_dict().items()}
    save_file(state, str(tmp_path / "ints.safetensors"))
    assert main(["analyze", str(tmp_path / "ints.safetensors"), "--arch", CNN, "--no-latency"]) == 2
    line = one_error_line(capsys)
    assert "as int64" in line and "floating-point" in line and "ints.safetensors" in line


# 6. a huge --input-shape


def test_huge_input_shape_is_refused(capsys):
    assert main(["analyze", CNN, "--input-shape", "100000,1,1000,1000", "--no-latency"]) == 2
    line = one_error_line(capsys)
    assert "100,000,000,000 elements" in line and "--input-shape" in line


def test_example_input_allocation_failure_is_one_line(cnn, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000 bytes")

    monkeypatch.setattr(torch, "randn", out_of_memory)
    with pytest.raises(SecateursError, match=r"cannot allocate an example input of shape 1,1,1000,1000 .*"
                       r"pass a smaller --input-shape"):
        secateurs.example_inputs(cnn, "1,1,1000,1000")


# 7. decompression bombs in an image folder


def _png(path: Path, side: int) -> None:
    """A valid black 1-bit PNG of side x side pixels, written row by row (a 30000 px one is about 100 KiB)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then 8 pixels a byte
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@needs("torchvision")
def test_decompression_bomb_in_image_folder_names_the_file(tmp_path):
    from secateurs.data import batches

    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "bomb.png", 30000)  # 900 million pixels, over PIL's limit
    with pytest.raises(SecateursError, match=r"image '.*bomb.png' is too large to decode .*remove or shrink"):
        batches(f"imagefolder:{tmp_path}", input_shape=[1, 1, 8, 8])


@needs("torchvision")
def test_image_over_pils_warning_limit_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from secateurs.data import batches

    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "big.png", 12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: PIL only warns up to twice the limit
    with pytest.raises(SecateursError, match=r"image '.*big.png' is too large to decode"):
        batches(f"imagefolder:{tmp_path}", input_shape=[1, 1, 8, 8])


# 8. report.json with the wrong types


@pytest.mark.parametrize("edit, field", [
    ({"before": 5}, '"before" should be an object, got int'),
    ({"after": "x"}, '"after" should be an object, got string'),
    ({"before": {"layers": "conv1"}}, '"before.layers" should be a list, got string'),
    ({"pruning": {"layers": [{"name": "g", "numel": "8", "zeros": 4, "sparsity": 0.5}]}},
     '"pruning.layers[0].numel" should be a number'),
])
def test_report_with_wrong_types_is_one_line(tmp_path, edit, field):
    from secateurs.report.html import write_report

    result = {"method": "channel", "before": {"params": 10, "layers": []}, "after": {"params": 5}} | edit
    (tmp_path / "report.json").write_text(json.dumps(result))
    with pytest.raises(SecateursError, match=rf"is not a secateurs report \({re.escape(field)}.*re-run the command"):
        write_report(tmp_path, tmp_path / "page.html")
    assert not (tmp_path / "page.html").exists()


# 9. a truncated .gguf file


@needs("transformers")
@needs("gguf")
def test_truncated_gguf_is_one_line(tmp_path, capsys):
    key = b"general.architecture"
    # magic, version 3, no tensors, 5 metadata entries, then the first key's length and half of it
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + struct.pack("<Q", len(key)) + key[:10]
    (tmp_path / "cut.gguf").write_bytes(head)
    assert main(["analyze", f"hf:{tmp_path / 'cut.gguf'}", "--no-latency"]) == 2
    line = one_error_line(capsys)
    assert "cut.gguf" in line and "truncated or damaged" in line
