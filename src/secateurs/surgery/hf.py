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


def _rebuilds(model: nn.Module, config: Any, want: dict[str, tuple[int, ...]]) -> bool:
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # a config the class rejects (e.g. heads not dividing the width)
        return False
    return {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == want


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
    values = {k: v for k, v in config.to_dict().items() if type(v) is int and v > 1}
    single = {old: next(iter(new)) for old, new in changes.items() if len(new) == 1}
    proposals: dict[str, int] = {}
    for key, value in values.items():
        if value in single:
            proposals[key] = single[value]
    for key, value in values.items():
        if key in proposals:
            continue
        for other, unit in values.items():
            if other == key or other in proposals:
                continue
            new = single.get(value * unit)
            if new is not None and new % unit == 0:
                proposals[key] = new // unit  # e.g. heads x head_dim = projection width
                break
    want = _shapes(model)
    candidate = dict(proposals)
    while True:
        trial = config.__class__.from_dict({**config.to_dict(), **candidate})
        if _rebuilds(model, trial, want):
            for key, value in candidate.items():
                setattr(config, key, value)
            return candidate
        # drop the proposal whose removal helps (coincidences like vocab == old width)
        for key in list(candidate):
            rest = {k: v for k, v in candidate.items() if k != key}
            if _rebuilds(model, config.__class__.from_dict({**config.to_dict(), **rest}), want):
                for k, v in rest.items():
                    setattr(config, k, v)
                return rest
        if not candidate:
            return None
        candidate.pop(next(iter(candidate)))
