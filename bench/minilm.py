"""all-MiniLM-L6-v2 (real weights): one-shot sparsity and structured head/FFN removal.

For each setting: cosine similarity of the pruned model's sentence embeddings
to the dense model's and top-1 nearest-neighbour (retrieval) agreement on
held-out English sentences, plus MACs. Calibration uses other text (the first
90% of Python's documentation prose; the sentences come from the last 10%).
Run from the repository root:

    python bench/minilm.py [--sentences 256]
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
from _text import agreement, embed, minilm, sentences  # noqa: E402
from secateurs.data.text import token_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()
    dense, tokenizer = minilm()
    texts = sentences(args.sentences)
    ref = embed(dense, tokenizer, texts)
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=8, max_batches=8)
    probe = calib[0]
    macs0 = secateurs.analyze(dense, probe, latency=False, size=False).macs
    settings = {}
    for pattern, kw in (("50%", {"sparsity": 0.5}), ("2:4", {"n": 2, "m": 4})):
        settings[f"magnitude {pattern}"] = secateurs.NM(**kw) if "n" in kw else secateurs.Unstructured(**kw)
        settings[f"wanda {pattern}"] = secateurs.Wanda(calib_batches=len(calib), **kw)
        settings[f"sparsegpt {pattern}"] = secateurs.SparseGPT(calib_batches=len(calib), **kw)
    for ratio in (0.25, 0.5):
        for importance in ("l2", "activation", "taylor"):
            settings[f"heads + FFN neurons -{ratio:.0%}, {importance}"] = secateurs.Channels(
                ratio=ratio, importance=importance, calib_batches=len(calib))
    rows = []
    for label, config in settings.items():
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = secateurs.prune_(model, config, example_inputs=probe, data=calib)
        seconds = time.perf_counter() - start
        cosine, top1 = agreement(ref, embed(model, tokenizer, texts))
        attn = model.encoder.layer[0].attention.self
        rows.append({"setting": label, "cosine": cosine, "top1_agreement": top1, "seconds": seconds,
                     "macs_ratio": secateurs.analyze(model, probe, latency=False, size=False).macs / macs0,
                     "sparsity": report.sparsity if not isinstance(config, secateurs.Channels) else None,
                     "heads_layer0": attn.num_attention_heads,
                     "ffn_layer0": model.encoder.layer[0].intermediate.dense.out_features})
        print(rows[-1], flush=True)
    table = markdown_table(
        ["setting", "cosine to dense", "top-1 neighbour agreement", "MACs kept", "heads / FFN (layer 0)", "prune (s)"],
        [[r["setting"], f"{r['cosine']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['macs_ratio']:.2f}",
          f"{r['heads_layer0']} / {r['ffn_layer0']}", f"{r['seconds']:.1f}"] for r in rows])
    notes = (f"{len(texts)} held-out sentences; calibration: {len(calib)} batches of 8 x 128 tokens. Dense model: "
             "12 heads and 1536 FFN neurons per layer. Sparse settings keep dense MACs (masks); 'MACs kept' counts "
             "dense kernels. The hidden size is the model's output, so it stays 384. No fine-tuning.")
    write_results("minilm", "all-MiniLM-L6-v2: one-shot sparsity and head/FFN removal, no fine-tuning", table, rows,
                  notes)


if __name__ == "__main__":
    main()
