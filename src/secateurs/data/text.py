"""English text for calibration and perplexity, with no download.

``pydoc`` is the prose of Python's own documentation topics
(``pydoc_data.topics``, about 460 kB, part of every Python install);
``text:FILE`` is any UTF-8 file. The first 90% of the characters are for
calibration, the last 10% are held out for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import SecateursError

__all__ = ["TEXT_HELP", "is_text_spec", "perplexity", "read_text", "token_batches"]

TEXT_HELP = "pydoc (Python's documentation prose, no download) or text:FILE"


def is_text_spec(spec: str) -> bool:
    return spec == "pydoc" or spec.startswith("text:")


def read_text(spec: str, split: str = "train") -> str:
    """The calibration (``train``) or held-out (``test``) part of the text named by ``spec``."""
    if spec == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif spec.startswith("text:"):
        path = Path(spec[5:])
        if not path.is_file():
            raise SecateursError(f"text file '{path}' does not exist: check the path")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        raise SecateursError(f"unknown text '{spec}': use {TEXT_HELP}")
    cut = int(len(text) * 0.9)
    return text[:cut] if split == "train" else text[cut:]


def token_batches(spec: str, tokenizer: Any, *, seq_len: int = 128, batch_size: int = 4,
                  max_batches: int | None = None, split: str = "train") -> list[dict[str, Tensor]]:
    """Consecutive ``seq_len``-token windows of the text as ``{"input_ids": (batch, seq_len)}`` batches."""
    text = read_text(spec, split)
    need = None if max_batches is None else max_batches * batch_size * seq_len
    # tokenize a prefix that surely holds enough tokens (a token is rarely under 2 characters)
    ids = tokenizer(text if need is None else text[: need * 8], return_tensors="pt",
                    add_special_tokens=False)["input_ids"][0]
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if not len(windows):
        raise SecateursError(f"the text '{spec}' has fewer than {seq_len} tokens: use a longer text or a smaller --seq-len")
    out = [{"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size)]
    return out[:max_batches] if max_batches else out


def perplexity(model: torch.nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """exp of the mean next-token cross-entropy over every predicted token."""
    import torch.nn.functional as F

    from ..utils import eval_mode

    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
