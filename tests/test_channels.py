"""Structured channel pruning: graph, surgery, strategy, save/load, CLI."""

import copy
import json

import pytest
import torch
from torch import nn

import secateurs
from conftest import Mixed, SeedConvNet, assert_same_model, needs
from secateurs import Channels, SecateursError
from secateurs.cli import main
from secateurs.graph import build_graph
from secateurs.zoo import DigitsCNN


def _zero_channels(model: nn.Module, x: torch.Tensor, fraction: float) -> None:
    """Zero every tensor slice of the lowest-index ``fraction`` of each group's channels.

    Such channels contribute nothing, so removing them must not change the output.
    """
    graph = build_graph(model, x)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for group in graph.groups:
            k = int(fraction * group.size)
            for member in group.members:
                t = tensors[member.tensor]
                for idx in group.indices[member][:k]:
                    t.index_fill_(member.dim, idx, 0.0)


def _equivalence(model: nn.Module, x: torch.Tensor, fraction: float = 0.25) -> None:
    model.eval()
    _zero_channels(model, x, fraction)
    with torch.no_grad():
        before = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, Channels(ratio=fraction, importance="l1", reduction="max"), example_inputs=x)
    with torch.no_grad():
        after = model(x)
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert sum(layer.zeros for layer in report.layers) > 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_equivalence_on_a_net_with_residuals_concat_chunk_groups_and_shuffle():
    torch.manual_seed(0)
    _equivalence(Mixed(group_stats=False), torch.randn(2, 3, 8, 8))


def test_grouping_after_a_hash_collision_is_the_same(monkeypatch):
    """Channel roots are bucketed by a hash; if the check after it fails, the exact loop decides."""
    from secateurs.graph import groups

    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    expected = build_graph(model, x)
    real_unique = torch.unique

    def colliding(t, *args, **kwargs):  # every root in one bucket: the check must fail
        out, inverse = real_unique(t, *args, **kwargs)
        return out[:1], torch.zeros_like(inverse)

    monkeypatch.setattr(groups.torch, "unique", colliding)
    got = build_graph(model, x)
    assert [(g.size, g.members, g.roots) for g in got.groups] == [
        (g.size, g.members, g.roots) for g in expected.groups]
    for a, b in zip(got.groups, expected.groups, strict=True):
        assert all(torch.equal(a.indices[m], b.indices[m]) for m in a.members)


@pytest.mark.parametrize("groups", [1, 2])
def test_equivalence_through_transposed_convolutions(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 8, 3, stride=2, output_padding=1, groups=groups), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, padding=1, groups=groups), nn.Conv2d(8, 2, 1))
    graph = build_graph(model.eval(), torch.randn(2, 3, 9, 9))
    assert not graph.unknown_calls and len(graph.groups) == 3
    _equivalence(model, torch.randn(2, 3, 9, 9))
    assert model[3].in_channels == 6 and model[3].out_channels == model[3].weight.shape[1] * groups
    assert model[3].groups == groups and model[6].in_channels == model[3].out_channels


def test_group_and_layer_norm_nets_prune_consistently():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert model.grouped[1].num_channels % model.grouped[1].num_groups == 0
    assert model.head[3].normalized_shape == (16,) and model.head[2].out_features == 16
    assert model(x).shape == (2, 5)


def test_equivalence_on_the_digits_cnn(cnn, digits_input):
    _equivalence(cnn, digits_input, 0.5)


@needs("torchvision")
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5",
                                  "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d", "squeezenet1_1",
                                  "mnasnet0_5", "vgg11_bn"])
def test_equivalence_on_torchvision_models(name):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name)
    _equivalence(model, torch.randn(1, 3, 64, 64))


@needs("torchvision")
@pytest.mark.parametrize("name", ["convnext_tiny", "mobilenet_v3_small", "efficientnet_v2_s"])
def test_layer_norm_models_prune_and_run(name):
    """LayerNorm statistics change with the channel count, so no equivalence here: shapes and a forward."""
    import torchvision

    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    params = sum(p.numel() for p in model.parameters())
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert sum(p.numel() for p in model.parameters()) < 0.4 * params
    assert model(x).shape == (1, 1000)


