"""English text for calibration and perplexity, with no download.

``pydoc`` is the prose of Python's own documentation topics
(``pydoc_data.topics``, about 460 kB, part of every Python install);
``text:FILE`` is any UTF-8 file. The first 90% of the characters are for
calibration, the last 10% are held out for evaluation.

For training, :class:`TokenSequences` turns token batches into a dataset of
sequences (one item each, so it can be shuffled and sharded across
processes), and :class:`MaskedTokens` masks them BERT-style for masked
language models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SecateursError

__all__ = ["IGNORE_INDEX", "TEXT_HELP", "MaskedTokens", "TokenSequences", "check_token_ids", "generates", "is_text_spec",
           "lm_loss_sum", "masked_batches", "perplexity", "read_text", "token_batches"]

IGNORE_INDEX = -100  # a label that no loss counts (torch's cross_entropy default, and transformers')

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
                    add_special_tokens=False, verbose=False)["input_ids"][0]  # windows, not one over-long input
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if not len(windows):
        raise SecateursError(f"the text '{spec}' has fewer than {seq_len} tokens: use a longer text or a smaller --seq-len")
    out = [{"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size)]
    return out[:max_batches] if max_batches else out


def check_token_ids(model: torch.nn.Module, batches: Sequence[Any]) -> None:
    """Refuse token batches whose ids the model's input embedding has no row for (a tokenizer that is not
    the model's own): the forward would fail deep inside with an index error."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        rows = getattr(get(), "num_embeddings", None) if callable(get) else None
    except (NotImplementedError, AttributeError):
        rows = None
    ids = [b["input_ids"] for b in batches if isinstance(b, dict) and isinstance(b.get("input_ids"), Tensor)]
    top = max((int(t.max()) for t in ids if t.numel()), default=-1)
    if rows is not None and top >= rows:
        raise SecateursError(f"the tokenizer gives token id {top}, but the model's embedding has only {rows} rows: "
                             "the tokenizer is not this model's; put the model's own tokenizer in its folder")


