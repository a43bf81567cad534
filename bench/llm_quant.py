"""Prune, then quantize, the real SmolLM2-135M-Instruct: perplexity and size of what a user downloads.

Dense, Wanda 50% and 2:4, SparseGPT 50% and 2:4, each saved three ways: a plain
transformers folder (float32, unquantized), and compressed-tensors folders with the
Linear weights quantized weight-only and symmetric by the compressed-tensors library
(int8 per output channel; int4 in groups along the input). Every folder is loaded back
with stock transformers (which decompresses it) and scored on held-out English text
(the last 10% of Python's documentation prose); the pruning calibrates on the first 90%.
Run from the repository root:

    python bench/llm_quant.py [--calib-samples 32] [--seq-len 128] [--eval-batches 16] [--group-size 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from _text import pydoc_splits, smollm  # noqa: E402
from secateurs.data.text import perplexity  # noqa: E402
from secateurs.io.checkpoint import serialized_size  # noqa: E402
from secateurs.io.specs import quiet_transformers  # noqa: E402
from secateurs.masks import effective_state_dict  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def stock_perplexity(folder: Path, held_out: list[dict[str, torch.Tensor]]) -> float:
    """What a user gets: stock transformers loads the folder (compressed-tensors decompresses it)."""
    import transformers

    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return perplexity(model, held_out)


def zeros_kept(model: torch.nn.Module, folder: Path) -> bool:
    """Every pruned weight of ``model`` is exactly zero in the folder as secateurs loads it back."""
    back = effective_state_dict(secateurs.load(folder))[0]
    state, masks = effective_state_dict(model)
    return all(bool((back[name][~mask] == 0).all()) for name, mask in masks.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16, help="batches of 4 held-out sequences")
    parser.add_argument("--group-size", type=int, default=64,
                        help="int4 group size (SmolLM2's 576 inputs are not a multiple of 128)")
    args = parser.parse_args()
    dense, tokenizer = smollm()
    calib, held_out = pydoc_splits(tokenizer, args.seq_len, args.calib_samples, args.eval_batches)
    variants = {
        "dense": None,
        "Wanda 50%": secateurs.Wanda(sparsity=0.5, calib_batches=len(calib)),
        "Wanda 2:4": secateurs.Wanda(n=2, m=4, calib_batches=len(calib)),
        "SparseGPT 50%": secateurs.SparseGPT(sparsity=0.5, calib_batches=len(calib)),
        "SparseGPT 2:4": secateurs.SparseGPT(n=2, m=4, calib_batches=len(calib)),
    }
    saves = {"none (float32)": {"layout": "transformers"},
             "int8 per channel": {"layout": "compressed-tensors", "quantize": "int8"},
             f"int4 group {args.group_size}": {"layout": "compressed-tensors", "quantize": "int4",
                                               "group_size": args.group_size}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in variants.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if config is not None:
                secateurs.prune_(model, config, example_inputs=calib[0], data=calib)
            prune_s = time.perf_counter() - start
            for quant, options in saves.items():
                folder = Path(tmp) / f"{len(rows)}"
                start = time.perf_counter()
                secateurs.save(model, folder, **options)
                save_s = time.perf_counter() - start
                rows.append({
                    "model": name, "quantization": quant, "perplexity": stock_perplexity(folder, held_out),
                    "weights_bytes": weights_bytes(folder), "folder_bytes": folder_bytes(folder),
                    "secateurs_layout_bytes": serialized_size(model) if options["layout"] == "transformers" else None,
                    "pruned_zeros_kept": zeros_kept(model, folder) if config is not None else None,
                    "prune_seconds": prune_s, "save_seconds": save_s,
                })
                print(rows[-1], flush=True)
            del model
    mib = 2**20
    table = markdown_table(
        ["model", "weight quantization", "perplexity (held-out)", "weights on disk (MiB)", "vs dense float32",
         "pruned weights still 0"],
        [[r["model"], r["quantization"], f"{r['perplexity']:.1f}", f"{r['weights_bytes'] / mib:.1f}",
          f"{r['weights_bytes'] / rows[0]['weights_bytes']:.2f}x",
          "-" if r["pruned_zeros_kept"] is None else ("yes" if r["pruned_zeros_kept"] else "NO")] for r in rows])
    sparse = [r for r in rows if r["secateurs_layout_bytes"] and r["model"] != "dense"]
    notes = (
        f"Calibration: {len(calib) * 4} sequences of {args.seq_len} tokens (Wanda, SparseGPT); held-out: "
        f"{sum(len(b['input_ids']) for b in held_out)} sequences of {args.seq_len} tokens. Perplexity is measured "
        "on each saved folder loaded by stock `transformers.AutoModelForCausalLM.from_pretrained` (compressed-tensors "
        "decompresses the quantized weights to float32), on CPU. Every Linear layer inside the 30 decoder layers is "
        "pruned and quantized; the embeddings (28.3M weights, tied to the LM head) stay float32 and take "
        f"{49152 * 576 * 4 / mib:.0f} MiB of every folder, which is why int4 is not 8x smaller. "
        f"Weight quantization is round-to-nearest, symmetric (no zero point), so pruned weights dequantize to "
        "exactly 0 (checked: last column). compressed-tensors has no sparse format any more (removed in 0.15), so "
        "the quantized files are the same size with or without pruning; secateurs' own layout stores the "
        "unquantized 50%-sparse models as bitmask + values in "
        + ", ".join(f"{r['secateurs_layout_bytes'] / mib:.0f} MiB ({r['model']})" for r in sparse)
        + f". int4 uses groups of {args.group_size} because SmolLM2's 576 inputs per layer are not a multiple of "
        "128 (vLLM needs whole groups)."
    )
    write_results("llm_quant", "SmolLM2-135M-Instruct: prune, then quantize (compressed-tensors)", table, rows, notes)


if __name__ == "__main__":
    main()