def test_seed_convnet_conv1_to_32_channels():
    torch.manual_seed(0)
    model = SeedConvNet()
    x = torch.randn(1, 3, 16, 16)
    scores = model.conv1.weight.abs().sum(dim=(1, 2, 3))
    secateurs.prune_(model, Channels(ratio=0.5, importance="l1"), example_inputs=x)
    assert model.conv1.out_channels == 32 and model.conv1.weight.shape == (32, 3, 3, 3)
    assert model.conv2.in_channels == 32 and model.conv2.weight.shape == (128, 32, 3, 3)
    assert model.conv2.out_channels == 128  # coupled to the model output: kept
    assert model(x).shape == (1, 128, 16, 16)
    assert scores.numel() == 64


def test_ratio_round_to_and_never_zero_width(cnn, digits_input):
    secateurs.prune_(cnn, Channels(ratio=0.7, round_to=8), example_inputs=digits_input)
    widths = [cnn.features[0].out_channels, cnn.features[3].out_channels, cnn.features[7].out_channels,
              cnn.classifier[0].out_features]
    assert all(w % 8 == 0 and w > 0 for w in widths), widths
    cnn2 = DigitsCNN()
    secateurs.prune_(cnn2, Channels(ratio=0.99), example_inputs=digits_input)
    assert cnn2.features[0].out_channels >= 1 and cnn2(digits_input).shape == (4, 10)


def test_global_ranking_and_target_macs(cnn, digits_input):
    base = secateurs.analyze(cnn, digits_input, latency=False).macs
    report = secateurs.prune_(cnn, Channels(target_macs=0.5, global_ranking=True), example_inputs=digits_input)
    macs = secateurs.analyze(cnn, digits_input, latency=False).macs
    assert 0.35 * base <= macs <= 0.5 * base
    assert 0 < report.config["achieved_ratio"] < 0.9
    sizes = [layer.numel - layer.zeros for layer in report.layers]
    assert all(s >= 1 for s in sizes)


def test_reports_say_what_happened(cnn, digits_input):
    """achieved_ratio counts the channels really removed; a report of several steps spans all of them."""
    before = [layer.numel for layer in secateurs.prune_(
        copy.deepcopy(cnn), Channels(ratio=0.0), example_inputs=digits_input).layers]
    nothing = secateurs.prune_(copy.deepcopy(cnn), Channels(ratio=0.5, round_to=1000), example_inputs=digits_input)
    assert nothing.config["achieved_ratio"] == 0.0 and nothing.zeros == 0
    report = secateurs.prune_(cnn, Channels(ratio=0.5, steps=2), example_inputs=digits_input)
    assert [layer.numel for layer in report.layers] == before  # widths before the first step
    assert [layer.numel - layer.zeros for layer in report.layers] == [
        cnn.features[0].out_channels, cnn.features[3].out_channels, cnn.features[7].out_channels,
        cnn.classifier[0].out_features]  # and after the last
    assert report.config["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
    assert len(report.config["steps_detail"]) == 2 and all(0.2 < r < 0.4 for r in report.config["steps_detail"])


def test_ignore_keeps_a_layer_whole(cnn, digits_input):
    secateurs.prune_(cnn, Channels(ratio=0.5, ignore=["features.3"]), example_inputs=digits_input)
    assert cnn.features[3].weight.shape == (64, 32, 3, 3)  # its inputs and outputs both stay
    assert cnn.features[7].out_channels == 64


def test_include_prunes_only_the_named_layers_group(cnn, digits_input):
    secateurs.prune_(cnn, Channels(ratio=0.5, include=["features.0"]), example_inputs=digits_input)
    assert cnn.features[0].out_channels == 16 and cnn.features[3].in_channels == 16
    assert cnn.features[3].out_channels == 64 and cnn.features[7].out_channels == 128


@pytest.mark.parametrize("kwargs, fragment", [
    ({"ratio": 1.0}, "[0, 1)"), ({}, "exactly one"), ({"ratio": 0.5, "target_macs": 0.5}, "exactly one"),
    ({"target_macs": 0.0}, "(0, 1]"), ({"ratio": 0.5, "importance": "magic"}, "unknown importance"),
    ({"ratio": 0.5, "round_to": 0}, "round_to"),
    ({"ratio": 0.5, "prune_output_layer": True}, "output width"),
])
def test_bad_channel_configs(kwargs, fragment):
    with pytest.raises(SecateursError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Channels(**kwargs)


def test_example_inputs_are_required(cnn):
    with pytest.raises(SecateursError, match="example_inputs"):
        secateurs.prune_(cnn, Channels(ratio=0.5))


def test_pruned_model_saves_reloads_and_exports(cnn, digits_input, tmp_path):
    secateurs.prune_(cnn, Channels(ratio=0.5), example_inputs=digits_input)
    secateurs.prune_(cnn, secateurs.Unstructured(sparsity=0.5), example_inputs=digits_input)
    secateurs.save(cnn, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "secateurs.json").read_text())
    assert len(manifest["structure"]) == 1
    loaded = secateurs.load(tmp_path / "m")
    assert loaded.features[0].out_channels == 16
    assert_same_model(loaded, cnn, digits_input)
    secateurs.finalize_(loaded)
    exported = torch.export.export(loaded, (digits_input,))
    torch.testing.assert_close(exported.module()(digits_input), loaded(digits_input))


@needs("torchvision")
def test_resnet18_at_half_the_channels_is_physically_smaller_and_faster():
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 96, 96)
    before = secateurs.analyze(model, x, size=False)
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    after = secateurs.analyze(model, x, size=False)
    assert after.params < 0.3 * before.params and after.macs < 0.3 * before.macs
    assert model.conv1.out_channels == 32 and model.fc.in_features == 256 and model.fc.out_features == 1000
    assert model(x).shape == (1, 1000)


