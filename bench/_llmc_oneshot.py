"""llm-compressor's side of bench/llm_scale.py: one-shot Wanda 50% or SparseGPT 2:4 of a transformers folder.

Runs in llm-compressor's own venv (it pins its own torch), so it imports nothing
from secateurs. The calibration token ids come from a safetensors file that the
harness writes with secateurs' ``--calib pydoc`` sampling, so both tools see the
same 16 x 128 tokens, in batches of 4 like the prune command. The model loads in
bf16 on the CPU and goes through llm-compressor's sequential pipeline, one
``LlamaDecoderLayer`` at a time (onloaded to ``--device`` for its forward), and
is saved uncompressed (plain bf16 shards of at most 1 GB with zeros, like secateurs' output).

With ``--cpu-memory-gb X`` the model is loaded with llm-compressor's own
offloading instead (``load_offloaded_model``, ``device_map="auto_offload"``):
at most X GiB of weights stay in CPU memory and the rest is offloaded to disk.

    /work/venvs/llmc/bin/python bench/_llmc_oneshot.py --model DIR --method wanda --calib FILE --out OUT
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="transformers folder (bf16 safetensors)")
    parser.add_argument("--method", choices=("wanda", "sparsegpt24"), required=True)
    parser.add_argument("--calib", type=Path, required=True, help="safetensors file with input_ids (samples, seq_len)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="where each layer runs: cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpu-memory-gb", type=float, default=None,
                        help="load with llm-compressor's disk offloading, keeping at most this much in CPU memory")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        fail(f"'{args.model}' is not a transformers folder (no config.json): give the model folder")
    if not args.calib.is_file():
        fail(f"calibration file '{args.calib}' does not exist: run bench/llm_scale.py, which writes it")
    if args.out.exists():
        fail(f"output '{args.out}' exists: remove it or choose another --out")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the sequential pipeline onloads to CUDA whenever it sees one

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(str(args.calib))["input_ids"]
    data = DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids],
                      batch_size=args.batch_size, shuffle=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        if args.cpu_memory_gb is None:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map=None)
        else:
            from compressed_tensors.offload import load_offloaded_model

            with load_offloaded_model():
                model = AutoModelForCausalLM.from_pretrained(
                    args.model, dtype=torch.bfloat16, device_map="auto_offload",
                    max_memory={"cpu": int(args.cpu_memory_gb * 2**30)}, offload_folder=str(tmp) + "-offload")
        recipe = (WandaPruningModifier(sparsity=0.5, mask_structure="0:0") if args.method == "wanda"
                  else SparseGPTModifier(sparsity=0.5, mask_structure="2:4"))
        oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, pipeline="sequential",
                sequential_targets=["LlamaDecoderLayer"], num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1], output_dir=None)
        # 1 GB shards like the input: saving an offloaded model onloads a whole shard at a time
        model.save_pretrained(tmp, save_compressed=False, max_shard_size="1GB")
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(str(tmp) + "-offload", ignore_errors=True)
    print(f"{args.model} -> {args.out} ({args.method}, {len(ids)} x {ids.shape[1]} tokens)")


if __name__ == "__main__":
    main()
