"""SmolLM2-135M to about 100M parameters: width, depth or both, one-shot and after distillation.

Each variant removes about 25% of the parameters:

- width: hidden size 576 -> 504 and FFN 1536 -> 1152 in every layer (heads kept),
  channels chosen by Minitron's activation importance on calibration text;
- depth: 10 of the 30 decoder layers, chosen by block influence (ShortGPT);
- both: 5 layers, then FFN 1536 -> 1152.

Every variant is measured one-shot and after logit distillation from the dense
model (KL at temperature 1, AdamW) on the pydoc calibration split, with the
same token budget each. Perplexity is on the held-out pydoc split (64 x 128
tokens, as bench/oneshot_llm.py), latency is one forward of 1 x 128 tokens on
this CPU, and every distilled model is saved with ``secateurs.save`` and loaded
back by stock transformers in a fresh process (secateurs not imported), whose
logits must match. MiniLM (a sentence-embedding BERT) gets the same width
treatment at 25% fewer parameters, scored by embedding agreement.

Run from the repository root (about 40 minutes on 2 CPU cores):

    python bench/llm_width.py [--tokens 131072] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from _text import agreement, embed, minilm, sentences, smollm  # noqa: E402
from secateurs.analysis import measure_latency  # noqa: E402
from secateurs.data.text import TokenSequences, perplexity, token_batches  # noqa: E402
from secateurs.train import FinetuneConfig, finetune  # noqa: E402

STOCK = textwrap.dedent("""
    import sys, torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    x = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        logits = model(x).logits
    assert "secateurs" not in sys.modules
    torch.save(logits, sys.argv[3])