def test_cli_channel_method(tmp_path, capsys):
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "channel",
                 "--ratio", "0.5", "--round-to", "4", "--json", "--out", str(tmp_path / "c")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["after"]["params"] < 0.35 * result["before"]["params"]
    assert "plan" in result["pruning"]
    model = secateurs.load(tmp_path / "c")
    assert model.features[3].in_channels == 16
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--method", "channel", "--ratio", "1.2",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and not (tmp_path / "bad").exists()
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--method", "channel", "--sparsity", "0.2",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "does not apply" in capsys.readouterr().err


def test_multihead_attention_narrows_every_head_and_stays_equivalent(tmp_path):
    from conftest import AttnBlock

    torch.manual_seed(0)
    model = AttnBlock(width=16, heads=4)
    x = torch.randn(2, 5, 6)
    _equivalence(model, x, 0.25)
    assert model.att.embed_dim == 12 and model.att.num_heads == 4 and model.att.head_dim == 3
    assert model.att.in_proj_weight.shape == (36, 12) and model.att.out_proj.weight.shape == (12, 12)
    secateurs.save(model, tmp_path / "m")
    assert_same_model(secateurs.load(tmp_path / "m", trust_code=True), model, x)


@needs("torchvision")
def test_vit_embedding_dim_and_mlp_are_pruned():
    import torchvision

    model = torchvision.models.vit_b_16(image_size=64, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    report = secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert not [k for k in report.skipped if k.startswith("call")]
    assert model.conv_proj.out_channels == 384 and model.class_token.shape[-1] == 384
    assert model.encoder.pos_embedding.shape[-1] == 384
    attn = model.encoder.layers[0].self_attention
    assert attn.embed_dim == 384 and attn.head_dim == 32
    assert model(x).shape == (1, 10)


@needs("sklearn")
@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_driven_importance(importance, tmp_path, capsys):
    from secateurs.data import batches
    from secateurs.importance.stats import ActivationStats, TaylorStats

    torch.manual_seed(0)
    model = DigitsCNN()
    data = batches("digits", batch_size=32, input_shape=[1, 1, 8, 8], max_batches=4)
    stats = (TaylorStats(model).run(data, 4).scores if importance == "taylor"
             else ActivationStats(model).run(data, 4).per_channel())
    assert stats["features.0.weight"].shape[0] == 32 and bool((stats["features.0.weight"] >= 0).all())
    x = data[0][0][:2]
    before = [p.detach().clone() for p in model.parameters()]
    secateurs.prune_(model, Channels(ratio=0.5, importance=importance), example_inputs=x, data=data)
    assert model.features[0].out_channels == 16 and model(x).shape == (2, 10)
    assert len(before) == len(list(model.parameters()))
    with pytest.raises(SecateursError, match="data"):
        secateurs.prune_(DigitsCNN(), Channels(ratio=0.5, importance=importance), example_inputs=x)
    code = main(["prune", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--method", "channel",
                 "--ratio", "0.5", "--importance", importance, "--data", "digits", "--calib-batches", "2",
                 "--no-latency", "--out", str(tmp_path / "m")])
    assert code == 0 and secateurs.load(tmp_path / "m").features[0].out_channels == 16


@needs("onnx")
@needs("onnxruntime")
def test_pruned_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = Mixed(group_stats=False).eval()
    x = torch.randn(2, 3, 8, 8)
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_iterative_steps_reach_the_ratio(cnn, digits_input):
    report = secateurs.prune_(cnn, Channels(ratio=0.75, steps=3), example_inputs=digits_input)
    assert len(report.config["steps_detail"]) == 3
    assert cnn.features[0].out_channels == 8  # 32 * (1 - 0.75), reached in three re-scored steps
    assert cnn(digits_input).shape == (4, 10)


@needs("transformers")
def test_llama_gqa_heads_ffn_and_hidden_are_pruned_and_generation_works(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randint(0, 128, (1, 16))
    report = secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert not [k for k in report.skipped if k.startswith("call")]
    attn = model.model.layers[0].self_attn
    # one KV head left, with its group of two query heads (head_dim 16)
    assert attn.k_proj.out_features == 16 and attn.q_proj.out_features == 32 and attn.o_proj.in_features == 32
    assert model.model.layers[0].mlp.up_proj.out_features == 64 and model.model.embed_tokens.embedding_dim == 32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.generate(x, max_new_tokens=4, do_sample=False).shape == (1, 20)
    secateurs.save(model, tmp_path / "m")
    assert_same_model(secateurs.load(tmp_path / "m"), model, x)
    # The config follows the shapes, so stock save_pretrained/from_pretrained round-trips.
    assert (model.config.hidden_size, model.config.intermediate_size) == (32, 64)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    model.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits)


@needs("transformers")
def test_gpt2_and_bert_prune_heads_and_reload_with_stock_from_pretrained(tmp_path):
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                                 n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    bert_config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=32, num_labels=3)
    bert = transformers.BertModel(bert_config).eval()
    classifier = transformers.BertForSequenceClassification(bert_config).eval()
    x = torch.randint(0, 100, (1, 12))
    secateurs.prune_(gpt2, Channels(ratio=0.5), example_inputs=x)
    assert gpt2.transformer.h[0].mlp.c_fc.nf == 128 and gpt2.transformer.wte.embedding_dim == 32
    assert gpt2(x).logits.shape == (1, 12, 100)
    report = secateurs.prune_(bert, Channels(ratio=0.5), example_inputs=x)
    # BertModel outputs its hidden states, so the width stays; BertConfig cannot say "fewer heads, same width",
    # so the heads stay whole too: every layer keeps a shape the config describes, and the report says why
    assert "BertConfig cannot describe fewer heads" in report.skipped["width heads"]
    assert "config" not in report.skipped and bert.config.intermediate_size == 64
    secateurs.prune_(classifier, Channels(ratio=0.5), example_inputs=x)
    assert (classifier.config.hidden_size, classifier.config.num_attention_heads) == (32, 2)
    assert bert.encoder.layer[0].attention.self.query.out_features == 64  # all four heads
    assert bert.encoder.layer[0].intermediate.dense.out_features == 64
    assert bert(x).last_hidden_state.shape == (1, 12, 64)
    attn = gpt2.transformer.h[0].attn  # split(self.split_size) and view(..., -1, head_dim): heads pruned whole
    assert (attn.num_heads, attn.head_dim, attn.split_size, attn.c_attn.nf) == (2, 16, 32, 96)
    assert (gpt2.config.n_head, gpt2.config.n_embd) == (2, 32)
    secateurs.save(bert, tmp_path / "bert")
    assert_same_model(secateurs.load(tmp_path / "bert"), bert, x)
    for model, auto in ((gpt2, transformers.AutoModelForCausalLM),
                        (classifier, transformers.AutoModelForSequenceClassification)):
        secateurs.save(model, tmp_path / type(model).__name__)
        assert_same_model(secateurs.load(tmp_path / type(model).__name__), model, x)
        model.save_pretrained(tmp_path / ("hf" + type(model).__name__))
        stock = auto.from_pretrained(tmp_path / ("hf" + type(model).__name__)).eval()
        with torch.no_grad():
            out, ref = stock(x), model(x)
        torch.testing.assert_close(out.logits, ref.logits)


