"""Surgery: removing channels whose weights are zero leaves the outputs unchanged; shapes, attributes and configs follow."""

import pytest
import torch
from torch import nn

import secateurs
from conftest import Mixed, assert_same_model, needs, zero_channels
from secateurs import Channels
from secateurs.graph import build_graph


def _equivalence(model: nn.Module, x: torch.Tensor, fraction: float = 0.25) -> None:
    model.eval()
    zero_channels(model, x, fraction)
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
