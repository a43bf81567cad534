"""Recovery fine-tuning of language models on text: LM loss, distillation, budgets, perplexity, masks, DDP, FSDP2."""

from __future__ import annotations

import copy
import doctest
import json
import textwrap

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs
from secateurs.cli import main
from secateurs.data import text as text_data
from secateurs.data.text import IGNORE_INDEX, MaskedTokens
from secateurs.errors import SecateursError
from secateurs.masks import effective_state_dict, get_mask, masked_tensors
from secateurs.train import FinetuneConfig, evaluate_dataset, finetune

pytestmark = needs("transformers")


@pytest.fixture(autouse=True)
def flush_denormals():
    """Tiny models trained to sharp predictions produce denormal floats, which x86 CPUs process ~100x slower:
    flushing them to zero keeps these tests fast (the results are the same here) without changing the library."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)  # torch's default

VOCAB = 64
MASK_ID = VOCAB - 1  # the synthetic text never uses it


def _llama(seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _bert(seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64))


def _tokens(sequences: int, seed: int, seq_len: int = 16, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Learnable text: each sequence counts up from a random start by a random stride of 1 to 3."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, MASK_ID, (sequences, 1), generator=gen)
    stride = torch.randint(1, 4, (sequences, 1), generator=gen)
    ids = (start + stride * torch.arange(seq_len)) % MASK_ID
    return [{"input_ids": ids[i : i + batch]} for i in range(0, sequences, batch)]


def _repeats(sequences: int, seed: int, seq_len: int = 16, batch: int = 16) -> list[dict[str, torch.Tensor]]:
    """Text for a small masked LM: each sequence repeats one random token, to be filled in from its neighbours."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, (sequences, 1), generator=gen).expand(sequences, seq_len).contiguous()
    return [{"input_ids": ids[i : i + batch]} for i in range(0, sequences, batch)]


def _masked(batches, seed: int = 0) -> MaskedTokens:
    return MaskedTokens(batches, mask_token_id=MASK_ID, vocab_size=MASK_ID, seed=seed)


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"optimizer": "adamw", "lr": 1e-2, "progress": False} | kw)


def _pruned(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5))
    return model, {name: mask.clone() for name, _, _, mask in masked_tensors(model)}


def _assert_masks_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    now = {name: (module, tname) for name, module, tname, _ in masked_tensors(model)}
    assert now.keys() == masks.keys() and masks
    for name, mask in masks.items():
        module, tname = now[name]
        assert torch.equal(get_mask(module, tname).cpu(), mask.cpu()), name
        assert not getattr(module, tname)[~mask].any(), name  # pruned weights are still exactly zero


def test_docstring_examples_run():
    from secateurs.train import trainer

    for module in (text_data, trainer):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# -- causal and masked language models ---------------------------------------------------------


def test_causal_lm_learns_held_out_perplexity_drops_and_masks_stay_zero():
    model, masks = _pruned(_llama())
    train, val = _tokens(32, seed=0), _tokens(8, seed=1)
    before = evaluate_dataset(model, val)
    result = finetune(model, train, val=val, config=_cfg(epochs=3))
    losses = [h["train_loss"] for h in result.history]
    assert losses[0] > losses[1] > losses[2]
    assert [h["step"] for h in result.history] == [8, 16, 24]  # 32 sequences, 4 per step
    assert result.evals[0]["step"] == 0 and result.evals[0]["val_perplexity"] == pytest.approx(before["perplexity"])
    assert result.final["perplexity"] < before["perplexity"] / 3
    assert result.final["tokens"] == before["tokens"] == 8 * 15  # every next token of the held-out sequences
    assert result.final["masked_tensors"] == len(masks) == 14
    _assert_masks_kept(model, masks)


