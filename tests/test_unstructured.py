import pytest
import torch
from torch import nn

import secateurs
from secateurs import SecateursError, Unstructured


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8, 0.95])
def test_layer_scope_gives_exact_sparsity_per_layer(cnn, sparsity):
    report = secateurs.prune_(cnn, Unstructured(sparsity=sparsity))
    names = [layer.name for layer in report.layers]
    assert names == ["features.0", "features.3", "features.7", "classifier.0"]
    for layer in report.layers:
        w = cnn.get_submodule(layer.name).weight
        assert (w == 0).sum().item() == round(sparsity * w.numel())
        assert layer.zeros == (w == 0).sum().item()


def test_global_scope_gives_exact_total_and_uneven_layers(cnn):
    report = secateurs.prune_(cnn, Unstructured(sparsity=0.8, scope="global"))
    total = sum(cnn.get_submodule(n.name).weight.numel() for n in report.layers)
    zeros = sum((cnn.get_submodule(n.name).weight == 0).sum().item() for n in report.layers)
    assert zeros == round(0.8 * total)
    per_layer = [layer.sparsity for layer in report.layers]
    assert max(per_layer) - min(per_layer) > 0.2  # global ranking does not spread evenly
    # The kept weights are exactly the largest ones across all layers.
    kept_min = min(cnn.get_submodule(n.name).weight.abs()[cnn.get_submodule(n.name).weight != 0].min()
                   for n in report.layers)
    assert kept_min > 0


def test_global_magnitude_keeps_the_largest_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 2))
    with torch.no_grad():
        w = model[1].weight
        w.copy_(w.sign() * (1 + w.abs()))  # every weight of layer 1 outranks layer 0
    secateurs.prune_(model, Unstructured(sparsity=0.5, scope="global"))
    assert (model[0].weight == 0).all()
    assert (model[1].weight != 0).all()


def test_threshold_matches_the_seed_semantics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 5))
    w = model[0].weight.detach().clone()
    w[0, :3] = torch.tensor([0.01, -0.01, 0.0100001])  # exactly at and just above the threshold
    with torch.no_grad():
        model[0].weight.copy_(w)
    secateurs.prune_(model, Unstructured(threshold=0.01))
    # Seed: mask = |w| > threshold; weights *= mask
    expected = w * (w.abs() > 0.01)
    assert torch.equal(model[0].weight, expected)
    assert model[0].weight[0, 2] != 0


def test_random_importance_is_seeded(mlp):
    import copy

    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    secateurs.prune_(a, Unstructured(sparsity=0.5, importance="random", seed=3))
    secateurs.prune_(b, Unstructured(sparsity=0.5, importance="random", seed=3))
    assert torch.equal(a.fc1.weight == 0, b.fc1.weight == 0)
    # Random is not magnitude: some small weights survive.
    c = copy.deepcopy(mlp)
    secateurs.prune_(c, Unstructured(sparsity=0.5))
    assert not torch.equal(a.fc1.weight == 0, c.fc1.weight == 0)


