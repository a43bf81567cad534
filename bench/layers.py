"""Layer pruning on a trained CNN and on two real language models.

Parts (``--parts``, default all):

* ``cnn``: a 12-block ResNet (``secateurs.zoo:SmallResNet``) trained on
  MNIST-5k; remove 25% / 50% of its blocks by each criterion; test accuracy
  before and after one epoch of recovery, MACs and CPU latency (batch 64).
* ``minilm``: the real all-MiniLM-L6-v2; remove 1, 2, 3 of its 6 layers;
  cosine similarity of sentence embeddings to the dense model's and top-1
  nearest-neighbour agreement on held-out sentences, and latency.
* ``smollm``: the real SmolLM2-135M-Instruct (30 layers); remove 10% / 25% of
  its layers by each criterion; perplexity on held-out text.

Calibration text and held-out text are disjoint parts of Python's own
documentation prose (``pydoc_data.topics``). Run from the repository root:

    python bench/layers.py [--parts cnn,minilm,smollm]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from secateurs.analysis import measure_latency  # noqa: E402
from secateurs.data.text import perplexity, token_batches  # noqa: E402

CRITERIA = ["block_influence", "angular", "loss", "magnitude"]


def _macs(model, x) -> int:
    return secateurs.analyze(model, x, latency=False, size=False).macs


def cnn_part(rows: list[dict]) -> None:
    from secateurs.data import load_dataset
    from secateurs.train import evaluate, fit
    from secateurs.zoo import SmallResNet

    data = load_dataset("mnist5k")
    torch.manual_seed(0)
    dense = fit(SmallResNet(blocks=4), data.x_train, data.y_train, epochs=6, lr=3e-3)
    x1, xb = data.x_test[:1], data.x_test[:64]
    base = {"accuracy": evaluate(dense, data.x_test, data.y_test)["accuracy"], "macs": _macs(dense, x1)}
    rows.append({"part": "cnn", "setting": "dense (12 blocks)", **base})
    models = [dense]
    print(rows[-1], flush=True)
    calib = [(data.x_train[i : i + 64], data.y_train[i : i + 64]) for i in range(0, 512, 64)]
    for fraction, n in ((0.25, 3), (0.5, 6)):
        for criterion in CRITERIA:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = secateurs.prune_(model, secateurs.Layers(n=n, importance=criterion), example_inputs=x1,
                                      data=calib)
            seconds = time.perf_counter() - start
            one_shot = evaluate(model, data.x_test, data.y_test)["accuracy"]
            fit(model, data.x_train, data.y_train, epochs=1, lr=1e-3)
            rows.append({
                "part": "cnn", "setting": f"remove {fraction:.0%} ({n} blocks), {criterion}",
                "removed": report.plan["drop"], "one_shot_accuracy": one_shot,
                "accuracy": evaluate(model, data.x_test, data.y_test)["accuracy"], "macs": _macs(model, x1),
                "prune_seconds": seconds,
            })
            models.append(model)
            print(rows[-1], flush=True)
    _interleaved_latency(rows, models, xb)


def _interleaved_latency(rows: list[dict], models: list, inputs) -> None:
    """Latency of the last ``len(models)`` rows, measured last and interleaved over three rounds
    (best median per model): one slow moment of the machine must not decide a comparison."""
    first = len(rows) - len(models)
    for _ in range(3):
        for i, model in enumerate(models):
            lat = measure_latency(model, inputs, warmup=3, repeats=20)
            rows[first + i]["latency_ms"] = min(lat, rows[first + i].get("latency_ms", lat))


def minilm_part(rows: list[dict]) -> None:
    from _text import agreement, embed, minilm, sentences

    dense, tokenizer = minilm()
    texts = sentences(256)
    ref = embed(dense, tokenizer, texts)
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=8, max_batches=4)
    probe = calib[0]
    enc = tokenizer(texts[:32], padding=True, return_tensors="pt")
    rows.append({"part": "minilm", "setting": "dense (6 layers)", "cosine": 1.0, "top1_agreement": 1.0,
                 "macs": _macs(dense, probe), "sentences": len(texts)})
    models = [dense]
    print(rows[-1], flush=True)
    for n in (1, 2, 3):
        for criterion in CRITERIA:
            model = copy.deepcopy(dense)
            report = secateurs.prune_(model, secateurs.Layers(n=n, importance=criterion), example_inputs=probe,
                                      data=calib)
            cosine, top1 = agreement(ref, embed(model, tokenizer, texts))
            rows.append({"part": "minilm", "setting": f"remove {n} of 6, {criterion}", "removed": report.plan["drop"],
                         "cosine": cosine, "top1_agreement": top1, "macs": _macs(model, probe)})
            models.append(model)
            print(rows[-1], flush=True)
    _interleaved_latency(rows, models, dict(enc))


def smollm_part(rows: list[dict]) -> None:
    from _text import smollm

    dense, tokenizer = smollm()
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=4)
    held_out = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=8, split="test")
    rows.append({"part": "smollm", "setting": "dense (30 layers)", "perplexity": perplexity(dense, held_out)})
    print(rows[-1], flush=True)
    for fraction, n in ((0.1, 3), (0.25, 8)):
        for criterion in CRITERIA:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = secateurs.prune_(model, secateurs.Layers(n=n, importance=criterion), example_inputs=calib[0],
                                      data=calib)
            rows.append({"part": "smollm", "setting": f"remove {fraction:.0%} ({n} layers), {criterion}",
                         "removed": report.plan["drop"], "perplexity": perplexity(model, held_out),
                         "prune_seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
            del model


def _fmt(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="cnn,minilm,smollm")
    args = parser.parse_args()
    parts = args.parts.split(",")
    rows: list[dict] = []
    for name, fn in (("cnn", cnn_part), ("minilm", minilm_part), ("smollm", smollm_part)):
        if name in parts:
            fn(rows)
    tables = []
    cnn = [r for r in rows if r["part"] == "cnn"]
    if cnn:
        tables.append("## ResNet (12 blocks) on MNIST-5k\n\n" + markdown_table(
            ["setting", "test acc, one-shot", "test acc after 1 epoch", "MACs", "latency bs64 (ms)"],
            [[r["setting"], _fmt(r, "one_shot_accuracy", ".4f"), f"{r['accuracy']:.4f}", f"{r['macs'] / 1e6:.1f}M",
              f"{r['latency_ms']:.1f}"] for r in cnn]))
    mini = [r for r in rows if r["part"] == "minilm"]
    if mini:
        count = mini[0]["sentences"]
        tables.append(f"## all-MiniLM-L6-v2 (real weights), {count} held-out sentences\n\n" + markdown_table(
            ["setting", "removed", "cosine to dense", "top-1 neighbour agreement", "MACs (8x128 tokens)",
             "latency 32 sentences (ms)"],
            [[r["setting"], ", ".join(r.get("removed", [])), f"{r['cosine']:.4f}", f"{r['top1_agreement']:.3f}",
              f"{r['macs'] / 1e9:.2f}G", f"{r['latency_ms']:.1f}"] for r in mini]))
    smol = [r for r in rows if r["part"] == "smollm"]
    if smol:
        tables.append("## SmolLM2-135M-Instruct (real weights), perplexity on held-out text\n\n" + markdown_table(
            ["setting", "removed layers", "perplexity", "prune (s)"],
            [[r["setting"], ", ".join(x.rsplit(".", 1)[-1] for x in r.get("removed", [])), f"{r['perplexity']:.1f}",
              _fmt(r, "prune_seconds", ".0f")] for r in smol]))
    notes = ("No fine-tuning except the CNN's one recovery epoch (AdamW, lr 1e-3). Calibration: 8 MNIST training "
             "batches of 64 (CNN), 4 batches of 128-token windows of pydoc prose (language models); held-out text "
             "is the last 10% of the prose. Latency: median, 2 CPU threads, fp32.")
    name = "layers" if len(parts) == 3 else "layers_" + "_".join(parts)
    write_results(name, "Layer pruning: which blocks to remove, and what it costs", "\n\n".join(tables), rows, notes)


if __name__ == "__main__":
    main()