""")


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def variants(calib: int) -> dict[str, list[object]]:
    width = secateurs.Channels(width={"hidden": 0.125, "ffn": 0.25}, importance="minitron", calib_batches=calib)
    return {
        "width (hidden 504, FFN 1152)": [width],
        "depth (20 of 30 layers)": [secateurs.Layers(n=10, importance="block_influence", calib_batches=calib)],
        "both (25 layers, FFN 1152)": [
            secateurs.Layers(n=5, importance="block_influence", calib_batches=calib),
            secateurs.Channels(width={"ffn": 0.25}, importance="minitron", calib_batches=calib)],
    }


def stock_matches(model: torch.nn.Module, probe: torch.Tensor) -> float:
    """Save, reload with transformers alone in a fresh process; the largest logit difference."""
    with tempfile.TemporaryDirectory() as tmp:
        secateurs.save(model, os.path.join(tmp, "m"))
        torch.save(probe, os.path.join(tmp, "x.pt"))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        subprocess.run([sys.executable, "-c", STOCK, os.path.join(tmp, "m"), os.path.join(tmp, "x.pt"),
                        os.path.join(tmp, "out.pt")], check=True, env=env, capture_output=True)
        stock = torch.load(os.path.join(tmp, "out.pt"), weights_only=True)
    with torch.no_grad():
        return float((stock - model(probe).logits).abs().max())


def latency_ms(model: torch.nn.Module, probe: torch.Tensor) -> float:
    return min(measure_latency(model.eval(), probe, warmup=2, repeats=10, max_seconds=5.0) for _ in range(3))


def smollm_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    dense, tokenizer = smollm()
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=8)
    held_out = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=4 if args.quick else 16,
                             split="test")
    train = TokenSequences(token_batches("pydoc", tokenizer, seq_len=args.seq_len, batch_size=args.batch_size))
    probe = held_out[0]["input_ids"][:1]
    base = {"params": params(dense), "perplexity": perplexity(dense, held_out), "latency_ms": latency_ms(dense, probe)}
    rows: list[dict[str, object]] = [{"variant": "dense", "stage": "-", **base}]
    print(rows[-1], flush=True)
    for name, configs in variants(len(calib)).items():
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        for config in configs:
            secateurs.prune_(model, config, example_inputs=probe, data=calib)
        pruned_s = time.perf_counter() - start
        shape = {"hidden": model.config.hidden_size, "ffn": model.config.intermediate_size,
                 "heads": model.config.num_attention_heads, "layers": model.config.num_hidden_layers}
        common = {"variant": name, "params": params(model), "shape": shape}
        rows.append({**common, "stage": "one-shot", "perplexity": perplexity(model, held_out),
                     "latency_ms": latency_ms(model, probe), "seconds": pruned_s})
        print(rows[-1], flush=True)
        start = time.perf_counter()
        config = FinetuneConfig(optimizer="adamw", lr=args.lr, weight_decay=0.0, kd_weight=1.0, kd_temperature=1.0,
                                max_tokens=args.tokens, batch_size=args.batch_size, amp_dtype=args.amp_dtype,
                                progress=False, seed=0)
        result = finetune(model, train, teacher=dense, config=config)
        rows.append({**common, "stage": f"distilled ({args.tokens:,} tokens)", "perplexity": perplexity(model, held_out),
                     "latency_ms": latency_ms(model, probe), "seconds": time.perf_counter() - start,
                     "steps": result.history[-1].get("step") if result.history else None,
                     "stock_reload_max_abs_diff": stock_matches(model, probe)})
        print(rows[-1], flush=True)
    return rows


def minilm_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    dense, tokenizer = minilm()
    texts = sentences(64 if args.quick else 256)
    ref = embed(dense, tokenizer, texts)
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=8, max_batches=8)
    probe = calib[0]
    rows: list[dict[str, object]] = [{"variant": "MiniLM dense", "params": params(dense), "cosine": 1.0, "top1": 1.0}]
    # BertModel's output is its hidden states, and BertConfig ties the head count to the hidden size (heads x
    # head width = hidden), so a config can describe fewer FFN neurons and fewer layers, not fewer heads
    settings = {
        "FFN 1536->320, {}": [secateurs.Channels(width={"ffn": 1216 / 1536}, importance="l2", calib_batches=8)],
        "1 of 6 layers + FFN 1536->512, {}": [
            secateurs.Layers(n=1, importance="block_influence", calib_batches=8),
            secateurs.Channels(width={"ffn": 2 / 3}, importance="l2", calib_batches=8)],
    }
    for label, configs in settings.items():
        for importance in ("l2", "minitron"):
            model = copy.deepcopy(dense)
            for config in configs:
                if isinstance(config, secateurs.Channels):
                    config = dataclasses.replace(config, importance=importance)
                secateurs.prune_(model, config, example_inputs=probe, data=calib)
            cosine, top1 = agreement(ref, embed(model, tokenizer, texts))
            rows.append({"variant": "MiniLM " + label.format(importance), "params": params(model), "cosine": cosine,
                         "top1": top1})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=131072, help="distillation budget per variant")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--amp-dtype", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--quick", action="store_true", help="smaller held-out sets (a smoke test)")
    args = parser.parse_args()
    minilm_part = minilm_rows(args)
    rows = smollm_rows(args)
    dense = rows[0]
    table = markdown_table(
        ["variant", "stage", "parameters", "perplexity", "x dense", "latency 1x128 (ms)", "stock reload"],
        [[r["variant"], r["stage"], f"{r['params'] / 1e6:.1f}M ({r['params'] / dense['params']:.0%})",
          f"{r['perplexity']:.1f}", f"{r['perplexity'] / dense['perplexity']:.2f}", f"{r['latency_ms']:.1f}",
          "-" if "stock_reload_max_abs_diff" not in r else f"max diff {r['stock_reload_max_abs_diff']:.1e}"]
         for r in rows])
    table += "\n\n" + markdown_table(
        ["MiniLM setting", "parameters", "cosine to dense", "top-1 neighbour agreement"],
        [[r["variant"], f"{r['params'] / 1e6:.1f}M ({r['params'] / minilm_part[0]['params']:.0%})",
          f"{r['cosine']:.4f}", f"{r['top1']:.3f}"] for r in minilm_part])
    notes = (f"Distillation: pure logit KD from the dense model (KL, temperature 1), AdamW lr {args.lr:g} cosine, "
             f"batches of {args.batch_size} x {args.seq_len} tokens from the pydoc calibration split (the first 90%), "
             f"{args.tokens:,} tokens per variant. Perplexity: held-out pydoc split. 'stock reload': the distilled "
             "model saved by secateurs.save, loaded by transformers' AutoModelForCausalLM in a process that never "
             "imports secateurs; the largest logit difference against the model in memory.")
    write_results("llm_width", "SmolLM2-135M at 25% fewer parameters: width, depth or both", table,
                  rows + minilm_part, notes)


if __name__ == "__main__":
    main()
