"""One-shot pruning of the real SmolLM2-135M-Instruct: magnitude vs Wanda vs SparseGPT.

Perplexity on held-out English text (the last 10% of Python's documentation
prose) at 50% unstructured, 4:8 and 2:4 sparsity, plus the seconds each took.
Wanda and SparseGPT calibrate on disjoint text (the first 90%) and run
sequentially, block by block. Run from the repository root:

    python bench/oneshot_llm.py [--calib-samples 32] [--seq-len 128] [--eval-batches 16]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from _text import pydoc_splits, smollm  # noqa: E402
from secateurs.data.text import perplexity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16, help="batches of 4 held-out sequences")
    args = parser.parse_args()
    dense, tokenizer = smollm()
    calib, held_out = pydoc_splits(tokenizer, args.seq_len, args.calib_samples, args.eval_batches)
    rows = [{"method": "dense", "pattern": "-", "perplexity": perplexity(dense, held_out), "seconds": 0.0}]
    print(rows[-1], flush=True)
    patterns = {"50%": {"sparsity": 0.5}, "4:8": {"n": 4, "m": 8}, "2:4": {"n": 2, "m": 4}}
    for pattern, kw in patterns.items():
        configs = {
            "magnitude": secateurs.NM(**kw) if "n" in kw else secateurs.Unstructured(**kw),
            "wanda": secateurs.Wanda(calib_batches=len(calib), **kw),
            "sparsegpt": secateurs.SparseGPT(calib_batches=len(calib), **kw),
        }
        for method, config in configs.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            secateurs.prune_(model, config, example_inputs=calib[0], data=calib)
            seconds = time.perf_counter() - start
            rows.append({"method": method, "pattern": pattern, "perplexity": perplexity(model, held_out),
                         "seconds": seconds})
            print(rows[-1], flush=True)
            del model
    table = markdown_table(["method", "sparsity", "perplexity (held-out)", "prune (s)"],
                           [[r["method"], r["pattern"], f"{r['perplexity']:.1f}", f"{r['seconds']:.0f}"] for r in rows])
    notes = (f"Calibration: {len(calib) * 4} sequences of {args.seq_len} tokens; held-out: "
             f"{sum(len(b['input_ids']) for b in held_out)} sequences of {args.seq_len} tokens. Every Linear layer "
             "inside the 30 decoder layers is pruned; embeddings and the LM head stay dense. CPU, fp32, 2 threads.")
    write_results("oneshot_llm", "SmolLM2-135M-Instruct, one-shot pruning (no fine-tuning)", table, rows, notes)


if __name__ == "__main__":
    main()
