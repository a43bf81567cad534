"""Holes an adversarial review found after the first round, each closed and kept closed here."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import pytest
import torch
from security_helpers import (  # noqa: F401 - fixtures, used by name
    assert_one_line_error,
    edit_manifest,
    model_dir_fixture,
    no_network_fixture,
    refused,
    run_cli,
    saved_model,
    tree_digest,
)
from test_cli_table import tiny_llama_folder

import secateurs
from conftest import needs
from secateurs.zoo import DigitsCNN

# ---- configs that make a transformers constructor fetch or read ------------------------------------

TIMM_WRAPPER_CONFIGS = {
    "hub-architecture": {"architecture": "hf-hub:timm/resnet18.a1_in1k"},
    "local-dir": {"architecture": "local-dir:/etc"},
    "checkpoint-in-model-args": {"architecture": "resnet18", "model_args": {"checkpoint_path": "/etc/passwd"}},
}


@needs("transformers")
@pytest.mark.parametrize("extra", TIMM_WRAPPER_CONFIGS.values(), ids=TIMM_WRAPPER_CONFIGS.keys())
def test_timm_wrapper_configs_that_fetch_or_read_are_refused(model_dir, no_network, extra):
    edit_manifest(model_dir, source={"kind": "hf", "class": "TimmWrapperModel",
                                     "config": {"model_type": "timm_wrapper", **extra}})
    refused(lambda: secateurs.load(model_dir), "trust_code")


@needs("transformers")
def test_a_transformers_folder_asking_for_a_hub_backbone_is_refused(tmp_path, no_network, capsys):
    folder = tmp_path / "tw"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "timm_wrapper", "architectures": ["TimmWrapperModel"],
                                                    "architecture": "hf-hub:timm/resnet18.a1_in1k"}))
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "--trust-code")


@needs("transformers")
def test_pretrained_backbone_flags_are_refused(model_dir, no_network):
    edit_manifest(model_dir, source={"kind": "hf", "class": "DetrModel",
                                     "config": {"model_type": "detr", "use_pretrained_backbone": True}})
    refused(lambda: secateurs.load(model_dir), "pretrained")


@needs("transformers")
@pytest.mark.parametrize("value", [{"": "sdpa"}, ["x"], "kernels-community/flash-attn"], ids=["dict", "list", "hub"])
def test_odd_attention_implementations_are_refused(model_dir, value):
    edit_manifest(model_dir, source={"kind": "hf", "class": "LlamaModel",
                                     "config": {"model_type": "llama", "attn_implementation": value}})
    refused(lambda: secateurs.load(model_dir), "attention implementation")


# ---- sizes: module counts before any tensor exists --------------------------------------------------

@needs("transformers")
def test_millions_of_layers_in_a_manifest_config_are_refused_quickly(model_dir):
    edit_manifest(model_dir, source={"kind": "hf", "class": "LlamaModel",
                                     "config": {"model_type": "llama", "num_hidden_layers": 2_000_000,
                                                "hidden_size": 8, "intermediate_size": 8,
                                                "num_attention_heads": 2, "vocab_size": 8}})
    start = time.perf_counter()
    refused(lambda: secateurs.load(model_dir), "modules")
    assert time.perf_counter() - start < 20


@needs("timm")
def test_millions_of_blocks_through_constructor_options_are_refused(model_dir):
    edit_manifest(model_dir, source={"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"depth": 2_000_000}})
    refused(lambda: secateurs.load(model_dir), "modules")


@needs("transformers")
def test_millions_of_layers_in_a_transformers_folder_are_refused(tmp_path, capsys):
    folder = tiny_llama_folder(tmp_path)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(32, 8)}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5_000_000}))
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "modules")


def test_plan_attributes_may_only_shrink(tmp_path):
    model = DigitsCNN()
    secateurs.prune_(model, secateurs.Channels(ratio=0.5), example_inputs=torch.randn(1, 1, 8, 8))
    secateurs.save(model, tmp_path / "c")

    def grow(manifest):
        manifest["structure"][0]["attrs"]["features.10"] = {"output_size": 3000}  # AdaptiveAvgPool2d

    edit_manifest(tmp_path / "c", grow)
    refused(lambda: secateurs.load(tmp_path / "c"), "smaller")


# ---- transformers folders read only their own files -------------------------------------------------

@needs("transformers")
def test_a_weight_map_pointing_outside_the_folder_is_refused(tmp_path, capsys):
    folder = tiny_llama_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}}))
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "not a file name inside it")


@needs("transformers")
def test_a_symlinked_weights_file_is_refused_outside_the_hub_cache_layout(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tiny_llama_folder(tmp_path)
    real = tmp_path / "real.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(32, 8)}, str(real))
    (folder / "model.safetensors").symlink_to(real)
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "symlink")


@needs("transformers")
def test_custom_code_in_a_transformers_folder_is_never_run(tmp_path, capsys):
    pkg = f"evil_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "rc"
    folder.mkdir()
    sentinel = tmp_path / "RAN"
    (folder / f"{pkg}.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    (folder / "config.json").write_text(json.dumps({"model_type": pkg, "auto_map": {"AutoModel": f"{pkg}.Net",
                                                                                 "AutoConfig": f"{pkg}.Cfg"}}))
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert not sentinel.exists() and pkg not in sys.modules


# ---- outputs ----------------------------------------------------------------------------------------

def test_finetune_refuses_a_checkpoint_it_did_not_write(model_dir, tmp_path, capsys):
    ckpt = tmp_path / "f.ckpt"
    ckpt.mkdir()
    torch.save({"mine": 1}, ckpt / "last.pt")
    before = tree_digest(ckpt)
    code, _, err = run_cli(["finetune", model_dir, "--data", "digits", "--epochs", "1", "--out", tmp_path / "f"],
                           capsys)
    assert_one_line_error(code, err, "--resume")
    assert tree_digest(ckpt) == before and not (tmp_path / "f").exists()


def test_sensitivity_never_writes_its_csv_or_png_over_an_input(model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("precious")
    code, _, err = run_cli(["sensitivity", model_dir, "--data", f"text:{corpus}", "--out", tmp_path / "corpus.json",
                            "--overwrite"], capsys)
    assert_one_line_error(code, err, "corpus.csv")
    assert corpus.read_text() == "precious"


def test_an_output_inside_the_input_is_refused_before_anything_is_created(model_dir, capsys):
    before = tree_digest(model_dir)
    code, _, err = run_cli(["prune", model_dir, "--method", "unstructured", "--sparsity", "0.5",
                            "--out", model_dir / "sub" / "x"], capsys)
    assert_one_line_error(code, err, "input model")
    assert tree_digest(model_dir) == before  # not even a lock file or a parent folder came and went


def test_a_symlinked_out_is_refused(model_dir, tmp_path, capsys):
    target = saved_model(tmp_path / "target", seed=1)
    (tmp_path / "link").symlink_to(target)
    before = tree_digest(target)
    code, _, err = run_cli(["prune", model_dir, "--method", "unstructured", "--sparsity", "0.5",
                            "--out", tmp_path / "link", "--overwrite"], capsys)
    assert_one_line_error(code, err, "symlink")
    assert tree_digest(target) == before


# ---- odd environments and records: one line, exit 2 ------------------------------------------------

def test_a_rank_that_is_not_a_number_is_one_line(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "abc")
    code, _, err = run_cli(["prune", model_dir, "--method", "unstructured", "--sparsity", "0.5",
                            "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "RANK")


def test_an_integer_of_thousands_of_digits_in_the_manifest_is_one_line(model_dir):
    text = (model_dir / "secateurs.json").read_text().replace('"format_version": 1', '"format_version": ' + "9" * 5000)
    (model_dir / "secateurs.json").write_text(text)
    refused(lambda: secateurs.load(model_dir), "not valid JSON")


def test_token_ids_recorded_for_a_cnn_are_one_line(model_dir, capsys):
    edit_manifest(model_dir, input={"shape": [1, 1, 8, 8], "kind": "tokens"})
    code, _, err = run_cli(["analyze", model_dir, "--no-latency"], capsys)
    assert_one_line_error(code, err, "--input-shape")


@needs("transformers")
def test_a_damaged_tokenizer_config_does_not_fail_the_prune_at_its_end(tmp_path, capsys):
    folder = saved_model(tmp_path / "bt")
    (folder / "tokenizer_config.json").write_text("[]")
    code, _, err = run_cli(["prune", folder, "--method", "unstructured", "--sparsity", "0.5", "--no-latency",
                            "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert not (tmp_path / "o" / "tokenizer_config.json").exists()


def test_a_zero_width_in_a_manifest_is_exactly_one_line(model_dir, capsys):
    edit_manifest(model_dir, source={"kind": "factory", "target": "secateurs.zoo:DigitsCNN", "kwargs": {"width": 0}})
    code, _, err = run_cli(["analyze", model_dir, "--no-latency"], capsys)
    assert_one_line_error(code, err)


def test_the_offline_guard_restores_the_environment():
    from secateurs.io.policy import offline

    before = os.environ.get("HF_HUB_OFFLINE")
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ.get("HF_HUB_OFFLINE") == before


# ---- second review ----------------------------------------------------------------------------------

@needs("transformers")
def test_a_config_far_larger_than_the_weight_files_is_refused_before_allocating(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tiny_llama_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 2_000_000, "hidden_size": 1024,
                                                    "num_attention_heads": 8, "num_key_value_heads": 8}))
    save_file({"model.norm.weight": torch.ones(1024)}, str(folder / "model.safetensors"))
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--input-shape", "1,8", "--no-latency"], capsys)
    assert_one_line_error(code, err, "asks for")


@needs("transformers")
def test_pickle_free_bin_weights_outside_the_folder_are_refused(tmp_path, capsys):
    folder = tiny_llama_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(32, 8)}, outside / "secret.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../outside/secret.bin"}}))
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "not a file name inside it")
    (folder / "pytorch_model.bin.index.json").unlink()
    (folder / "pytorch_model.bin").symlink_to(outside / "secret.bin")
    code, _, err = run_cli(["analyze", f"hf:{folder}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "symlink")


@needs("transformers")
def test_a_fake_hub_cache_whose_blobs_is_a_link_does_not_open_the_symlink_door(tmp_path, capsys):
    from safetensors.torch import save_file

    rev = tmp_path / "evil" / "snapshots" / "rev"
    rev.parent.mkdir(parents=True)
    tiny_llama_folder(tmp_path).rename(rev)
    (tmp_path / "evil" / "blobs").symlink_to("/")
    save_file({"model.embed_tokens.weight": torch.zeros(32, 8)}, str(tmp_path / "real.safetensors"))
    (rev / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    code, _, err = run_cli(["analyze", f"hf:{rev}", "--no-latency"], capsys)
    assert_one_line_error(code, err, "symlink")


@needs("torchvision")
def test_an_image_folder_with_a_symlink_loop_is_refused_at_once(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / cls / "x.png")
    (tmp_path / "imgs" / "a" / "up").symlink_to("..")
    with __import__("security_helpers").time_limit(30):
        code, _, err = run_cli(["eval", "secateurs.zoo:DigitsCNN", "--data", f"imagefolder:{tmp_path / 'imgs'}",
                                "--input-shape", "1,1,8,8"], capsys)
    assert_one_line_error(code, err, "symlinked folder")


def test_a_weights_file_with_non_string_keys_is_one_line(tmp_path, capsys):
    torch.save({1: torch.ones(1)}, tmp_path / "w.pt")
    code, _, err = run_cli(["analyze", "secateurs.zoo:DigitsCNN", "--weights", tmp_path / "w.pt",
                            "--input-shape", "1,1,8,8", "--no-latency"], capsys)
    assert_one_line_error(code, err, "state dict")
