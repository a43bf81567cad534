"""Channel importance: criteria that score each channel of a group (higher = keep).

A criterion is a :class:`ChannelImportance`: ``score(group, context)`` reads the
model's tensors (and, for a data-driven criterion, the statistics its ``collect``
measured once on calibration data) and never changes the model. The built-in
names (``l1``, ``l2``, ``bn``, ``fpgm``, ``random``, ``taylor``, ``activation``,
``minitron``, ``obs``) are instances in one registry, :data:`CHANNEL_IMPORTANCE`;
:func:`register_channel_importance` adds your own, and
:class:`~secateurs.Channels` takes a name or an instance.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..graph import DependencyGraph, Group, Member
from ..patches import refit_blocker
from ..selection import input_dim
from .criteria import register_criterion, resolve_criterion
from .stats import ActivationStats, InputActivationStats, InputGrams, TaylorStats

__all__ = ["CHANNEL_IMPORTANCE", "NEEDS_DATA", "REDUCTIONS", "ChannelImportance", "ScoringContext",
           "channel_importance", "channel_scores", "register_channel_importance", "score_channels"]

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


@dataclass
class ScoringContext:
    """What a criterion may read when it scores a group; one context serves every group of a model.

    Attributes:
        tensors: the model's parameters and buffers by name.
        params: names that are parameters (buffers such as running stats do not vote).
        norm_scales: names of normalisation-layer scales (for ``bn``).
        reduction: how the score vectors of the tensors a channel spans combine
            (:meth:`combine`): ``mean``, ``max`` or ``sum``.
        generator: random numbers (seeded by the config's ``seed``).
        stats: what the criterion's ``collect`` returned (None for data-free criteria).
        cache: one dict shared by the groups of one scoring, for work several groups can reuse.
    """

    tensors: dict[str, Tensor]
    params: set[str]
    norm_scales: set[str] = field(default_factory=set)
    reduction: str = "mean"
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    stats: Any = None
    cache: dict | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise SecateursError(f"unknown reduction '{self.reduction}': choose one of {', '.join(REDUCTIONS)}")

    def combine(self, group: Group, per_tensor: list[Tensor]) -> Tensor:
        """One score per channel from one vector (length ``group.size``) per tensor, by ``reduction``;
        zeros when no tensor voted."""
        if not per_tensor:
            return torch.zeros(group.size)
        return REDUCTIONS[self.reduction](torch.stack(per_tensor))


class ChannelImportance(abc.ABC):
    """A channel criterion: subclass it, name it and implement :meth:`score`.

    A data-driven criterion also sets ``needs_data = True`` and implements
    :meth:`collect`; the statistics it returns reach :meth:`score` as
    ``context.stats``. That one class is the whole criterion: register an instance
    with :func:`register_channel_importance` to use it by name (configs, recipes,
    ``--importance``), or pass the instance to :class:`~secateurs.Channels`.

    Attributes:
        name: what configs, the CLI and reports call it.
        needs_data: pruning refuses to run without ``data`` (``collect`` is still
            called whenever data is given, so a criterion may use data when it has some).
        forward_only: ``collect`` only runs forwards (no gradients) and keeps statistics of a size
            bounded by the layers' widths, so it also works on a model streamed from disk layer by
            layer (``--stream``).

    Example:
        >>> import torch, secateurs
        >>> from secateurs.importance import ChannelImportance
        >>> from secateurs.zoo import DigitsCNN
        >>> class Peak(ChannelImportance):  # the largest |w| in each channel's slices
        ...     name = "peak"
        ...     def score(self, group, context):
        ...         per_tensor = []
        ...         for m in group.members:
        ...             if m.tensor in context.params:
        ...                 w = context.tensors[m.tensor].detach().abs().movedim(m.dim, 0)
        ...                 peak = w.reshape(len(w), -1).amax(1)  # one value per index of the member's dim
        ...                 per_tensor.append(peak[group.indices[m]].amax(1))  # indices: (channels, k)
        ...         return context.combine(group, per_tensor)
        >>> model = DigitsCNN()
        >>> _ = secateurs.prune_(model, secateurs.Channels(ratio=0.25, importance=Peak()),
        ...                      example_inputs=torch.randn(1, 1, 8, 8))
        >>> model.features[0].out_channels
        24
    """

    name: str = ""
    needs_data: bool = False
    forward_only: bool = False

    def collect(self, model: nn.Module, graph: DependencyGraph, data: Any, batches: int) -> Any:
        """Statistics measured on up to ``batches`` batches of ``data``, once, before any group is scored.

        Args:
            model: the model, before anything is cut (must be left as it was).
            graph: its channel groups (``graph.groups``), as :meth:`score` will see them.
            data: calibration batches: ``x``, ``(x,)`` or ``(x, y)`` each
                (:func:`~secateurs.importance.stats.split_batch`).
            batches: how many of them to use (the config's ``calib_batches``).

        Returns:
            Anything :meth:`score` reads as ``context.stats``; None by default.
        """
        return None

    @abc.abstractmethod
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        """Importance of each channel of ``group``: a 1-D tensor of length ``group.size`` (higher = keep).

        ``group.members`` are the tensor dimensions the channels span; ``group.indices[member]``
        (``(group.size, k)``) are each channel's indices along ``member.dim`` of
        ``context.tensors[member.tensor]``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _WeightCriterion(ChannelImportance):
    """A built-in data-free criterion: one of the per-tensor functions above, combined by ``reduction``."""

    def __init__(self, name: str, fn: Callable[..., list[Tensor]]) -> None:
        self.name = name
        self._fn = fn

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return context.combine(group, self._fn(group, context.tensors, params=context.params,
                                               norm_scales=context.norm_scales, generator=context.generator,
                                               stats=context.stats, cache=context.cache))


class _DataCriterion(_WeightCriterion):
    """A built-in data-driven criterion: ``measure(model, graph, data, batches)`` gives its statistics."""

    needs_data = True

    def __init__(self, name: str, fn: Callable[..., list[Tensor]],
                 measure: Callable[[nn.Module, DependencyGraph, Any, int], Any], *, forward_only: bool = False) -> None:
        super().__init__(name, fn)
        self._measure = measure
        self.forward_only = forward_only

    def collect(self, model: nn.Module, graph: DependencyGraph, data: Any, batches: int) -> Any:
        return self._measure(model, graph, data, batches)


def _input_grams(model: nn.Module, graph: DependencyGraph, data: Any, batches: int) -> dict[str, Tensor]:
    """Gram matrices of the inputs of every layer that reads a group's channels (and can be refitted)."""
    modules = dict(model.named_modules())
    layers = set()
    for g in graph.groups:
        for m in g.members:
            name, _, attr = m.tensor.rpartition(".")
            layer = modules.get(name)
            if attr == "weight" and layer is not None and refit_blocker(layer) is None and m.dim == input_dim(layer):
                layers.add(name)
    return InputGrams(model, sorted(layers)).run(data, batches).grams


def _input_activations(model: nn.Module, graph: DependencyGraph, data: Any, batches: int) -> dict[str, Tensor]:
    """Mean |input| per channel of every layer that reads a group's channels (the votes :func:`_minitron`
    counts; other layers are not watched, so a forward can end once the last of them has run)."""
    weights = {m.tensor for g in graph.groups for m in g.members}
    return InputActivationStats(model, weights).run(data, batches).per_channel()


CHANNEL_IMPORTANCE: dict[str, ChannelImportance] = {}
"""Every criterion usable by name, built-in and registered: name -> :class:`ChannelImportance`."""


def register_channel_importance(criterion: ChannelImportance | type[ChannelImportance]) -> Any:
    """Make ``criterion`` usable by name (``Channels(importance=name)``, recipes, ``--importance``).

    Also a class decorator: ``@register_channel_importance`` on a subclass registers an
    instance (built with no arguments) and returns the class unchanged.

    Args:
        criterion: a :class:`ChannelImportance` with a ``name`` not registered yet.

    Returns:
        ``criterion``.
    """
    return register_criterion(criterion, ChannelImportance, CHANNEL_IMPORTANCE, "channel")


def channel_importance(criterion: str | ChannelImportance) -> ChannelImportance:
    """The criterion a config names: a registered name, or an instance with a name of its own."""
    return resolve_criterion(criterion, ChannelImportance, CHANNEL_IMPORTANCE)


class _NeedsData(Set):
    """Names of the registered criteria that need data (a live view of the registry)."""

    def __contains__(self, name: object) -> bool:
        found = CHANNEL_IMPORTANCE.get(name) if isinstance(name, str) else None
        return found is not None and found.needs_data

    def __iter__(self) -> Iterator[str]:
        return (name for name, c in CHANNEL_IMPORTANCE.items() if c.needs_data)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(set(self))


NEEDS_DATA: Set[str] = _NeedsData()

for _builtin in (
    _WeightCriterion("l1", _l1),
    _WeightCriterion("l2", _l2),
    _WeightCriterion("bn", _bn),
    _WeightCriterion("fpgm", _fpgm),
    _WeightCriterion("random", _random),
    _DataCriterion("taylor", _taylor, lambda model, graph, data, n: TaylorStats(model).run(data, n).scores),
    _DataCriterion("activation", _activation,
                   lambda model, graph, data, n: ActivationStats(model).run(data, n).per_channel(), forward_only=True),
    _DataCriterion("minitron", _minitron, _input_activations, forward_only=True),
    _DataCriterion("obs", _obs, _input_grams),
):
    register_channel_importance(_builtin)


def score_channels(criterion: ChannelImportance, group: Group, context: ScoringContext) -> Tensor:
    """``criterion.score(group, context)``, checked: one value per channel of ``group``."""
    scores = criterion.score(group, context)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (group.size,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise SecateursError(f"channel importance '{criterion.name}' gave {got} for a group of {group.size} channels: "
                             "score must return a 1-D tensor with one value per channel")
    return scores


def channel_scores(
    name: str | ChannelImportance,
    group: Group,
    tensors: dict[str, Tensor],
    *,
    params: set[str],
    norm_scales: set[str],
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    stats: Any = None,
    cache: dict | None = None,
) -> Tensor:
    """Importance of each channel of ``group`` (length ``group.size``).

    Args:
        name: a criterion or its registered name: ``l1``, ``l2`` (norms of every parameter
            slice the channel owns), ``bn`` (|scale| of its normalisation layers), ``fpgm``,
            ``random``, ``taylor`` (|w * grad|, needs ``stats`` from :class:`TaylorStats`),
            ``activation`` (mean |output|, needs ``stats`` from :class:`ActivationStats`),
            ``minitron`` (mean |input| where layers read the channel, needs ``stats`` from
            :class:`InputActivationStats`) or ``obs`` (needs :class:`InputGrams`).
        stats: calibration statistics (what the criterion's ``collect`` returns).
        tensors: the model's parameters and buffers by name.
        params: names that are parameters (buffers such as running stats do not vote).
        norm_scales: names of normalisation-layer scales (for ``bn``).
        reduction: how per-tensor scores combine: ``mean``, ``max`` or ``sum``.
        cache: one dict shared across the groups of a model (scoring every group of a
            big model then reads each weight once for its two channel dims).
    """
    criterion = channel_importance(name)
    context = ScoringContext(tensors=tensors, params=params, norm_scales=norm_scales, reduction=reduction,
                             generator=generator or torch.Generator().manual_seed(0), stats=stats, cache=cache)
    return score_channels(criterion, group, context)
