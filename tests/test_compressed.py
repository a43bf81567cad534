"""Prune + quantize into compressed-tensors folders: read back by compressed-tensors itself, by stock
transformers in a process without secateurs, and by secateurs.load (masks restored)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import secateurs
from conftest import needs, stock_outputs
from secateurs import NM, Unstructured
from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.io.compressed import Quantization
from secateurs.masks import effective_state_dict, masked_tensors

pytestmark = [needs("transformers"), needs("compressed_tensors")]

VOCAB = 96
PRUNINGS = {"unstructured": Unstructured(sparsity=0.5), "2:4": NM(n=2, m=4)}
QUANTS = {"int8": Quantization("int8"), "int4": Quantization("int4", group_size=32)}


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


X = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each pruning x each quantization saved, plus the dense transformers folder of each pruned model."""
    root = tmp_path_factory.mktemp("ct")
    dense = tiny_llama()
    out = {}
    for pname, config in PRUNINGS.items():
        model = copy.deepcopy(dense)
        secateurs.prune_(model, config, example_inputs=X)
        secateurs.save(model, root / f"{pname}-dense", layout="transformers")
        for qname, quant in QUANTS.items():
            folder = root / f"{pname}-{qname}"
            size = secateurs.save(model, folder, layout="compressed-tensors", quantize=quant.scheme,
                                  group_size=quant.group_size)
            out[pname, qname] = {"model": model, "folder": folder, "size": size, "quant": quant,
                                 "dense_folder": root / f"{pname}-dense"}
    return out


