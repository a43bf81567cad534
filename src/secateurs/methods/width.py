"""Width pruning a transformers config can express: every decoder layer keeps the same shape.

A transformers config has one hidden size, one head count and one FFN width
for all its layers, and stock ``from_pretrained`` rebuilds the model from it.
So for a ``PreTrainedModel`` the channel strategy works on *roles* rather than
groups: groups that are "the same thing in different layers" get the same keep
count. Roles are found from the dependency graph alone, with no per-family code:

- ``hidden``: the group that touches the input embedding matrix (it runs through
  every norm, every layer's projections and the LM head);
- ``heads``: per-layer groups whose channels are multi-index units in every tensor
  they touch (an attention head; with grouped-query attention one key/value head
  with its query group, as the tracer couples them);
- ``ffn``: the other per-layer groups (an MLP's intermediate neurons);
- ``extra``: anything else (a BERT pooler); such a group as wide as the hidden
  size follows the hidden keep count, others stay whole.

A role is keyed by its kind, its channel count and its channel width, so
every layer's FFN gets one width, every layer's attention one head count. The
hidden size and the head count are then chosen together among the values the
config can describe: candidates nearest the target first, each checked by the
config's own validation and a meta-device rebuild (:func:`config_for_plan`),
never by a rule per family.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..graph import DependencyGraph, Group
from .common import keep_count

__all__ = ["KINDS", "Role", "classify_roles", "follows_hidden", "groups_to_score", "kind_ratios", "parse_width",
           "role_targets", "uniform_removed"]

KINDS = ("hidden", "heads", "ffn")

# At most this many candidate (hidden size, head count) pairs get the full config check.
MAX_CONFIG_CHECKS = 48

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def parse_width(value: Any) -> dict[str, float | None] | None:
    """``width`` in its normal form: kind -> its own removal ratio (None: the config's ``ratio``).

    Accepts ``"heads,ffn"``, ``"heads=0.25,ffn=0.3"``, a sequence of kinds or a
    mapping kind -> ratio (or None).
    """
    if value is None:
        return None
    if isinstance(value, str):
        items: list[tuple[str, Any]] = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            kind, eq, ratio = part.partition("=")
            if eq:
                try:
                    items.append((kind.strip(), float(ratio)))
                except ValueError:
                    raise SecateursError(f"width '{part}': the ratio after '=' must be a number, e.g. "
                                         "heads=0.25") from None
            else:
                items.append((kind.strip(), None))
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [(kind, None) for kind in value]
    else:
        raise SecateursError(f"width must be kinds like 'heads,ffn' or a mapping kind -> ratio, got {value!r}")
    out: dict[str, float | None] = {}
    for kind, ratio in items:
        if kind not in KINDS:
            raise SecateursError(f"unknown width kind '{kind}': choose from {', '.join(KINDS)}")
        if kind in out:
            raise SecateursError(f"width names '{kind}' twice")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise SecateursError(f"width {kind}={ratio!r}: the ratio must be a number in [0, 1)")
            if not 0.0 <= ratio < 1.0:
                what = {"heads": "no heads", "ffn": "no FFN neurons", "hidden": "no hidden channels"}[kind]
                raise SecateursError(f"width {kind}={ratio} would leave {what}: a ratio is the fraction removed, "
                                     "in [0, 1)")
            ratio = float(ratio)
        out[kind] = ratio
    if not out:
        raise SecateursError(f"width names no kind: give some of {', '.join(KINDS)}")
    return out


@dataclass
class Role:
    """Groups that are the same thing in different layers, pruned to one keep count."""

    kind: str  # hidden, heads, ffn or extra
    size: int  # channels per group
    unit: int  # tensor indices per channel (a head's width)
    groups: list[Group] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.size, self.unit)


def _layer(name: str) -> tuple[str, ...]:
    return tuple(_NUMBER.findall(name))


def classify_roles(model: nn.Module, graph: DependencyGraph) -> list[Role]:
    """The roles of ``graph``'s groups, in order of their first group."""
    from ..selection import declared_module

    embedding = declared_module(model, "get_input_embeddings")
    embedding_ids = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    roles: dict[tuple[str, int, int], Role] = {}
    for g in graph.groups:
        layers = {_layer(m.tensor) for m in g.members}
        per_layer = len(layers) == 1 and () not in layers
        if any(id(named.get(m.tensor)) in embedding_ids for m in g.members):
            kind = "hidden"
        elif per_layer and all(g.indices[m].shape[1] > 1 for m in g.members):
            kind = "heads"
        elif per_layer:
            kind = "ffn"
        else:
            kind = "extra"
        unit = min(g.indices[m].shape[1] for m in g.members)
        role = roles.setdefault((kind, g.size, unit), Role(kind, g.size, unit))
        role.groups.append(g)
    return list(roles.values())


def _candidates(n: int, target: int, multiple: int, pruned: bool) -> list[int]:
    """Keep counts to try for a dimension of ``n`` channels: multiples of ``multiple`` below ``n``, and ``n``."""
    if not pruned:
        return [n]
    values = sorted({*range(multiple, n, multiple), n})
    return sorted(values, key=lambda k: (abs(k - target), -k))


def role_targets(roles: list[Role], ratios: dict[str, float], round_to: int,
                 whole: set[tuple[str, int, int]]) -> dict[tuple[str, int, int], int]:
    """Each role's keep count at its kind's ratio (``round_to`` honoured), before the config has its say.

    Args:
        roles: from :func:`classify_roles`.
        ratios: removal ratio per kind; kinds not named are kept whole.
        round_to: keep channel counts (in tensor indices) a multiple of this.
        whole: keys of roles to keep whole (a layer's group of theirs broke the rehearsal).
    """
    targets: dict[tuple[str, int, int], int] = {}
    for role in roles:
        ratio = ratios.get(role.kind, 0.0) or 0.0
        width = role.size * role.unit
        if ratio > 0 and round_to > width and role.key not in whole:
            what = {"hidden": "the hidden size", "heads": f"the attention width ({role.size} head groups of "
                    f"{role.unit})", "ffn": "the FFN width"}[role.kind]
            others = ",".join(k for k in KINDS if k != role.kind)
            raise SecateursError(f"round_to {round_to} is larger than {what}, {width}: lower --round-to, or prune "
                                 f"the other widths only (--width {others})")
        targets[role.key] = (keep_count(role.size, ratio, _multiple(role, round_to)) if ratio > 0 and role.key not in whole
                             else role.size)
    return targets


def kind_ratios(width: dict[str, float | None] | None, ratio: float) -> dict[str, float]:
    """Removal ratio per kind: each kind ``width`` names at its own ratio or at ``ratio``; every kind
    at ``ratio`` without a width spec. Kinds not in the result are kept whole."""
    kinds = width if width is not None else dict.fromkeys(KINDS)
    return {k: (v if v is not None else ratio) for k, v in kinds.items()}


def follows_hidden(role: Role, hidden: Role | None) -> bool:
    """An extra role as wide as the hidden size keeps the hidden size's count (it is the same width)."""
    return role.kind == "extra" and hidden is not None and role.size == hidden.size


def groups_to_score(roles: list[Role], width: dict[str, float | None] | None, ratio: float | None) -> set[int]:
    """Ids of the groups a uniform plan may cut: those of the kinds ``width`` prunes (every kind without a
    width spec, as ``ratio`` does), and the extras that follow the hidden size. The others keep every
    channel, so their scores would never be read: for the hidden size that spares reading every
    projection of the model (and float32 copies of the embeddings and LM head) for an FFN-only cut.
    """
    cut = {kind for kind, r in kind_ratios(width, ratio or 0.0).items() if r > 0}
    hidden = next((r for r in roles if r.kind == "hidden"), None)
    return {g.id for role in roles if role.kind in cut or (follows_hidden(role, hidden) and "hidden" in cut)
            for g in role.groups}


def _multiple(role: Role, round_to: int) -> int:
    """Keep counts of ``role`` are multiples of this (in channels), so widths are multiples of ``round_to``."""
    return max(1, round_to // math.gcd(round_to, role.unit))


def uniform_removed(model: nn.Module, graph: DependencyGraph, roles: list[Role], scores: dict[int, Tensor],
                    targets: dict[tuple[str, int, int], int], ratios: dict[str, float], round_to: int,
                    whole: set[tuple[str, int, int]], *, explicit: bool,
                    check: Callable[[dict[int, Tensor]], bool]) -> tuple[dict[int, Tensor], dict]:
    """Which channels go (group id -> positions), the same count for every group of a role.

    The FFN keeps its target; the hidden size and the head count are chosen
    together among the pairs nearest their targets that ``check`` accepts.

    Args:
        roles: from :func:`classify_roles`.
        scores: importance of each group's channels (the lowest go).
        targets: from :func:`role_targets`.
        ratios: removal ratio per kind named (the others are kept whole).
        round_to: as given to :func:`role_targets`.
        whole: keys of roles kept whole.
        explicit: the kinds were asked for by name: a kind the config cannot
            describe pruned is an error rather than a note.
        check: whether the config can describe the model after removing these channels.

    Returns:
        The removal map and what happened per kind: ``{"widths": {kind: [kept, total]},
        "kept_whole": {kind: reason}}`` (widths in channels: heads count key/value head groups).
    """
    kept_whole: dict[str, str] = {}
    multiples = {role.key: _multiple(role, round_to) for role in roles}
    present = {r.kind for r in roles if r.key not in whole}
    for kind in ratios:
        if kind not in present and (ratios[kind] or 0) > 0:
            kept_whole[kind] = ("nothing to prune: a layer's group of it broke the forward, so every layer keeps it"
                                if any(r.kind == kind for r in roles) else
                                "nothing to prune (none traced, or one left: a single head group is never removed)")
    hidden = next((r for r in roles if r.kind == "hidden"), None)
    heads = [r for r in roles if r.kind == "heads"]
    lead = max(heads, key=lambda r: r.size * r.unit * len(r.groups)) if heads else None
    extras = [r for r in roles if follows_hidden(r, hidden) and r.key not in whole]

    def removal(hidden_keep: int | None, heads_keep: int | None) -> dict[int, Tensor]:
        keep = dict(targets)
        if hidden is not None and hidden_keep is not None:
            keep[hidden.key] = hidden_keep
            for r in extras:
                keep[r.key] = hidden_keep
        if lead is not None and heads_keep is not None:
            for r in heads:  # every attention of the same width: one head count
                if r.size == lead.size:
                    keep[r.key] = heads_keep
        removed: dict[int, Tensor] = {}
        for role in roles:
            drop = role.size - keep[role.key]
            for g in role.groups:
                removed[g.id] = torch.argsort(scores[g.id], stable=True)[:drop] if drop > 0 else \
                    torch.empty(0, dtype=torch.long)
        return removed

    n_hidden = hidden.size if hidden is not None else 0
    n_heads = lead.size if lead is not None else 0
    hidden_options = _candidates(n_hidden, targets[hidden.key], multiples[hidden.key],
                                 targets[hidden.key] < n_hidden) if hidden is not None else [None]
    heads_options = _candidates(n_heads, targets[lead.key], multiples[lead.key],
                                targets[lead.key] < n_heads) if lead is not None else [None]
    config = getattr(model, "config", None)
    attention_heads = getattr(config, "num_attention_heads", None)

    def order(pair: tuple[int | None, int | None]) -> tuple:
        h, k = pair
        far = (abs(h - targets[hidden.key]) / n_hidden if h is not None else 0.0) + \
              (abs(k - targets[lead.key]) / n_heads if k is not None else 0.0)
        # the attention heads left must divide the hidden size in most configs: try those first
        divides = True
        if h is not None and k is not None and type(attention_heads) is int and attention_heads % n_heads == 0:
            divides = h % (attention_heads // n_heads * k) == 0
        return (not divides, round(far, 9), -(h or 0), -(k or 0))

    pairs = sorted(((h, k) for h in hidden_options for k in heads_options), key=order)
    chosen = None
    for tried, (h, k) in enumerate(pairs[:MAX_CONFIG_CHECKS]):
        removed = removal(h, k)
        if check(removed):
            chosen = (h, k, removed)
            break
        if tried == 0 and (h, k) != (n_hidden or None, n_heads or None) and not check(removal(
                n_hidden or None, n_heads or None)):
            break  # not even the hidden size and heads left whole: the rest (an FFN width) is the trouble
    if chosen is None:
        cls = type(config).__name__ if config is not None else "the config"
        raise SecateursError(
            f"no {cls} describes the pruned shapes (tried {min(len(pairs), MAX_CONFIG_CHECKS)} hidden size / head "
            "count pairs nearest the target): prune fewer kinds (--width), change --round-to, or ask for "
            "per-layer widths with --scope global and save with secateurs.save")
    h, k, removed = chosen
    for kind, role, got in (("hidden", hidden, h), ("heads", lead, k)):
        if role is None or got is None or kind not in ratios or role.key in whole:
            continue
        if got == role.size and targets[role.key] < role.size:
            cls = type(config).__name__
            reason = (f"{cls} cannot describe fewer {kind} at this "
                      f"{'head count' if kind == 'hidden' else 'hidden size'}")
            if explicit:
                other = "heads" if kind == "hidden" else "hidden"
                hint = (f"prune {kind} together with {other} (--width {kind},{other})" if other not in ratios
                        else "change the ratios or --round-to")
                raise SecateursError(f"{reason}: {hint}")
            kept_whole[kind] = reason
    widths: dict[str, list[int]] = {}
    for role in roles:
        if role.kind in KINDS:
            kept = role.size - int(removed[role.groups[0].id].numel())
            widths.setdefault(role.kind, [kept, role.size])
    return removed, {"widths": widths, "kept_whole": kept_whole}
