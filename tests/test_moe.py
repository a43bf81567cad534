"""Wanda and SparseGPT on fused mixture-of-experts weights: one 3-D tensor holds every expert's matrix.

The reference is the same model with its experts as separate Linear layers: pruning either must give the
same masks and weights, expert by expert, on the tokens the router sent to that expert.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from conftest import needs
from secateurs import SparseGPT, Wanda
from secateurs.importance.oneshot import magnitude_keep
from secateurs.masks import finalize_, masked_tensors

D, H, E = 16, 24, 4


class FusedExperts(nn.Module):
    """Stacked weights, read as transformers' eager experts do: ``F.linear`` with ``(out, in)`` matrices, and
    ``@`` with ``(in, out)`` ones (GPT-OSS's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, 2 * H, D) / D**0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, D) / H**0.5)  # (in, out) per expert

    def forward(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in chosen.unique():
            rows = torch.where(chosen == expert)[0]
            gate, up = F.linear(x[rows], self.w_in[expert]).chunk(2, dim=-1)
            out[rows] = (F.silu(gate) * up) @ self.w_out[expert]
        return out


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Linear(D, 2 * H, bias=False)
        self.w_out = nn.Linear(H, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class SeparateExperts(nn.ModuleList):
    def forward(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in chosen.unique():
            rows = torch.where(chosen == expert)[0]
            out[rows] = self[int(expert)](x[rows])
        return out


class Layer(nn.Module):
    def __init__(self, experts: nn.Module, silent: int | None) -> None:
        super().__init__()
        self.attn = nn.Linear(D, D)
        self.router = nn.Linear(D, E, bias=False)
        self.experts = experts
        self.silent = silent  # an expert the router never picks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        flat = x.reshape(-1, D)
        logits = self.router(flat)
        if self.silent is not None:
            logits[:, self.silent] = -torch.inf
        return x + self.experts(flat, logits.argmax(-1)).view_as(x)


class TinyMoE(nn.Module):
    def __init__(self, fused: bool, silent: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Layer(FusedExperts() if fused else SeparateExperts(Expert() for _ in range(E)),
                                          silent) for _ in range(3))
        self.head = nn.Linear(D, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _pair(silent: int | None = None) -> tuple[TinyMoE, TinyMoE]:
    fused, separate = TinyMoE(True, silent), TinyMoE(False, silent)
    with torch.no_grad():
        for f, s in zip(fused.layers, separate.layers, strict=True):
            s.attn.load_state_dict(f.attn.state_dict())
            s.router.load_state_dict(f.router.state_dict())
            for e, expert in enumerate(s.experts):
                expert.w_in.weight.copy_(f.experts.w_in[e])
                expert.w_out.weight.copy_(f.experts.w_out[e].T)
        separate.head.load_state_dict(fused.head.state_dict())
    return fused, separate


def _data(batches: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 12, D, generator=g) for _ in range(batches)]


@pytest.mark.parametrize("config", [Wanda(sparsity=0.5, calib_batches=3), Wanda(n=2, m=4, calib_batches=3),
                                    SparseGPT(sparsity=0.5, calib_batches=3), SparseGPT(n=2, m=4, calib_batches=3)],
                         ids=["wanda", "wanda-2:4", "sparsegpt", "sparsegpt-2:4"])
def test_fused_experts_are_pruned_like_separate_ones(config):
    fused, separate = _pair()
    data = _data()
    report = secateurs.prune_(fused, config, data=data)
    secateurs.prune_(separate, config, data=data)
    names = {layer.name for layer in report.layers}
    assert {f"layers.{i}.experts.{w}" for i in range(3) for w in ("w_in", "w_out")} <= names
    assert "layers.0.router" in report.skipped and "experts_by_magnitude" not in report.outcome
    finalize_(fused), finalize_(separate)
    for f, s in zip(fused.layers, separate.layers, strict=True):
        for e, expert in enumerate(s.experts):
            torch.testing.assert_close(f.experts.w_in[e], expert.w_in.weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(f.experts.w_out[e].T, expert.w_out.weight, rtol=1e-4, atol=1e-5)
            assert torch.equal(f.experts.w_in[e] == 0, expert.w_in.weight == 0)
        assert float((f.experts.w_in == 0).float().mean()) == pytest.approx(0.5)
    x = _data(1)[0]
    torch.testing.assert_close(fused(x), separate(x), rtol=1e-4, atol=1e-5)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude(caplog):
    fused = TinyMoE(True, silent=2)
    dense = fused.layers[1].experts.w_in[2].detach().clone()
    report = secateurs.prune_(fused, Wanda(sparsity=0.5, calib_batches=3), data=_data())
    assert report.outcome["experts_by_magnitude"] == {f"layers.{i}.experts.{w}": [2] for i in range(3)
                                                      for w in ("w_in", "w_out")}
    assert "1 of 4 experts got no calibration token" in caplog.text
    kept = fused.layers[1].experts.w_in[2] != 0
    assert torch.equal(kept, magnitude_keep(dense, 0.5))


def test_magnitude_ranks_each_expert_alone_and_n_m_leaves_stacks_dense():
    fused, separate = _pair()
    secateurs.prune_(fused, secateurs.Unstructured(sparsity=0.5))
    secateurs.prune_(separate, secateurs.Unstructured(sparsity=0.5))
    for f, s in zip(fused.layers, separate.layers, strict=True):
        assert torch.equal((f.experts.w_in == 0).float().mean(dim=(1, 2)), torch.full((E,), 0.5))
        for e, expert in enumerate(s.experts):
            assert torch.equal(f.experts.w_in[e] == 0, expert.w_in.weight == 0)
            assert torch.equal(f.experts.w_out[e].T == 0, expert.w_out.weight == 0)
    report = secateurs.prune_(fused, secateurs.Unstructured(threshold=0.1))  # on top of the masks
    assert bool((fused.layers[0].experts.w_in.abs() > 0.1).eq(fused.layers[0].experts.w_in != 0).all())
    assert "layers.0.experts.w_in" in {layer.name for layer in report.layers}
    # N:M runs along each expert's inputs, which only a forward tells apart from its outputs: left dense, said
    fused = TinyMoE(True)
    report = secateurs.prune_(fused, secateurs.NM(n=2, m=4))
    assert "stack of 4 weight matrices" in report.skipped["layers.0.experts.w_in"]
    assert "wanda, sparsegpt" in report.skipped["layers.0.experts.w_in"]
    assert float((fused.layers[0].experts.w_in == 0).float().mean()) == 0


def _mixtral(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


@needs("transformers")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_mixtral_experts_are_pruned_and_stock_transformers_loads_them(tmp_path, capsys, caplog, method):
    """A transformers MoE (fused experts, grouped_mm by default), pruned from its folder by the CLI: every
    expert's matrices come out 50% sparse per row in the folder stock from_pretrained loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from secateurs.cli import main
    from test_stream import VOCAB, _tokenizer

    src, out = tmp_path / "src", tmp_path / "out"
    _mixtral(VOCAB).save_pretrained(src)
    _tokenizer().save_pretrained(src)
    code = main(["prune", f"hf:{src}", "--method", method, "--sparsity", "0.5", "--data", "pydoc",
                 "--calib-samples", "8", "--seq-len", "16", "--no-stream", "--out", str(out), "--json", "-q"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    pruned = {layer["name"] for layer in result["pruning"]["layers"]}
    assert {f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")} <= pruned
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_experts_implementation()[""] == "grouped_mm"
    for layer in model.model.layers:
        for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            zeros = (w == 0).sum(-1)  # Wanda: half of every row; SparseGPT: half of every expert's matrix
            assert torch.equal(zeros if method == "wanda" else zeros.sum(-1) // w.shape[1],
                               torch.full(zeros.shape if method == "wanda" else zeros.shape[:1], w.shape[2] // 2))
        assert not (layer.self_attn.q_proj.weight == 0).all()
    assert torch.isfinite(model(torch.arange(10)[None]).logits).all()
    # only the experts: named by --include
    code = main(["prune", f"hf:{src}", "--method", method, "--sparsity", "0.5", "--data", "pydoc", "--include",
                 "*.experts", "--calib-samples", "4", "--seq-len", "16", "--out", str(tmp_path / "experts"), "-q"])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "experts")
    assert (model.model.layers[1].mlp.experts.down_proj == 0).float().mean() == 0.5
    assert not (model.model.layers[1].self_attn.q_proj.weight == 0).any()
    # streamed: the per-expert checkpoint tensors are fused as transformers loads them, pruned layer by layer,
    # and written back under the checkpoint's names: the same files as in memory, bit for bit
    code = main(["prune", f"hf:{src}", "--method", method, "--sparsity", "0.5", "--data", "pydoc",
                 "--calib-samples", "8", "--seq-len", "16", "--stream", "--out", str(tmp_path / "streamed"), "-q"])
    assert code == 0
    streamed, in_memory = (load_file(tmp_path / name / "model.safetensors") for name in ("streamed", "out"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in streamed and set(streamed) == set(in_memory)
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    # and the same manifest (the model's names): secateurs.load restores the experts' masks from either
    manifests = [json.loads((tmp_path / name / "secateurs.json").read_text())["tensors"] for name in ("streamed", "out")]
    assert manifests[0] == manifests[1] and manifests[0]["model.layers.0.mlp.experts.gate_up_proj"]["masked"]
    restored = secateurs.load(tmp_path / "streamed")
    assert "model.layers.1.mlp.experts.down_proj" in {name for name, *_ in masked_tensors(restored)}
    capsys.readouterr()
    # fine-tuned from the folder secateurs wrote, the experts' zeros stay; from hf:FOLDER (plain transformers,
    # no masks) they fill in again, which a warning says
    if method == "wanda":
        for spec, name in ((str(out), "tuned"), (f"hf:{out}", "tuned-hf")):
            assert main(["finetune", spec, "--data", "pydoc", "--seq-len", "16", "--max-steps", "3",
                         "--out", str(tmp_path / name)]) == 0
            tuned = AutoModelForCausalLM.from_pretrained(tmp_path / name).model.layers[0].mlp.experts.gate_up_proj
            assert float((tuned == 0).float().mean()) == (0.5 if name == "tuned" else 0.0)
        assert "give the folder without 'hf:' to keep them" in caplog.text
        capsys.readouterr()
    # compressed-tensors quantizes only Linear layers, and transformers cannot load its folder of float experts
    code = main(["prune", f"hf:{src}", "--method", method, "--sparsity", "0.5", "--data", "pydoc",
                 "--save-format", "compressed-tensors", "--quantize", "int8", "--out", str(tmp_path / "ct")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "fused 3-D weight" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ct").exists()


@needs("transformers")
def test_mixtral_statistics_follow_the_router():
    """The statistics of a transformers expert count exactly the tokens its router picked it for."""
    from secateurs.importance.experts import ExpertStats, StackedInputs
    from secateurs.utils import eager_experts

    model = _mixtral(100)
    experts = model.model.layers[0].mlp.experts
    stats = ExpertStats(hessian=False)
    picked: list[torch.Tensor] = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda mod, inp, out: picked.append(out[2]))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), eager_experts(model):
        assert model.get_experts_implementation()[""] == "eager"
        mode = StackedInputs({id(experts.gate_up_proj): "gate_up"},
                             lambda name, e, rows, t: stats.update(e, rows, t))

        def enter(mod, args):
            mode.__enter__()

        def leave(mod, args, out):
            mode.__exit__(None, None, None)

        handles = [experts.register_forward_pre_hook(enter), experts.register_forward_hook(leave), hook]
        model(ids)
        for h in handles:
            h.remove()
    assert model.get_experts_implementation()[""] == "grouped_mm"
    counts = torch.bincount(picked[0].flatten(), minlength=4)
    assert {e: s.count for e, s in stats.experts.items()} == {e: int(c) for e, c in enumerate(counts) if c}
    assert stats.transposed is False and sum(counts) == 2 * 8 * 2


@needs("transformers")
def test_gpt_oss_experts_keep_n_of_m_along_their_input_dimension():
    """GPT-OSS stores each expert's matrix as (in, out) and multiplies with ``@``: 2:4 runs along dim 1."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"] * 2)
    model = GptOssForCausalLM(config).eval()
    data = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    secateurs.prune_(model, Wanda(n=2, m=4, calib_batches=4), data=data)
    for w in (model.model.layers[1].mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.down_proj):
        experts, inputs, outputs = w.shape
        groups = (w != 0).view(experts, inputs // 4, 4, outputs).sum(2)
        assert bool((groups == 2).all())


@needs("transformers")
def test_analyze_counts_the_experts_macs_and_their_sparsity():
    """The experts' products are counted (one expert at a time: the FLOP counter has no grouped_mm formula),
    and shrink with their weights."""
    model = _mixtral(100)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    before = secateurs.analyze(model, ids, latency=False, size=False)
    experts = {layer.name: layer for layer in before.layers if layer.name.endswith("mlp.experts")}
    # each of the 16 tokens runs through 2 of the 4 experts: (32 -> 2 x 64) and (64 -> 32) per expert
    assert [layer.macs for layer in experts.values()] == [16 * 2 * (32 * 128 + 64 * 32)] * 2
    assert model.get_experts_implementation()[""] == "grouped_mm"
    secateurs.prune_(model, Wanda(sparsity=0.5, calib_batches=2),
                     data=[{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(2)])
    after = secateurs.analyze(model, ids, latency=False, size=False)
    pruned = sum(layer.macs for layer in before.layers if layer.name.endswith(("experts", "_proj")))
    assert after.macs == before.macs and after.nonzero_macs == before.macs - pruned // 2


@needs("transformers")
def test_a_checkpoint_of_separate_experts_is_read_and_written_as_transformers_does(tmp_path):
    """ConvertedFolder shows the checkpoint under the model's names, each tensor what from_pretrained loads;
    Reverter splits it back into the checkpoint's own tensors; a folder without conversions is left alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from secateurs.io.convert import ConvertedFolder, Reverter, converted_folder
    from secateurs.io.hf import hf_skeleton
    from secateurs.io.shards import SafetensorsFolder

    _mixtral(100).save_pretrained(tmp_path / "mixtral")
    stored = SafetensorsFolder(tmp_path / "mixtral")
    skeleton = hf_skeleton(tmp_path / "mixtral", stored=stored.tensors)
    folder = converted_folder(stored, skeleton)
    assert isinstance(folder, ConvertedFolder) and len(folder.sources["model.layers.1.mlp.experts.gate_up_proj"]) == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").state_dict()
    assert set(folder.tensors) == set(loaded)
    assert all(torch.equal(folder.read(name), loaded[name]) for name in loaded)
    assert all(folder.tensors[name].shape == tuple(loaded[name].shape) for name in loaded)
    reverter, written = Reverter(skeleton), {}
    for name, info in folder.tensors.items():
        parts = reverter.split(name, folder.read(name))
        assert {k: tuple(v.shape) for k, v in parts.items()} == \
            {k: i.shape for k, i in reverter.infos(name, info).items()}
        written.update(parts)
    assert set(written) == set(stored.tensors) and all(torch.equal(written[k], stored.read(k)) for k in written)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    plain = SafetensorsFolder(tmp_path / "llama")
    assert converted_folder(plain, hf_skeleton(tmp_path / "llama", stored=plain.tensors)) is plain


@needs("transformers")
def test_streamed_layer_and_magnitude_pruning_of_a_mixture_of_experts_match_in_memory(tmp_path, capsys):
    """Dropping a layer renames the later ones, and magnitude ranks each expert alone: streamed, the
    checkpoint's per-expert tensors come out as in memory (same names, same bits)."""
    from safetensors.torch import load_file

    from secateurs.cli import main
    from test_stream import VOCAB, _tokenizer

    src = tmp_path / "src"
    _mixtral(VOCAB).save_pretrained(src)
    _tokenizer().save_pretrained(src)
    for name, flags in {"layer": ["--method", "layer", "--layers", "1", "--data", "pydoc", "--calib-samples", "4",
                                  "--seq-len", "16"],
                        "magnitude": ["--method", "unstructured", "--sparsity", "0.5"]}.items():
        for mode in ("--stream", "--no-stream"):
            assert main(["prune", f"hf:{src}", *flags, mode, "--out", str(tmp_path / f"{name}{mode}"), "-q"]) == 0
        streamed, in_memory = (load_file(tmp_path / f"{name}{mode}" / "model.safetensors")
                               for mode in ("--stream", "--no-stream"))
        assert set(streamed) == set(in_memory) and all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
        assert ("model.layers.1.block_sparse_moe.experts.0.w1.weight" in streamed) == (name == "magnitude")
    capsys.readouterr()
    # width pruning streams by a trace on the meta skeleton, which cannot route tokens: one line
    code = main(["prune", f"hf:{src}", "--method", "channel", "--width", "ffn=0.25", "--stream",
                 "--out", str(tmp_path / "width")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--no-stream" in err and len(err.splitlines()) == 1 and not (tmp_path / "width").exists()


@pytest.mark.parametrize("nm", [False, True], ids=["50%", "2:4"])
def test_sparsegpt_on_groups_of_experts_gives_the_one_pass_answer(monkeypatch, nm):
    """When the experts' Hessians do not fit at once, SparseGPT runs one pass per group of experts: the
    masks and weights are those of a single pass."""
    from secateurs.methods import oneshot

    config = SparseGPT(n=2, m=4, calib_batches=3) if nm else SparseGPT(sparsity=0.5, calib_batches=3)
    whole, grouped = TinyMoE(True), TinyMoE(True)
    data = _data()
    secateurs.prune_(whole, config, data=data)
    passes = []
    collect = oneshot._collect
    monkeypatch.setattr(oneshot, "_collect", lambda *a, **k: passes.append(k.get("only")) or collect(*a, **k))
    monkeypatch.setattr(oneshot, "EXPERT_HESSIANS", 12_000)  # one expert's two Hessians: (48^2 + 24^2) x 4 bytes
    report = secateurs.prune_(grouped, config, data=data)
    assert passes == [range(e, e + 1) for e in range(E)] * 3  # four passes in each of the three layers
    assert {f"layers.{i}.experts.{w}" for i in range(3) for w in ("w_in", "w_out")} <= \
        {layer.name for layer in report.layers}
    for a, b in zip(whole.state_dict().values(), grouped.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@needs("transformers")
def test_streamed_sparsegpt_on_groups_of_experts_matches_in_memory(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from secateurs.methods import oneshot
    from secateurs.methods.stream import prune_streaming

    _mixtral(100).save_pretrained(tmp_path / "src")
    data = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))}
            for i in range(3)]
    config = SparseGPT(sparsity=0.5, calib_batches=3)
    prune_streaming(tmp_path / "src", tmp_path / "whole", config, data=data)
    monkeypatch.setattr(oneshot, "EXPERT_HESSIANS", 1)  # one expert per pass
    passes = []
    collect = oneshot._collect
    monkeypatch.setattr(oneshot, "_collect", lambda *a, **k: passes.append(k.get("only")) or collect(*a, **k))
    report, _ = prune_streaming(tmp_path / "src", tmp_path / "grouped", config, data=data)
    assert passes == [range(e, e + 1) for e in range(4)] * 2  # two layers of four experts
    assert "model.layers.1.mlp.experts.down_proj" in {layer.name for layer in report.layers}
    whole, grouped = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "grouped"))
    assert set(whole) == set(grouped) and all(torch.equal(whole[k], grouped[k]) for k in whole)


@needs("transformers")
@needs("compressed_tensors")
def test_a_pruned_mixture_of_experts_is_refused_by_compressed_tensors_saving(tmp_path):
    """Once pruned, the stacks are masked (parametrized): still seen as fused experts, so saving to
    compressed-tensors from the library is refused as the CLI refuses it before pruning."""
    model = _mixtral(100)
    secateurs.prune_(model, Wanda(sparsity=0.5, calib_batches=1), data=[{"input_ids": torch.randint(0, 100, (2, 8))}])
    with pytest.raises(secateurs.SecateursError, match="fused 3-D weight"):
        secateurs.save(model, tmp_path / "ct", layout="compressed-tensors", quantize="int8")
    assert not (tmp_path / "ct").exists()