def perplexity(model: torch.nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """exp of the mean cross-entropy over every predicted token.

    Batches with ``labels`` (masked tokens, see :class:`MaskedTokens`) score the
    positions whose label is not ``IGNORE_INDEX`` (a masked LM's perplexity);
    plain ``input_ids`` score each next token (a causal LM's).
    """
    from ..utils import eval_mode

    check_token_ids(model, batches)
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            logits = getattr(model(input_ids=batch["input_ids"]), "logits", None)
            if logits is None:
                raise SecateursError(f"perplexity needs a language model that predicts tokens (a ...ForCausalLM or "
                                     f"...ForMaskedLM); {type(model).__name__} has no language-model head")
            loss, predicted = lm_loss_sum(logits, batch)
            total, count = total + float(loss), count + int(predicted)
    return float(torch.exp(torch.tensor(total / max(count, 1))))


def lm_loss_sum(logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of the predicted tokens, and how many there are.

    With ``labels`` (masked tokens) each position predicts its own label;
    without, each position predicts the next token of ``input_ids``.
    """
    import torch.nn.functional as F

    if "labels" in batch:
        scored, targets = logits, batch["labels"]
    else:
        scored, targets = logits[:, :-1], batch["input_ids"][:, 1:]
        if "attention_mask" in batch:
            targets = targets.masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    loss = F.cross_entropy(scored.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def generates(model: torch.nn.Module) -> bool | None:
    """True for a causal language model, False for a masked one (transformers' ``can_generate`` says
    which), None for a model that does not say."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else None


def masked_batches(batches: list[dict[str, Tensor]], tokenizer: Any, *, seed: int = 0) -> list[dict[str, Tensor]]:
    """``batches`` with BERT-style masked tokens and their ``labels`` (seeded), for a masked LM's perplexity."""
    items = MaskedTokens.for_tokenizer(TokenSequences(batches), tokenizer, seed=seed)
    out, start = [], 0
    for batch in batches:
        rows = [items[i] for i in range(start, start + len(batch["input_ids"]))]
        start += len(rows)
        out.append({key: torch.stack([row[key] for row in rows]) for key in rows[0]})
    return out


class TokenSequences(Dataset):
    """Token batches as a dataset of single sequences: ``{"input_ids": (seq_len,)}`` per item.

    Args:
        batches: ``{"input_ids": (batch, seq_len)}`` dicts, e.g. from :func:`token_batches`
            (other keys of the same shape, such as ``attention_mask``, are kept).

    ``batch_size`` is the size of the first batch: the trainer re-batches with
    it unless told otherwise.

    Example:
        >>> import torch
        >>> data = TokenSequences([{"input_ids": torch.arange(12).view(3, 4)}, {"input_ids": torch.arange(4)[None]}])
        >>> len(data), data[3]["input_ids"].tolist(), data.batch_size
        (4, [0, 1, 2, 3], 3)
    """

    def __init__(self, batches: Sequence[dict[str, Tensor]]) -> None:
        if not batches:
            raise SecateursError("no token batches: the text is empty (use a longer text or a smaller --seq-len)")
        keys = [k for k, v in batches[0].items() if isinstance(v, Tensor) and v.dim() == 2]
        if "input_ids" not in keys:
            raise SecateursError("token batches must hold 'input_ids' of shape (batch, seq_len)")
        self.columns = {k: torch.cat([b[k] for b in batches]) for k in keys}
        self.batch_size = len(batches[0]["input_ids"])

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class MaskedTokens(Dataset):
    """BERT-style masking for masked language models, seeded by (seed, epoch, item).

    Each token is picked with ``probability`` (at least one per sequence); a
    picked token becomes ``mask_token_id`` 80% of the time, a random token 10%,
    and stays itself 10%. ``labels`` hold the original id where a token was
    picked and :data:`IGNORE_INDEX` elsewhere, so the loss counts only those.

    The masking of item ``i`` depends only on ``(seed, epoch, i)``: a resumed
    run, or the same data sharded over several processes, masks alike. The
    trainer calls :meth:`set_epoch` so that every epoch masks afresh.

    Args:
        data: sequences (:class:`TokenSequences`) or token batches for one.
        mask_token_id: the tokenizer's mask token (``tokenizer.mask_token_id``).
        vocab_size: random replacements are drawn from ``range(vocab_size)``.
        probability: share of tokens picked (0.15 in BERT).
        seed: seeds the masking.
        special_ids: token ids never picked (e.g. ``tokenizer.all_special_ids``).

    Example:
        >>> import torch
        >>> data = MaskedTokens(TokenSequences([{"input_ids": torch.arange(5, 105).view(1, 100)}]),
        ...                     mask_token_id=1, vocab_size=200)
        >>> item = data[0]
        >>> picked = item["labels"] != IGNORE_INDEX
        >>> 5 <= int(picked.sum()) <= 30, bool((item["input_ids"][~picked] == torch.arange(5, 105)[~picked]).all())
        (True, True)
    """

    def __init__(self, data: TokenSequences | Sequence[dict[str, Tensor]], *, mask_token_id: int, vocab_size: int,
                 probability: float = 0.15, seed: int = 0, special_ids: Sequence[int] = ()) -> None:
        if mask_token_id is None:
            raise SecateursError("masked language modelling needs a mask token, and this tokenizer has none")
        if not 0.0 < probability < 1.0:
            raise SecateursError(f"the masking probability must be in (0, 1), got {probability}")
        self.data = data if isinstance(data, TokenSequences) else TokenSequences(data)
        self.batch_size = self.data.batch_size
        self.mask_token_id, self.vocab_size, self.probability = int(mask_token_id), int(vocab_size), probability
        self.seed, self.epoch = seed, 0
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    @classmethod
    def for_tokenizer(cls, data: TokenSequences | Sequence[dict[str, Tensor]], tokenizer: Any, *,
                      seed: int = 0) -> MaskedTokens:
        """Masking with ``tokenizer``'s mask token, vocabulary and special tokens (never picked)."""
        return cls(data, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), seed=seed,
                   special_ids=tokenizer.all_special_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = self.data[i]
        ids = item["input_ids"]
        # one generator per item: the masking of an item does not depend on which process draws it, or when
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
        can = ~torch.isin(ids, self.special_ids)
        if "attention_mask" in item:
            can &= item["attention_mask"].bool()
        picked = (torch.rand(ids.shape, generator=gen) < self.probability) & can
        if not picked.any() and can.any():  # a sequence with nothing to predict would give no loss
            picked[can.nonzero()[torch.randint(int(can.sum()), (1,), generator=gen)]] = True
        roll = torch.rand(ids.shape, generator=gen)
        masked = ids.clone()
        masked[picked & (roll < 0.8)] = self.mask_token_id
        swap = picked & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = torch.randint(self.vocab_size, (int(swap.sum()),), generator=gen)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[picked] = ids[picked]
        return {**item, "input_ids": masked, "labels": labels}