class EinsumAttention(nn.Module):
    """Attention written with einsum, plus a mask made by ``new_zeros`` (as Swin and MaxViT do)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.out = nn.Linear(dim, 4)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = x.new_zeros((n, n))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) + mask).softmax(-1)
        y = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.proj(y)
        x = x + self.mlp(x)
        return self.out(x.mean(1))


def test_einsum_attention_and_new_zeros_are_followed():
    torch.manual_seed(0)
    model, x = EinsumAttention(), torch.randn(2, 5, 16)
    graph = build_graph(model, x)
    assert not graph.unknown_calls
    pruned = {m.tensor for g in graph.groups for m in g.members}
    assert {"qkv.weight", "mlp.0.weight"} <= pruned
    _equivalence(model, x, 0.5)
    assert model.head_dim == 4 and model.qkv.out_features == 24


def test_shape_only_rehearsal_still_catches_a_batchnorm_width_mismatch():
    from secateurs.methods.rehearsal import rehearse
    from secateurs.surgery import Plan

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
    x = torch.randn(1, 3, 8, 8)
    broken = Plan(remove={"0.weight": {0: [0, 1]}, "0.bias": {0: [0, 1]}})  # conv narrowed, its BatchNorm not
    rehearsal, why = rehearse(model, broken, x, (1, 8, 6, 6))
    assert rehearsal is None and "should contain 6 elements" in why
    whole = Plan(remove={"0.weight": {0: [0, 1]}, "0.bias": {0: [0, 1]}, "1.weight": {0: [0, 1]},
                         "1.bias": {0: [0, 1]}, "1.running_mean": {0: [0, 1]}, "1.running_var": {0: [0, 1]}})
    rehearsal, why = rehearse(model, whole, x, (1, 6, 6, 6))
    assert rehearsal is not None and model[0].out_channels == 8  # the real model is untouched


def test_shape_only_rehearsal_catches_linear_and_layer_norm_width_mismatches():
    from secateurs.methods.rehearsal import rehearse
    from secateurs.surgery import Plan

    x = torch.randn(2, 5, 4)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    rows_only = Plan(remove={"0.weight": {0: [0]}, "0.bias": {0: [0]}})  # the consumer keeps 8 input columns
    rehearsal, why = rehearse(model, rows_only, x, (2, 5, 3))
    assert rehearsal is None and "linear" in why
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    norm_left = Plan(remove={"0.weight": {0: [0]}, "0.bias": {0: [0]}, "2.weight": {1: [0]}})
    rehearsal, why = rehearse(model, norm_left, x, (2, 5, 3))
    assert rehearsal is None and "layer_norm" in why
    whole = Plan(remove={"0.weight": {0: [0]}, "0.bias": {0: [0]}, "1.weight": {0: [0]}, "1.bias": {0: [0]},
                         "2.weight": {1: [0]}}, attrs={"1": {}})
    rehearsal, why = rehearse(model, whole, x, (2, 5, 3))
    assert rehearsal is not None, why


def test_meta_copy_is_a_deep_copy_on_meta():
    from secateurs.methods.rehearsal import meta_copy

    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.LayerNorm(4))
    model.sizes = [4, 4]  # a mutable attribute surgery could edit in place
    model.register_buffer("scale", torch.ones(4), persistent=False)
    model[1].register_forward_hook(lambda m, a, o: None)
    copy_ = meta_copy(model)
    assert copy_[0] is copy_[2] and copy_[0] is not shared  # shared stays shared, but is a new module
    assert copy_.sizes == [4, 4] and copy_.sizes is not model.sizes
    assert all(t.is_meta for t in list(copy_.parameters()) + list(copy_.buffers()))
    assert copy_._non_persistent_buffers_set == {"scale"} and copy_._non_persistent_buffers_set is not \
        model._non_persistent_buffers_set
    assert len(copy_[1]._forward_hooks) == 1 and copy_[1]._forward_hooks is not model[1]._forward_hooks
    copy_.sizes.append(2)
    copy_[0].out_features = 3
    assert model.sizes == [4, 4] and shared.out_features == 4 and not shared.weight.is_meta
    assert copy_(torch.empty(2, 4, device="meta")).shape == (2, 4)


class _HiddenSplit(nn.Module):
    """A CSP-style stage (timm's CrossStage): splits its expansion by a size computed from a stored width.

    A stored size passed as is (``split(self.half)``) is linked to its group and
    updated by surgery; ``self.expand_chs // 2`` is arithmetic the trace cannot see.
    """

    def __init__(self, c: int):
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.expand_chs = 2 * c
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.out = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        xa, xb = self.expand(x).split(self.expand_chs // 2, dim=1)
        return self.out(torch.cat([torch.relu(self.a(xa)), torch.relu(self.b(xb))], 1))


def test_groups_broken_by_hidden_sizes_are_found_quickly_and_kept_whole(monkeypatch):
    from secateurs.methods import rehearsal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _HiddenSplit(8), _HiddenSplit(8), _HiddenSplit(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 10, 10)
    calls = []
    real_attempt = rehearsal._attempt
    monkeypatch.setattr(rehearsal, "_attempt", lambda *a: calls.append(1) or real_attempt(*a))
    before = model(x)
    report = secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert model(x).shape == before.shape
    for i in (1, 2, 3):
        assert model[i].expand.out_channels == 16  # kept whole, with the reason
        why = [v for k, v in report.skipped.items() if f"{i}.expand.bias" in k]
        assert len(why) == 1 and "not enough values to unpack" in why[0]
        assert model[i].a.out_channels == 4 and model[i].b.out_channels == 4  # the rest was pruned
    # one rehearsal to fail, one to confirm each culprit (the suspect owning most of the stage), one to pass
    assert len(calls) <= 2 * 3 + 1, len(calls)


class _AssertsWidth(nn.Module):
    """Checks its input against a stored width in plain Python: no size is ever passed to a torch call."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.width = nn.Conv2d(c, c, 3, padding=1), c

    def forward(self, x):
        if x.shape[1] != self.width:
            raise ValueError(f"expected {self.width} channels, got {x.shape[1]}")
        self.calls = getattr(self, "calls", 0) + 1  # state a forward leaves behind
        return torch.relu(self.conv(x))


def _state(model: nn.Module) -> dict:
    """Everything observable about a model: tensors (with identity), attributes and modules."""
    return {name: (type(m), {k: v for k, v in vars(m).items() if not k.startswith("_")},
                   {k: (id(t), t.shape, t.clone()) for k, t in [*m._parameters.items(), *m._buffers.items()]})
            for name, m in model.named_modules()}


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        (ta, va, ea), (tb, vb, eb) = a[name], b[name]
        if ta is not tb or va != vb or ea.keys() != eb.keys():
            return False
        if any(ea[k][:2] != eb[k][:2] or not torch.equal(ea[k][2], eb[k][2]) for k in ea):
            return False
    return True


def test_plans_are_checked_on_the_model_itself_and_undone_exactly_when_they_fail(monkeypatch):
    from secateurs.methods import rehearsal
    from secateurs.methods.channels import plan_channels, plan_for

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    copies, attempts = [], []
    real_copy, real_attempt = rehearsal.meta_copy, rehearsal._attempt
    monkeypatch.setattr(rehearsal, "meta_copy", lambda m: copies.append(1) or real_copy(m))
    monkeypatch.setattr(rehearsal, "_attempt", lambda *a: attempts.append(1) or real_attempt(*a))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    secateurs.prune_(plain, Channels(ratio=0.5), example_inputs=x)
    assert copies == [] and attempts == []  # one surgery, checked in place
    assert plain(x).shape == (2, 4) and plain[3].groups == plain[3].out_channels == 4
    assert all(not t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    monkeypatch.setattr(secateurs.methods.channels, "IN_PLACE_MAX_BYTES", 0)  # as for a big model
    secateurs.prune_(plain, Channels(ratio=0.5), example_inputs=x)
    assert copies and attempts and plain[3].out_channels == 2  # rehearsed on a meta copy, then applied
    monkeypatch.setattr(secateurs.methods.channels, "IN_PLACE_MAX_BYTES", 2**30)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), _AssertsWidth(8), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    model(x)
    graph = build_graph(model, x)
    config = Channels(ratio=0.5)
    removed = plan_channels(graph, {g.id: torch.arange(g.size, dtype=torch.float) for g in graph.groups}, config, 0.5)
    before = _state(model)
    why = rehearsal.apply_checked_(model, plan_for(graph, removed), x, graph.output_shapes)
    assert "expected 8 channels" in why
    assert _same_state(_state(model), before)  # tensors, their identity, attributes, the forward's counter
    report = secateurs.prune_(model, config, example_inputs=x)  # then rehearsed group by group
    assert attempts and model(x).shape == (2, 4) and model[0].out_channels == 8 and model[2].out_channels == 4
    assert any("kept whole" in why and "expected 8 channels" in why for why in report.skipped.values())


def test_training_continues_after_pruning_while_an_old_graph_is_alive(cnn, digits_input):
    opt = torch.optim.SGD(cnn.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        loss = cnn(digits_input).logsumexp(1).mean()  # `loss` keeps the last graph (and its accumulators) alive
        opt.zero_grad()
        loss.backward()
        opt.step()
    secateurs.prune_(cnn, Channels(ratio=0.5), example_inputs=digits_input)
    cnn(digits_input).sum().backward()  # fails if a stale gradient accumulator of the old shape is reused
    assert cnn.classifier[0].weight.grad.shape == cnn.classifier[0].weight.shape
    assert loss.requires_grad
