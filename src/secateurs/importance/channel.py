"""Channel importance: pure functions of a group and the model's tensors (higher = keep)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import SecateursError
from ..graph import Group, Member

__all__ = ["CHANNEL_IMPORTANCE", "NEEDS_DATA", "REDUCTIONS", "channel_scores"]

REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda s: s.mean(0),
    "max": lambda s: s.amax(0),
    "sum": lambda s: s.sum(0),
}


def _per_channel(group: Group, tensors: dict[str, Tensor], per_index: Callable[[Tensor, Member], Tensor],
                 combine: Callable[[Tensor], Tensor], members: list | None = None) -> list[Tensor]:
    """One score vector (length ``group.size``) per member."""
    out = []
    for member in members if members is not None else group.members:
        t = tensors.get(member.tensor)
        if t is None:
            continue
        values = per_index(t.detach().float(), member)  # one value per index of the member's dim
        rows = group.indices[member]  # (size, k)
        summed = values.cpu()[rows].sum(1)
        out.append(combine(summed))
    return out


def _reduce_over_other_dims(t: Tensor, dim: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    moved = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return fn(moved)


def _norm_over_other_dims(t: Tensor, dim: int, order: int) -> Tensor:
    """Per index of ``dim``, the ``order``-norm over every other dim (no moved copy of ``t``)."""
    others = tuple(i for i in range(t.dim()) if i != dim)
    return torch.linalg.vector_norm(t, order, dim=others) if others else t.abs()


def _power_sums(name: str, t: Tensor, dim: int, order: int, cache: dict | None) -> Tensor:
    """Per index of ``dim``, the sum of ``|t|**order`` over every other dim.

    With a ``cache`` (shared by all groups of one scoring), a conv weight with a
    kernel is read once for both of its channel dims: the kernel dims are reduced
    first into a small (out, in) table (no full-size temporary), which gives the
    sums along either dim. A layer's output and input channels are usually in
    different groups.
    """
    if cache is None or t.dim() < 3 or dim > 1 or t[0, 0].numel() < 4:
        return _norm_over_other_dims(t, dim, order) ** order
    table = cache.get((name, order))
    if table is None:
        table = torch.linalg.vector_norm(t, order, dim=tuple(range(2, t.dim()))) ** order
        cache[(name, order)] = table
    return table.sum(1 - dim)


def _l1(group: Group, tensors: dict[str, Tensor], params: set[str], cache: dict | None = None,
        **_: Any) -> list[Tensor]:
    members = [m for m in group.members if m.tensor in params]
    return _per_channel(group, tensors, lambda t, m: _power_sums(m.tensor, t, m.dim, 1, cache), lambda s: s, members)


def _l2(group: Group, tensors: dict[str, Tensor], params: set[str], cache: dict | None = None,
        **_: Any) -> list[Tensor]:
    members = [m for m in group.members if m.tensor in params]
    return _per_channel(group, tensors, lambda t, m: _power_sums(m.tensor, t, m.dim, 2, cache), torch.sqrt, members)


def _bn(group: Group, tensors: dict[str, Tensor], params: set[str], norm_scales: set[str], **kw: Any) -> list[Tensor]:
    members = [m for m in group.members if m.tensor in norm_scales]
    if not members:  # no normalisation layer in this group: fall back to weight magnitude
        return _l2(group, tensors, params, **kw)
    return _per_channel(group, tensors, lambda t, m: t.abs(), lambda s: s, members)


def _fpgm(group: Group, tensors: dict[str, Tensor], params: set[str], **kw: Any) -> list[Tensor]:
    """Distance to the other filters (Filter Pruning via Geometric Median): redundant filters score low."""
    scores = []
    for member in group.members:
        t = tensors.get(member.tensor)
        if member.tensor not in params or t is None or t.dim() < 2:
            continue
        idx = group.indices[member]
        rows = t.detach().float().index_select(member.dim, idx.reshape(-1)).movedim(member.dim, 0)
        rows = rows.reshape(group.size, -1)
        scores.append(torch.cdist(rows, rows).sum(1))
    return scores or _l2(group, tensors, params, **kw)


def _taylor(group: Group, tensors: dict[str, Tensor], params: set[str], stats: dict[str, Tensor] | None = None,
            **kw: Any) -> list[Tensor]:
    """Sum of |w * dL/dw| over each channel's slices (first-order Taylor, Molchanov et al.)."""
    if not stats:
        raise SecateursError("taylor importance needs gradients from data: pass data= (CLI: --data)")
    members = [m for m in group.members if m.tensor in stats]
    return _per_channel(group, stats, lambda t, m: _reduce_over_other_dims(t, m.dim, lambda x: x.sum(1)),
                        lambda s: s, members) or _l2(group, tensors, params, **kw)