def ct_decompress(folder):
    """The folder's weights decompressed by compressed-tensors alone (its model-free API), by name."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(block)
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
    stored = load_file(str(folder / "model.safetensors"))
    packed = {k.rsplit(".", 1)[0] for k in stored if k.endswith(".weight_packed")}
    dense = {k: v for k, v in stored.items() if k.rsplit(".", 1)[0] not in packed}
    for prefix in packed:
        local = {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + ".")}
        dense[prefix + ".weight"] = compressor.decompress(local, scheme)["weight"]
    return dense, block, stored


@pytest.mark.parametrize("pname", PRUNINGS)
@pytest.mark.parametrize("qname", QUANTS)
def test_folder_is_compressed_tensors_and_dequantizes_with_zeros_kept(saved, pname, qname):
    entry = saved[pname, qname]
    folder, model, quant = entry["folder"], entry["model"], entry["quant"]
    weights, block, stored = ct_decompress(folder)
    # the library's own config block, as llm-compressor writes it
    assert block["quant_method"] == "compressed-tensors" and block["format"] == "pack-quantized"
    args = block["config_groups"]["group_0"]["weights"]
    assert (args["num_bits"], args["symmetric"], args["group_size"]) == (quant.bits, True, quant.group_size)
    assert args["strategy"] == ("channel" if quant.group_size is None else "group")
    assert block["ignore"] == ["lm_head"]
    assert stored["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    state, masks = effective_state_dict(model)
    assert set(weights) == set(state) - {"lm_head.weight"}  # the head is tied to the embeddings
    for name, original in state.items():
        if name == "lm_head.weight":
            continue
        got = weights[name]
        assert got.shape == original.shape, name
        if name not in masks:  # embeddings, norms: stored as they were
            assert torch.equal(got, original), name
            continue
        mask = masks[name]
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask])), name  # pruned weights dequantize to 0
        scale = stored[name.removesuffix("weight") + "weight_scale"]
        per_weight = scale.repeat_interleave(quant.group_size, dim=1) if quant.group_size else scale
        assert bool(((got - original).abs() <= per_weight / 2 + 1e-6).all()), name  # round to nearest
        assert not torch.equal(got, original), name  # it really was quantized
    # smaller than the dense transformers folder of the same pruned model: int8 ~1/4, int4 ~1/8 of the Linears
    dense_size = (entry["dense_folder"] / "model.safetensors").stat().st_size
    assert entry["size"] == (folder / "model.safetensors").stat().st_size
    assert entry["size"] < (0.45 if qname == "int8" else 0.3) * dense_size


def test_int4_is_smaller_than_int8(saved):
    for pname in PRUNINGS:
        assert saved[pname, "int4"]["size"] < 0.75 * saved[pname, "int8"]["size"]


def test_stock_transformers_loads_every_folder_with_the_same_outputs(saved, tmp_path):
    out = stock_outputs(tmp_path, X, [str(e["folder"]) for e in saved.values()])
    for (_, qname), entry in saved.items():
        weights, _, _ = ct_decompress(entry["folder"])
        reference = copy.deepcopy(entry["model"])
        secateurs.finalize_(reference)
        reference.load_state_dict(weights, strict=False)  # lm_head stays tied to the embeddings
        with torch.no_grad():
            want = reference(X).logits
        folder = str(entry["folder"])
        assert torch.equal(out[folder + ":q_proj"], weights["model.layers.1.self_attn.q_proj.weight"]), folder
        torch.testing.assert_close(out[folder], want, msg=folder)
        with torch.no_grad():  # and close to the unquantized pruned model
            pruned = entry["model"](X).logits
        assert (out[folder] - pruned).abs().max() < (0.05 if qname == "int8" else 0.3), folder


def test_secateurs_load_dequantizes_and_restores_masks(saved):
    entry = saved["2:4", "int4"]
    model = secateurs.load(entry["folder"])
    weights, _, _ = ct_decompress(entry["folder"])
    state, masks = effective_state_dict(model)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    original_masks = effective_state_dict(entry["model"])[1]
    assert set(masks) == set(original_masks)
    for name, mask in masks.items():
        assert not bool((mask & ~original_masks[name]).any()), name  # nothing pruned came back
    assert "quantization_config" not in model.config.to_dict()
    assert len(model._secateurs_history) == len(getattr(entry["model"], "_secateurs_history", []))
    with torch.no_grad():
        assert model(X).logits.shape == (2, 12, VOCAB)


def test_the_model_itself_is_not_changed_by_saving(saved):
    model = saved["unstructured", "int8"]["model"]
    assert len(list(masked_tensors(model))) == 21  # 7 Linear layers x 3 decoder layers keep their masks
    assert model.model.layers[0].self_attn.q_proj.parametrizations.weight.original.dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama().save_pretrained(folder)
    return folder


def test_cli_prune_and_export_write_quantized_folders(tiny_folder, tmp_path, capsys):
    folder = tiny_folder
    out = tmp_path / "pruned-int4"
    assert main(["prune", f"hf:{folder}", "--method", "nm", "--nm", "2:4", "--no-latency", "--out", str(out),
                 "--save-format", "compressed-tensors", "--quantize", "int4", "--group-size", "64"]) == 0
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert json.loads((out / "secateurs.json").read_text())["layout"] == "compressed-tensors"
    assert (out / "report.json").is_file()
    # export: a saved transformers folder of a pruned model -> int8 compressed-tensors
    plain = tmp_path / "pruned"
    assert main(["prune", f"hf:{folder}", "--method", "unstructured", "--sparsity", "0.5", "--no-latency",
                 "--out", str(plain)]) == 0
    capsys.readouterr()
    exported = tmp_path / "exported"
    assert main(["export", str(plain), "--format", "compressed-tensors", "--quantize", "int8", "--out",
                 str(exported), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size_bytes"] == (exported / "model.safetensors").stat().st_size
    assert result["size_bytes"] < 0.45 * (plain / "model.safetensors").stat().st_size
    weights, block, _ = ct_decompress(exported)
    assert block["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    pruned = secateurs.load(plain)
    state, masks = effective_state_dict(pruned)
    for name, mask in masks.items():
        assert torch.equal(weights[name][~mask], torch.zeros_like(weights[name][~mask])), name
    assert main(["export", str(plain), "--format", "compressed-tensors", "--quantize", "int8", "--out",
                 str(exported)]) == 2  # not overwritten without --overwrite


BAD = {
    "quantize without compressed-tensors": (["--quantize", "int8"], "add --save-format compressed-tensors"),
    "compressed-tensors without quantize": (["--save-format", "compressed-tensors"], "no sparse-only format"),
    "group size without quantize": (["--save-format", "compressed-tensors", "--group-size", "32"],
                                    "also pass --quantize"),
    "group size that does not divide": (["--save-format", "compressed-tensors", "--quantize", "int4",
                                         "--group-size", "48"], "--group-size 32 fits every layer"),
    "unknown quantization": (["--save-format", "compressed-tensors", "--quantize", "int3"], "invalid choice"),
}


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_quantization_requests_exit_2_with_one_line(tiny_folder, tmp_path, capsys, case):
    folder = tiny_folder
    capsys.readouterr()
    flags, needle = BAD[case]
    out = tmp_path / "out"
    try:
        code = main(["prune", f"hf:{folder}", "--method", "unstructured", "--sparsity", "0.5", "--no-latency",
                     "--out", str(out), *flags])
    except SystemExit as exc:  # argparse's own refusals (a choice not offered)
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before anything was written


def test_cli_non_transformers_model_and_wrong_export_format_exit_2(tmp_path, capsys):
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "unstructured",
                 "--sparsity", "0.5", "--no-latency", "--out", str(tmp_path / "cnn"),
                 "--save-format", "compressed-tensors", "--quantize", "int8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a transformers model" in err and len(err.splitlines()) == 1, err
    code = main(["export", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--format", "onnx",
                 "--quantize", "int8", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pass --format compressed-tensors" in err and len(err.splitlines()) == 1, err


def test_api_refuses_what_compressed_tensors_cannot_hold(tmp_path):
    import transformers

    with pytest.raises(SecateursError, match="unknown quantization 'fp3'"):
        Quantization("fp3")
    with pytest.raises(SecateursError, match="not a positive whole number"):
        Quantization("int4", group_size=0)
    assert Quantization("int4").group_size == 128 and Quantization("int8").group_size is None
    # GPT-2's projections are transformers Conv1D layers, which compressed-tensors does not quantize
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                                                n_positions=16))
    with pytest.raises(SecateursError, match="Conv1D, which compressed-tensors cannot quantize"):
        secateurs.save(gpt2, tmp_path / "gpt2", layout="compressed-tensors", quantize="int8")
    with pytest.raises(SecateursError, match="no sparse-only format"):
        secateurs.save(tiny_llama(), tmp_path / "sparse-only", layout="compressed-tensors")
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "sparse-only").exists()


def test_docstring_examples():
    import doctest

    import secateurs.io.compressed as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