def test_masked_lm_learns_from_masked_tokens():
    model, masks = _pruned(_bert())
    train, val = _masked(_repeats(512, seed=0)), _masked(_repeats(16, seed=1), seed=1)
    before = evaluate_dataset(model, val)
    result = finetune(model, train, val=val, config=_cfg(epochs=2))
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    assert result.final["perplexity"] < before["perplexity"] / 2
    # only the picked tokens are scored
    picked = sum(int((val[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(val)))
    assert result.final["tokens"] == picked
    _assert_masks_kept(model, masks)


def test_the_objective_must_fit_the_model():
    with pytest.raises(SecateursError, match="masked language model.*MaskedTokens"):
        finetune(_bert(), _tokens(8, seed=0), config=_cfg(max_steps=1))
    with pytest.raises(SecateursError, match="causal language model"):
        finetune(_llama(), _masked(_tokens(8, seed=0)), config=_cfg(max_steps=1))
    with pytest.raises(SecateursError, match="masked language model"):
        evaluate_dataset(_bert(), _tokens(8, seed=0))
    with pytest.raises(SecateursError, match="vocabulary has 64"):
        finetune(_llama(), [{"input_ids": torch.full((2, 8), 70)}], config=_cfg(max_steps=1))


def test_masked_tokens_are_bert_style_and_seeded():
    ids = torch.arange(4096).remainder(200).view(16, 256) + 10  # ids 10..209, never 0..9
    data = MaskedTokens([{"input_ids": ids}], mask_token_id=5, vocab_size=300, seed=3, special_ids=[10])
    items = [data[i] for i in range(len(data))]
    masked = torch.stack([it["input_ids"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    picked = labels != IGNORE_INDEX
    assert picked.float().mean().item() == pytest.approx(0.15, abs=0.015)
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    assert not picked[ids == 10].any()  # special tokens are never picked
    became = masked[picked]
    assert (became == 5).float().mean().item() == pytest.approx(0.8, abs=0.04)
    assert (became == ids[picked]).float().mean().item() == pytest.approx(0.1, abs=0.04)  # kept (or drew itself)
    # seeded by (seed, epoch, item): the same again, another epoch masks afresh
    assert torch.equal(data[7]["input_ids"], items[7]["input_ids"])
    again = MaskedTokens([{"input_ids": ids}], mask_token_id=5, vocab_size=300, seed=3, special_ids=[10])
    assert torch.equal(again[7]["labels"], items[7]["labels"])
    data.set_epoch(1)
    assert not torch.equal(data[7]["labels"], items[7]["labels"])
    with pytest.raises(SecateursError, match="mask token"):
        MaskedTokens([{"input_ids": ids}], mask_token_id=None, vocab_size=300)


# -- distillation, precision, memory ------------------------------------------------------------


def test_distillation_from_the_own_dense_copy_starts_at_zero_and_mixes_linearly():
    model = _llama()
    teacher = copy.deepcopy(model)
    train = _tokens(16, seed=0)
    first = finetune(model, train, teacher=teacher, config=_cfg(kd_weight=1.0, max_steps=1))
    assert first.history[0]["train_kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first.history[0]["train_loss"] == first.history[0]["train_kd_loss"]
    assert first.history[0]["train_lm_loss"] > 3  # the LM loss is still measured: ln(64) ~ 4.2 at random init
    other = finetune(_llama(seed=1), train, teacher=_llama(seed=2), config=_cfg(kd_weight=0.3, max_steps=4))
    h = other.history[0]
    assert h["train_kd_loss"] > 0.01
    assert h["train_loss"] == pytest.approx(0.7 * h["train_lm_loss"] + 0.3 * h["train_kd_loss"], rel=1e-6)
    with pytest.raises(SecateursError, match="teacher's vocabulary has 96 tokens but the model's has 64"):
        finetune(_llama(), train, teacher=_llama(vocab=96), config=_cfg(kd_weight=0.5, max_steps=1))


def test_bf16_and_fp16_autocast():
    dtypes: list[torch.dtype] = []
    model = _llama()
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    result = finetune(model, _tokens(32, seed=0), config=_cfg(amp_dtype="bf16", epochs=2))
    assert set(dtypes) == {torch.bfloat16}
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights
    half = finetune(_llama(), _tokens(8, seed=0), config=_cfg(amp_dtype="fp16", max_steps=2))
    assert torch.isfinite(torch.tensor(half.history[0]["train_loss"]))
    with pytest.raises(SecateursError, match="amp is off"):
        FinetuneConfig(amp=False, amp_dtype="bf16")
    with pytest.raises(SecateursError, match="unknown amp_dtype"):
        FinetuneConfig(amp_dtype="fp8")


def test_gradient_checkpointing_changes_memory_not_results():
    plain, checkpointed = _llama(), _llama()
    seen: list[bool] = []
    train = _tokens(16, seed=0)
    finetune(plain, train, config=_cfg(max_steps=3))
    finetune(checkpointed, train, config=_cfg(max_steps=3, gradient_checkpointing=True),
             on_epoch_end=lambda e, m: seen.append(checkpointed.is_activation_checkpointing))
    assert seen == [True] and not checkpointed.is_activation_checkpointing  # on while training, off after
    a, b = effective_state_dict(plain)[0], effective_state_dict(checkpointed)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(SecateursError, match="gradient checkpointing needs a transformers model"):
        finetune(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), [(torch.randn(4), 0)] * 4,
                 config=_cfg(gradient_checkpointing=True))


# -- budgets and evaluation ---------------------------------------------------------------------


@pytest.mark.parametrize("budget, steps, tokens", [
    ({"max_steps": 5}, 5, 5 * 64),
    ({"max_steps": 10}, 10, 10 * 64),  # into the second epoch
    ({"max_tokens": 6 * 64}, 6, 6 * 64),
    ({"max_tokens": 3 * 64 + 1}, 4, 4 * 64),  # the step that reaches the budget is the last
    ({"max_steps": 100, "epochs": 1}, 8, 8 * 64),  # whichever ends first
])
def test_budgets_stop_exactly_and_the_schedule_ends_with_them(budget, steps, tokens):
    result = finetune(_llama(), _tokens(32, seed=0), config=_cfg(optimizer="sgd", lr=1e-3, **budget))
    assert result.history[-1]["step"] == steps and result.history[-1]["tokens"] == tokens
    assert len(result.history) == -(-steps // 8)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached zero at the last step


def test_eval_every_records_held_out_perplexity_by_step():
    val = _tokens(8, seed=1)
    result = finetune(_llama(), _tokens(32, seed=0), val=val, config=_cfg(max_steps=5, eval_every=2))
    assert [e["step"] for e in result.evals] == [0, 2, 4, 5]
    assert [e["tokens"] for e in result.evals] == [0, 128, 256, 320]
    assert result.evals[-1]["val_perplexity"] < result.evals[0]["val_perplexity"]
    assert result.history[-1]["val_perplexity"] == result.evals[-1]["val_perplexity"] == result.final["perplexity"]


def test_text_resume_matches_an_uninterrupted_run(tmp_path):
    """A masked LM with seeded masking: the resumed run masks, shuffles and steps exactly alike."""
    train, val = _masked(_tokens(16, seed=0)), _masked(_tokens(8, seed=1), seed=1)

    def run(name: str, **kw):
        model, _ = _pruned(_bert())
        config = _cfg(epochs=2, eval_every=3, checkpoint_dir=str(tmp_path / name), **kw)
        return model, config

    whole, config = run("a")
    expected = finetune(whole, train, val=val, config=config)

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    model, config = run("b")
    with pytest.raises(Stop):
        finetune(model, train, val=val, config=config, on_epoch_end=stop)
    model, config = run("b", resume=True)
    resumed = finetune(model, train, val=val, config=config)
    assert resumed.resumed_from == 1
    assert resumed.evals == expected.evals and resumed.final == expected.final
    a, b = effective_state_dict(whole)[0], effective_state_dict(model)[0]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_text_configurations():
    with pytest.raises(SecateursError, match="max_steps must be a whole number"):
        FinetuneConfig(max_steps=0)
    with pytest.raises(SecateursError, match="fsdp shards the weights"):
        FinetuneConfig(fsdp=True, regularize="bn-l1")
    with pytest.raises(SecateursError, match="torchrun"):
        finetune(_llama(), _tokens(8, seed=0), config=_cfg(fsdp=True))
    images = [(torch.randn(4), 0)] * 4
    with pytest.raises(SecateursError, match="max_tokens counts text tokens"):
        finetune(nn.Linear(4, 2), images, config=_cfg(max_tokens=10))
    with pytest.raises(SecateursError, match="validation data"):
        finetune(_llama(), _tokens(8, seed=0), val=images, config=_cfg(max_steps=1))
    with pytest.raises(SecateursError, match="batch them twice"):
        finetune(_llama(), torch.utils.data.DataLoader(_tokens(8, seed=0)), config=_cfg(max_steps=1))


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE of 256 tokens trained on the calibration text: a real tokenizer, and small."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text_data.read_text("pydoc")], trainers.BpeTrainer(
        vocab_size=256, special_tokens=["[UNK]", "[PAD]", "[MASK]"], show_progress=False))
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            mask_token="[MASK]").save_pretrained(path)
    return path


def _hf_folder(model: nn.Module, tokenizer_dir, path):
    import shutil

    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_finetunes_a_pruned_llama_on_pydoc(tokenizer_dir, tmp_path, capsys):
    dense = _hf_folder(_llama(vocab=256), tokenizer_dir, tmp_path / "dense")
    code, _, err = run(["prune", f"hf:{dense}", "--method", "unstructured", "--sparsity", "0.5", "--no-latency",
                        "--out", str(tmp_path / "pruned"), "-q"], capsys)
    assert code == 0, err
    out_dir = tmp_path / "ft"
    code, out, err = run(["finetune", str(tmp_path / "pruned"), "--data", "pydoc", "--seq-len", "32",
                          "--max-steps", "10", "--eval-every", "5", "--optimizer", "adamw", "--lr", "1e-2",
                          "--teacher", f"hf:{dense}", "--kd-weight", "0.2", "--out", str(out_dir), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert [e["step"] for e in summary["evals"]] == [0, 5, 10]
    assert summary["before"]["perplexity"] == summary["evals"][0]["val_perplexity"]
    ppl = [e["val_perplexity"] for e in summary["evals"]]
    assert ppl[0] > ppl[1] > ppl[2] and ppl[2] < 0.8 * ppl[0]
    assert summary["final"]["perplexity"] == ppl[2]
    assert summary["config"]["seq_len"] == 32 and summary["config"]["batch_size"] is None  # 4 sequences per step
    assert summary["history"][-1]["tokens"] == 10 * 4 * 32
    assert json.loads((out_dir / "report.json").read_text())["final"] == summary["final"]
    model = secateurs.load(out_dir)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # masks survived training
    from secateurs.io.specs import load_tokenizer

    assert len(load_tokenizer(str(out_dir))) == 256  # saved with the model: eval --ppl works on it
    assert not (tmp_path / "ft.ckpt").exists()


def test_cli_masked_lm_on_a_text_file_prints_perplexity(tokenizer_dir, tmp_path, capsys):
    folder = _hf_folder(_bert(vocab=256), tokenizer_dir, tmp_path / "bert")
    text = tmp_path / "text.txt"
    text.write_text(text_data.read_text("pydoc")[:40_000])
    code, out, err = run(["finetune", f"hf:{folder}", "--data", f"text:{text}", "--seq-len", "32",
                          "--max-steps", "4", "--batch-size", "2", "--out", str(tmp_path / "ft")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "1 epochs, 4 steps" in lines[0]
    before, after = (float(v) for v in lines[1].split()[1:4:2])  # perplexity A -> B
    assert lines[1].startswith("perplexity ") and after < before
    assert secateurs.load(tmp_path / "ft").__class__.__name__ == "BertForMaskedLM"


@pytest.fixture(scope="module")
def llama_dir(tokenizer_dir, tmp_path_factory):
    return _hf_folder(_llama(vocab=256), tokenizer_dir, tmp_path_factory.mktemp("llama") / "tiny")


CLI_ERRORS = [
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "pydoc"], "needs the model's tokenizer"),
    (["finetune", "LLAMA", "--data", "digits"], "is a language model"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "digits", "--fsdp"], "launch with torchrun"),
    (["finetune", "secateurs.zoo:DigitsCNN", "--data", "digits", "--max-tokens", "100"], "--max-steps"),
    (["finetune", "LLAMA", "--data", "pydoc", "--no-amp", "--amp-dtype", "bf16"], "amp is off"),
    (["finetune", "LLAMA", "--data", "pydoc", "--amp-dtype", "fp8"], "invalid choice"),
    (["finetune", "LLAMA", "--data", "pydoc", "--max-steps", "0"], "at least 1"),
]


@pytest.mark.parametrize("argv, fragment", CLI_ERRORS, ids=[" ".join(a[3:]) for a, _ in CLI_ERRORS])
def test_bad_text_finetuning_input_exits_2_with_one_line(argv, fragment, llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [f"hf:{llama_dir}" if a == "LLAMA" else a for a in argv]
    code, out, err = run([*argv, "--out", "out"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("secateurs") and "error:" in err and fragment in err, err
    assert out == "" and list(tmp_path.iterdir()) == []


# -- torchrun: DDP and FSDP2 ----------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    import secateurs
    from secateurs.masks import effective_state_dict
    from secateurs.train import FinetuneConfig, finetune
    sys.path.insert(0, sys.argv[2])
    from test_text_finetune import CONFIG, _llama, _pruned, _tokens

    out = sys.argv[1]
    torch.set_flush_denormal(True)  # speed only: see flush_denormals in the test module
    dist.init_process_group("gloo")  # ours: finetune joins it and leaves it up for the next run
    rank = dist.get_rank()
    train, val = _tokens(32, seed=0), _tokens(8, seed=1)

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    def record(name, model, result):
        torch.save(effective_state_dict(model)[0], os.path.join(out, f"{name}{rank}.pt"))
        with open(os.path.join(out, f"{name}{rank}.json"), "w") as f:
            json.dump(result.to_dict(), f)

    for mode in ("ddp", "fsdp"):
        model, _ = _pruned(_llama())
        config = FinetuneConfig(**CONFIG, batch_size=4, fsdp=mode == "fsdp",
                                checkpoint_dir=os.path.join(out, f"{mode}-ckpt"))
        record(mode, model, finetune(model, train, val=val, config=config))
        if mode == "fsdp" and rank == 0:
            secateurs.save(model, os.path.join(out, "fsdp-model"))
    # FSDP: stopped after the first epoch, then resumed from its checkpoint
    config = FinetuneConfig(**CONFIG, batch_size=4, fsdp=True, checkpoint_dir=os.path.join(out, "resume-ckpt"))
    model, _ = _pruned(_llama())
    try:
        finetune(model, train, val=val, config=config, on_epoch_end=stop)
    except Stop:
        pass
    model, _ = _pruned(_llama())
    record("resumed", model, finetune(model, train, val=val, config=FinetuneConfig(**{**vars(config), "resume": True})))
    dist.destroy_process_group()
""")

CONFIG = {"max_steps": 12, "eval_every": 5, "optimizer": "adamw", "lr": 1e-2, "progress": False}  # 1.5 epochs


@pytest.mark.slow
def test_ddp_and_fsdp2_match_a_single_process_run(tmp_path):
    from pathlib import Path

    from test_distributed import _torchrun

    (tmp_path / "train_text.py").write_text(SCRIPT)
    proc = _torchrun(["train_text.py", str(tmp_path), str(Path(__file__).parent)], tmp_path,
                     outputs=("ddp*", "fsdp*", "resume*", "resumed*"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same global batch (4 sequences: 2 per process there) in one process
    model, masks = _pruned(_llama())
    single = finetune(model, _tokens(32, seed=0), val=_tokens(8, seed=1), config=FinetuneConfig(**CONFIG, batch_size=4))
    reference = effective_state_dict(model)[0]

    def load(name):
        return (torch.load(tmp_path / f"{name}.pt", weights_only=True), json.loads((tmp_path / f"{name}.json").read_text()))

    ddp0, r0 = load("ddp0")
    ddp1, r1 = load("ddp1")
    fsdp0, f0 = load("fsdp0")
    saved = effective_state_dict(secateurs.load(tmp_path / "fsdp-model"))[0]
    assert r0["world_size"] == 2 and r0["final"] == r1["final"]  # both ranks evaluate the whole held-out set
    assert [e["step"] for e in f0["evals"]] == [e["step"] for e in single.evals] == [0, 5, 8, 10, 12]
    for key in reference:
        assert torch.equal(ddp0[key], ddp1[key]), key  # DDP ranks agree exactly
        assert torch.equal(saved[key], fsdp0[key]), key  # the saved model is rank 0's gathered one
        for weights in (ddp0, fsdp0):  # and both match one process with the same global batch
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-5)
    for name, mask in masks.items():
        assert not fsdp0[name][~mask].any() and not ddp0[name][~mask].any(), name
    assert f0["final"]["perplexity"] == pytest.approx(single.final["perplexity"], rel=1e-4)
    assert f0["final"]["perplexity"] < f0["evals"][0]["val_perplexity"] / 2
    resumed, rr = load("resumed0")
    assert rr["resumed_from"] == 1 and rr["final"] == f0["final"]
    for key in reference:
        assert torch.equal(resumed[key], fsdp0[key]), key
    assert sorted(p.name for p in (tmp_path / "fsdp-ckpt").iterdir()) == ["last.pt"]