def _activation(group: Group, tensors: dict[str, Tensor], params: set[str], stats: dict[str, Tensor] | None = None,
                **kw: Any) -> list[Tensor]:
    """Mean |output| of each channel of the layers that produce it, measured on data."""
    if not stats:
        raise SecateursError("activation importance needs data: pass data= (CLI: --data)")
    members = [m for m in group.members if m.dim == 0 and m.tensor in stats]
    return _per_channel(group, stats, lambda t, m: t, lambda s: s, members) or _l2(group, tensors, params, **kw)


def _minitron(group: Group, tensors: dict[str, Tensor], params: set[str], stats: dict[str, Tensor] | None = None,
              **kw: Any) -> list[Tensor]:
    """Mean |input activation| of each channel where layers read it (Minitron): summed over a channel's indices.

    ``stats`` come from :class:`~secateurs.importance.stats.InputActivationStats`:
    one vector per weight, shaped to broadcast along its input dim. Only members
    that are a weight's input dim vote (an FFN neuron by the down projection's
    input, a head by its output projection's, a hidden channel by every projection
    and LM head that reads it); a group no such layer reads falls back to ``l2``.
    """
    if not stats:
        raise SecateursError("minitron importance needs data: pass data= (CLI: --data)")

    def reads(m: Member) -> bool:
        s, t = stats.get(m.tensor), tensors.get(m.tensor)
        return (s is not None and t is not None and s.dim() == t.dim() and s.shape[m.dim] == t.shape[m.dim]
                and s.numel() == t.shape[m.dim])

    members = [m for m in group.members if reads(m)]
    return _per_channel(group, stats, lambda t, m: t.reshape(-1), lambda s: s, members) or _l2(group, tensors, params,
                                                                                            **kw)