def test_output_layer_is_left_dense_unless_asked(mlp):
    x = torch.randn(2, 32)
    report = secateurs.prune_(mlp, Unstructured(sparsity=0.5), example_inputs=x)
    assert "head" in report.skipped and (mlp.head.weight != 0).all()
    report = secateurs.prune_(mlp, Unstructured(sparsity=0.5, prune_output_layer=True))
    assert "head" in [layer.name for layer in report.layers]
    assert (mlp.head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_output_layer_found_by_execution_order_not_registration():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(8, 2)  # registered first, runs last
            self.inner = nn.Linear(4, 8)

        def forward(self, x):
            return self.out(self.inner(x))

    model = Reordered()
    report = secateurs.prune_(model, Unstructured(sparsity=0.5), example_inputs=torch.randn(1, 4))
    assert list(report.skipped) == ["out"]


def test_ignore_include_and_filter(cnn):
    report = secateurs.prune_(cnn, Unstructured(sparsity=0.5, ignore=["features.0", "classifier"]))
    assert [layer.name for layer in report.layers] == ["features.3", "features.7"]
    assert report.skipped["features.0"] == "ignored"
    report = secateurs.prune_(cnn, Unstructured(sparsity=0.5, include=["features.7"]))
    assert [layer.name for layer in report.layers] == ["features.7"]
    report = secateurs.prune_(
        cnn, Unstructured(sparsity=0.5, filter_fn=lambda m, n: isinstance(m, nn.Linear))
    )
    assert [layer.name for layer in report.layers] == ["classifier.0"]


def test_glob_patterns_select(cnn):
    report = secateurs.prune_(cnn, Unstructured(sparsity=0.5, ignore=["features.*"]))
    assert [layer.name for layer in report.layers] == ["classifier.0"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"sparsity": 1.0}, "[0, 1)"),
        ({"sparsity": -0.1}, "[0, 1)"),
        ({}, "exactly one"),
        ({"sparsity": 0.5, "threshold": 0.1}, "exactly one"),
        ({"threshold": -1.0}, ">= 0"),
        ({"threshold": 0.1, "importance": "random"}, "magnitude"),
        ({"sparsity": 0.5, "importance": "taylor"}, "unknown importance"),
        ({"sparsity": 0.5, "scope": "model"}, "scope"),
    ],
)
def test_bad_configs_are_refused(kwargs, fragment):
    with pytest.raises(SecateursError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        Unstructured(**kwargs)


def test_ignore_that_matches_nothing_is_an_error(cnn):
    with pytest.raises(SecateursError, match="matches no module"):
        secateurs.prune_(cnn, Unstructured(sparsity=0.5, ignore=["featurez"]))


def test_report_numbers_are_consistent(cnn):
    report = secateurs.prune_(cnn, Unstructured(sparsity=0.5))
    d = report.to_dict()
    assert d["method"] == "unstructured" and d["config"]["sparsity"] == 0.5
    assert d["sparsity"] == pytest.approx(report.zeros / report.numel)
    assert report.seconds >= 0


def test_multihead_attention_in_proj_is_pruned_and_round_trips(tmp_path):
    from conftest import AttnNet, assert_same_model

    torch.manual_seed(0)
    model = AttnNet().eval()
    x = torch.randn(2, 5, 16)
    report = secateurs.prune_(model, Unstructured(sparsity=0.5), example_inputs=x)
    assert [layer.name for layer in report.layers] == ["att.in_proj_weight", "att.out_proj"]
    assert (model.att.in_proj_weight == 0).float().mean().item() == 0.5
    # The attention really computes with the masked weight.
    reference = AttnNet().eval()
    reference.load_state_dict(secateurs.masks.effective_state_dict(model)[0])
    torch.testing.assert_close(reference(x), model(x))
    secateurs.save(model, tmp_path / "m")
    loaded = secateurs.load(tmp_path / "m", trust_code=True)  # a test-local class
    assert secateurs.get_mask(loaded.att, "in_proj_weight") is not None
    assert_same_model(loaded, model, x)


def test_stacked_expert_weights_are_pruned_or_reported_never_silently_skipped():
    """Fused mixture-of-experts weights (one matrix per expert in a 3-D parameter): magnitude prunes each
    expert's matrix alone; a method that cannot prune them (N:M needs each expert's input side, Wanda the
    tokens each expert got, which an einsum over all experts does not show) says so in the report."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Parameter(torch.randn(4, 16, 8))  # 4 experts
            self.pos = nn.Parameter(torch.randn(1, 5, 8))  # a position embedding: not a stack of matrices

        def forward(self, x):
            return torch.einsum("bi,eoi->bo", x, self.up) + self.pos.sum()

    model = nn.Sequential(nn.Linear(8, 8), Experts(), nn.Linear(16, 4))
    report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5, prune_output_layer=True),
                              example_inputs=torch.randn(2, 8))
    assert report.skipped == {} and "1.up" in {layer.name for layer in report.layers}
    assert torch.equal((model[1].up == 0).sum(dim=(1, 2)), torch.full((4,), 64))
    assert bool((model[1].pos != 0).all())
    model = nn.Sequential(nn.Linear(8, 8), Experts(), nn.Linear(16, 4))
    report = secateurs.prune_(model, secateurs.NM(n=2, m=4, prune_output_layer=True),
                              example_inputs=torch.randn(2, 8))
    assert report.skipped == {"1.up": "a stack of 4 weight matrices in Experts (fused mixture-of-experts weights, "
                                      "say), which this method cannot prune: left dense (wanda, sparsegpt and "
                                      "unstructured with uniform allocation prune them expert by expert)"}
    report = secateurs.prune_(model, secateurs.Wanda(sparsity=0.5, calib_batches=1, prune_output_layer=True),
                              data=[torch.randn(2, 8)])
    assert "where secateurs can see it" in report.skipped["1.up"]
    assert bool((model[1].up != 0).all())
    ignored = secateurs.prune_(nn.Sequential(nn.Linear(8, 8), Experts(), nn.Linear(16, 4)),
                               secateurs.NM(n=2, m=4, ignore=["1"]), example_inputs=torch.randn(2, 8))
    assert "1.up" not in ignored.skipped  # what the user chose to leave alone is not reported again


class _MoE(nn.Module):
    """A router (one output per expert) beside its experts, as mixture-of-experts blocks have them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.other = nn.Linear(8, 3)  # beside the experts too, but not one output per expert: not a router

    def forward(self, x):
        weights = self.gate(x).softmax(-1)
        return sum(w.unsqueeze(-1) * e(x) for w, e in zip(weights.unbind(-1), self.experts, strict=True)) \
            + self.other(x).sum(-1, keepdim=True)


def test_a_mixture_of_experts_router_is_left_dense_unless_named():
    torch.manual_seed(0)
    model = nn.Sequential(_MoE(), nn.Linear(8, 2))
    report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5), example_inputs=torch.randn(2, 8))
    assert report.skipped["0.gate"] == ("router of 4 experts (pruning it changes which experts run): name it in "
                                        "include to prune it")
    assert bool((model[0].gate.weight != 0).all())
    assert {layer.name for layer in report.layers} == {"0.experts.0", "0.experts.1", "0.experts.2", "0.experts.3",
                                                       "0.other"}
    named = secateurs.prune_(nn.Sequential(_MoE(), nn.Linear(8, 2)),
                             secateurs.Unstructured(sparsity=0.5, include=["0.gate"]), example_inputs=torch.randn(2, 8))
    assert [layer.name for layer in named.layers] == ["0.gate"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("transformers") is None, reason="needs transformers")
def test_mixtral_fused_experts_are_pruned_per_expert_and_its_router_left_dense():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=32)
    model = MixtralForCausalLM(config)
    report = secateurs.prune_(model, secateurs.Wanda(sparsity=0.5, calib_batches=1),
                              data=[{"input_ids": torch.randint(0, 64, (1, 8))}])
    # transformers 5's Mixtral router is a module of its own (no Linear): never a candidate, so left dense
    assert "model.layers.0.mlp.gate" not in report.skipped and bool((model.model.layers[0].mlp.gate.weight != 0).all())
    # the fused experts are pruned expert by expert (tests/test_moe.py); a data-free method reports them
    assert {layer.name for layer in report.layers} == {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"} | {
        f"model.layers.0.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")}
    report = secateurs.prune_(model, secateurs.NM(n=2, m=4))
    assert report.skipped["model.layers.0.mlp.experts.gate_up_proj"].startswith("a stack of 4 weight matrices")
