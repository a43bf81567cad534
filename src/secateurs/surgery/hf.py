"""Keep a transformers model's config in step with its pruned shapes.

``save_pretrained`` writes ``config.json`` and stock ``from_pretrained``
rebuilds the model from it, so its size fields (``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ...) must describe the pruned
model. Rather than knowing each family's field names, we propose updates from
the sizes that changed (a field equal to an old size, or whose product with
another field is one) and keep the set of updates under which the config
rebuilds exactly the pruned shapes, checked on the meta device.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["update_hf_config_"]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    from ..masks import effective_state_dict

    return {k: tuple(v.shape) for k, v in effective_state_dict(model)[0].items()}


def _mismatches(model: nn.Module, config: Any, want: dict[str, tuple[int, ...]]) -> int | None:
    """How many tensors a model built from ``config`` would get wrong (None: the class rejects the config)."""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # a config the class rejects (e.g. heads not dividing the width)
        return None
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return sum(have.get(k) != want.get(k) for k in set(have) | set(want))


def update_hf_config_(model: nn.Module, changes: dict[int, set[int]]) -> dict[str, int] | None:
    """Update ``model.config`` after surgery; ``changes`` maps old sizes to their new sizes.

    Returns the fields changed, or None when no set of updates rebuilds the
    pruned shapes (for example different FFN widths per layer, which a config
    cannot express); the config is then left as it was.
    """
    transformers = sys.modules.get("transformers")
    config = getattr(model, "config", None)
    if transformers is None or not isinstance(model, transformers.PreTrainedModel) or config is None:
        return None
    if not changes:
        return {}
    base = config.to_dict()
    values = {k: v for k, v in base.items() if type(v) is int and v > 1}
    single = {old: next(iter(new)) for old, new in changes.items() if len(new) == 1}
    strong = {key: single[value] for key, value in values.items() if value in single}
    weak: dict[str, int] = {}  # e.g. heads x head_dim = projection width; coincidences are common
    for key, value in values.items():
        if key in strong:
            continue
        for other, unit in values.items():
            if other == key or other in strong:
                continue
            new = single.get(value * unit)
            if new is not None and new % unit == 0:
                weak[key] = new // unit
                break
    want = _shapes(model)

    def mismatches(candidate: dict[str, int]) -> int | None:
        try:
            proposed = config.__class__.from_dict({**base, **candidate})
        except Exception:  # a config its own validation rejects (a width the head count does not divide)
            return None
        return _mismatches(model, proposed, want)

    chosen = _choose(strong, weak, mismatches)
    if chosen is not None:
        for key, value in chosen.items():
            setattr(config, key, value)
    return chosen


def _choose(strong: dict[str, int], weak: dict[str, int], mismatches: Any) -> dict[str, int] | None:
    """Add proposals one at a time, each time the one that fixes the most tensors, until all fit.

    Coincidences (a layer count equal to an old head count, a vocab size equal
    to an old width) fix nothing or break more, so they are never taken. A
    proposal that changes no shape is taken only for head counts, which the
    shapes alone cannot pin down (GPT-2's ``n_head``). On a tie, an equality
    proposal beats a product one: equality proposals go first (4 heads of 8 and
    2 heads of 16 have the same shapes; the size that changed says which is true).
    """
    proposals = {**weak, **strong}
    candidate: dict[str, int] = {}
    best = mismatches(candidate)
    if best is None:
        return None
    for phase in (strong, weak):
        while best:
            options = []
            for key, value in phase.items():
                if key not in candidate:
                    score = mismatches({**candidate, key: value})
                    if score is not None and score < best:
                        options.append((score, key, value))
            if not options:
                break
            best, key, value = min(options)
            candidate[key] = value
    if best:
        return None
    for key, value in proposals.items():
        if key not in candidate and "head" in key and mismatches({**candidate, key: value}) == 0:
            candidate[key] = value
    return candidate