def _obs_scores(weight: Tensor, gram: Tensor, columns: Tensor, damp: float = 0.01, rounds: int = 64) -> Tensor:
    """Greedy structured OBS (as in ZipLM): the order in which input channels can go, cheapest first.

    ``weight`` is (out, in) and ``gram`` the inputs' (in, in) Gram matrix;
    ``columns[i]`` are the columns channel ``i`` owns. Removing a set ``J`` of
    columns and refitting the others optimally raises the output error by
    ``tr(W_J (H^-1_JJ)^-1 W_J^T)``. In each of at most ``rounds`` rounds the
    cheapest channels go (one round's share of them), the weight and the inverse
    Gram matrix are updated for their removal, and the rest are priced again.
    A channel scores the cost at which it went (non-decreasing: later is more
    important); the channels never removed score above all others.
    """
    w = weight.detach().double().clone()
    h = gram.double().clone()
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * damp * float(torch.diagonal(h).mean().clamp_min(1e-12))
    dead = torch.diagonal(h) <= 0
    torch.diagonal(h)[dead] = 1.0
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    n = columns.shape[0]
    scores = torch.zeros(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    per_round = max(1, -(-n // rounds))
    level = 0.0
    while int(alive.sum()) > 1:
        ids = alive.nonzero().flatten()
        cols = columns[ids]  # (r, m)
        blocks = hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (r, m, m)
        wj = w[:, cols].permute(1, 0, 2)  # (r, out, m)
        cost = (wj @ torch.linalg.inv(blocks) * wj).sum((1, 2))
        take = min(per_round, len(ids) - 1)
        order = torch.argsort(cost, stable=True)[:take]
        for i in order.tolist():
            level = max(level, float(cost[i]))
            scores[ids[i]] = level
        gone = cols[order].reshape(-1)
        block_inv = torch.linalg.inv(hinv[gone][:, gone])
        w -= w[:, gone] @ block_inv @ hinv[gone]
        hinv -= hinv[:, gone] @ block_inv @ hinv[gone]
        w[:, gone] = 0
        alive[ids[order]] = False
    scores[alive] = level * 2 + 1.0
    return scores.float()


def _obs(group: Group, tensors: dict[str, Tensor], params: set[str], stats: dict[str, Tensor] | None = None,
         **kw: Any) -> list[Tensor]:
    """Reconstruction error a channel leaves in the layers that read it (greedy structured OBS).

    ``stats`` hold the Gram matrices of those layers' inputs
    (:class:`~secateurs.importance.stats.InputGrams`), keyed ``"<weight>@in<dim>"``
    by weight name and input dim: a member votes when it is that dim. A group no such
    layer reads (channels consumed by a grouped convolution, attention scores
    only) falls back to ``l2``.
    """
    if stats is None:
        raise SecateursError("obs importance needs data: pass data= (CLI: --data)")
    out = []
    for member in group.members:
        gram, w = stats.get(f"{member.tensor}@in{member.dim}"), tensors.get(member.tensor)
        if gram is None or w is None:
            continue
        matrix = w.detach().float().T if member.dim == 0 else w.detach().float().reshape(w.shape[0], -1)
        per = matrix.shape[1] // w.shape[member.dim]
        rows = group.indices[member]  # (size, k) channel indices of the weight's input dim
        cols = (rows.unsqueeze(2) * per + torch.arange(per)).reshape(rows.shape[0], -1)
        out.append(_obs_scores(matrix, gram.to(matrix.device), cols.to(matrix.device)))
    return out or _l2(group, tensors, params, **kw)


def _random(group: Group, tensors: dict[str, Tensor], params: set[str], generator: torch.Generator, **_: Any) -> list[Tensor]:
    return [torch.rand(group.size, generator=generator)]


CHANNEL_IMPORTANCE: dict[str, Callable[..., list[Tensor]]] = {
    "l1": _l1,
    "l2": _l2,
    "bn": _bn,
    "fpgm": _fpgm,
    "random": _random,
    "taylor": _taylor,
    "activation": _activation,
    "minitron": _minitron,
    "obs": _obs,
}

NEEDS_DATA = {"taylor", "activation", "minitron", "obs"}


def channel_scores(
    name: str,
    group: Group,
    tensors: dict[str, Tensor],
    *,
    params: set[str],
    norm_scales: set[str],
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    stats: dict[str, Tensor] | None = None,
    cache: dict | None = None,
) -> Tensor:
    """Importance of each channel of ``group`` (length ``group.size``).

    Args:
        name: ``l1``, ``l2`` (norms of every parameter slice the channel owns),
            ``bn`` (|scale| of its normalisation layers), ``fpgm``, ``random``,
            ``taylor`` (|w * grad|, needs ``stats`` from :class:`TaylorStats`),
            ``activation`` (mean |output|, needs ``stats`` from :class:`ActivationStats`) or
            ``minitron`` (mean |input| where layers read the channel, needs ``stats`` from
            :class:`InputActivationStats`).
        stats: calibration statistics by tensor name for the data-driven criteria.
        tensors: the model's parameters and buffers by name.
        params: names that are parameters (buffers such as running stats do not vote).
        norm_scales: names of normalisation-layer scales (for ``bn``).
        reduction: how per-tensor scores combine: ``mean``, ``max`` or ``sum``.
        cache: one dict shared across the groups of a model (scoring every group of a
            big model then reads each weight once for its two channel dims).
    """
    try:
        fn = CHANNEL_IMPORTANCE[name]
        reduce = REDUCTIONS[reduction]
    except KeyError:
        raise SecateursError(
            f"unknown importance '{name}' or reduction '{reduction}': importance is one of "
            f"{', '.join(CHANNEL_IMPORTANCE)}; reduction one of {', '.join(REDUCTIONS)}"
        ) from None
    per_member = fn(group, tensors, params=params, norm_scales=norm_scales,
                    generator=generator or torch.Generator().manual_seed(0), stats=stats, cache=cache)
    if not per_member:
        return torch.zeros(group.size)
    return reduce(torch.stack(per_member))
