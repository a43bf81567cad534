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

import copy
from typing import Any

import torch
from torch import nn

from ..utils import is_transformers_model

__all__ = ["config_for_plan", "config_misfits", "own_config_", "update_hf_config_"]

OWNS_CONFIG_ATTR = "_secateurs_owns_config"


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    from ..masks import effective_state_dict

    return {k: tuple(v.shape) for k, v in effective_state_dict(model)[0].items()}


def _rebuild(model: nn.Module, config: Any) -> nn.Module:
    """``model``'s own class built from ``config`` on the meta device (no memory; its warnings silenced).
    Raises whatever the class raises for a config it rejects."""
    import warnings

    from torch.nn.utils.parametrize import type_before_parametrizations

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type_before_parametrizations(model)(config)


def config_misfits(model: nn.Module) -> str:
    """Empty when ``model``'s class, built from ``model.config``, has every tensor of ``model`` in its
    shape (stock ``from_pretrained`` can then load it); otherwise the first differences, in words."""
    want = _shapes(model)
    try:
        fresh = _rebuild(model, model.config)
    except Exception as exc:  # the class rejects its own config
        return f"nothing: the class rejects it ({str(exc).strip().splitlines()[-1][:120]})"
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    diff = [f"{k} as {have.get(k)} for {want.get(k)}" for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    return "; ".join(diff[:2]) + (f" and {len(diff) - 2} more" if len(diff) > 2 else "")


def own_config_(model: nn.Module) -> None:
    """Give ``model`` a config object of its own before pruning changes it, in place.

    transformers keeps the very config object a model was built from, and
    ``Model(config)`` twice shares it: shrinking one model's config would
    silently change the other's (which then saves a ``config.json`` that does
    not describe its weights). The copy replaces the old object (and its
    sub-configs) wherever the model's modules hold it; done once per model.
    """
    config = getattr(model, "config", None)
    if config is None or not is_transformers_model(model) or getattr(model, OWNS_CONFIG_ATTR, False):
        return
    from transformers import PretrainedConfig

    memo: dict[int, Any] = {}
    copy.deepcopy(config, memo)
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig) and id(value) in memo:
                module.__dict__[key] = memo[id(value)]
    model.__dict__[OWNS_CONFIG_ATTR] = True


def update_hf_config_(model: nn.Module, changes: dict[int, set[int]]) -> dict[str, int] | None:
    """Update ``model.config`` after surgery; ``changes`` maps old sizes to their new sizes.

    Returns the fields changed, or None when no set of updates rebuilds the
    pruned shapes (for example different FFN widths per layer, which a config
    cannot express); the config is then left as it was.
    """
    config = getattr(model, "config", None)
    if not is_transformers_model(model) or config is None:
        return None
    if not changes:
        return {}
    chosen = _solve(model, config, _shapes(model) | _head_dims(model), changes)
    if chosen is not None:
        own_config_(model)
        config = model.config
        for key, value in chosen.items():
            setattr(config, key, value)
        _sync_int_attributes_(model)
    return chosen


def _sync_int_attributes_(model: nn.Module) -> None:
    """Give every module the integer attributes a model built from the updated config has.

    The tracer links attributes to pruned dims by value, so a coincidence (a
    ``layer_idx`` or ``num_key_value_groups`` equal to a head count) may have been
    shrunk with them; shapes stay right, but the stock model that
    ``from_pretrained`` builds from the config is the reference for the rest.
    Float attributes follow too, with the 0-dim buffers that mirror them (Gemma's
    embedding scale, sqrt(hidden_size)): stock ``from_pretrained`` computes them
    from the new config, so the pruned model must as well.
    """
    from torch.nn.utils.parametrize import type_before_parametrizations

    fresh = dict(_rebuild(model, model.config).named_modules())
    for name, module in model.named_modules():
        reference = fresh.get(name)
        if reference is None or type_before_parametrizations(module) is not type(reference):
            continue
        for key, value in list(vars(module).items()):
            wanted = vars(reference).get(key)
            if type(value) is int and type(wanted) is int and value != wanted and not key.startswith("_"):
                setattr(module, key, wanted)
            elif type(value) is float and type(wanted) is float and value != wanted and not key.startswith("_"):
                setattr(module, key, wanted)
                for buffer_name, buffer in module._buffers.items():
                    if buffer is not None and buffer.dim() == 0 and buffer.is_floating_point() and \
                            buffer_name in module._non_persistent_buffers_set and not buffer.is_meta and \
                            abs(float(buffer) - value) <= 1e-6 * abs(value):
                        buffer.fill_(wanted)


def config_for_plan(model: nn.Module, plan: Any) -> dict[str, int] | None:
    """The config updates under which ``model``'s class would rebuild the shapes ``plan`` leaves, without
    applying it (None: no set of updates does, or ``model`` is no transformers model).

    Strategies call this to choose widths a config can express before they cut.
    """
    config = getattr(model, "config", None)
    if not is_transformers_model(model) or config is None:
        return None
    want, changes = _planned(model, plan)
    return _solve(model, config, want, changes) if changes else {}


def _planned(model: nn.Module, plan: Any) -> tuple[dict[str, tuple[int, ...]], dict[int, set[int]]]:
    """The state-dict shapes after ``plan`` (tied names included) and its size changes (old -> new)."""
    plan = plan.normalized()
    want = _shapes(model) | _head_dims(model)
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, t in named.items():
        aliases.setdefault(id(t), []).append(name)
    changes: dict[int, set[int]] = {}
    for name, dims in plan.remove.items():
        names = {name, *aliases.get(id(named[name]), [])} if name in named else {name}
        old = want.get(name) or next((want[n] for n in names if n in want), None)
        if old is None:
            continue
        new = list(old)
        for dim, indices in dims.items():
            new[dim] = old[dim] - len(indices)
            changes.setdefault(old[dim], set()).add(new[dim])
        for n in names:
            if n in want:
                want[n] = tuple(new)
    for mod_name, attrs in plan.attrs.items():
        module = model.get_submodule(mod_name)
        for attr, value in attrs.items():
            old_value = vars(module).get(attr)
            if type(old_value) is int and old_value != value:
                changes.setdefault(old_value, set()).add(value)
            if f"{mod_name}#{attr}" in want:
                want[f"{mod_name}#{attr}"] = (value,)
    return want, changes


def _head_dims(model: nn.Module) -> dict[str, tuple[int]]:
    """Each attention module's ``head_dim``, as a pseudo-shape under ``"<module>#head_dim"``.

    Shapes alone cannot tell 4 heads of 8 from 2 heads of 16 (the projections
    are 32 wide either way); the modules' own head width can, and pruning whole
    heads never changes it.
    """
    return {f"{name}#head_dim": (v,) for name, m in model.named_modules()
            if type(v := vars(m).get("head_dim")) is int}


def _solve(model: nn.Module, config: Any, want: dict[str, tuple[int, ...]],
           changes: dict[int, set[int]]) -> dict[str, int] | None:
    """Config fields under which ``type(model)`` builds exactly ``want`` (None: no such set was found).

    Proposals, strongest first: a field equal to an old size takes each of its new
    sizes; a field whose product with another (or with the attention modules'
    ``head_dim``) is an old size takes the matching quotient; last, a ``head_dim``
    the config lacks or leaves unset (the modules' own, so the width of a head
    can stay while the hidden size changes: the modeling code reads it) and
    integer fields left unset (``None``, a derived default such as GPT-2's
    ``n_inner``) take each new size.
    """
    import json

    from torch.nn.utils.parametrize import type_before_parametrizations

    base = config.to_dict()
    # a prune solves the same shapes up to three times (choosing widths, rehearsing, applying)
    key = (type_before_parametrizations(model), json.dumps(base, sort_keys=True, default=str),
           frozenset(want.items()), frozenset((old, frozenset(new)) for old, new in changes.items()))
    if key in _SOLVED:
        found = _SOLVED[key]
        return dict(found) if found is not None else None
    found = _search(model, config, base, want, changes)
    _SOLVED[key] = found
    while len(_SOLVED) > 16:
        del _SOLVED[next(iter(_SOLVED))]
    return dict(found) if found is not None else None


_SOLVED: dict[tuple, dict[str, int] | None] = {}  # the last few answers of _solve (a pure function of its key)


def _search(model: nn.Module, config: Any, base: dict[str, Any], want: dict[str, tuple[int, ...]],
            changes: dict[int, set[int]]) -> dict[str, int] | None:
    import dataclasses

    values = {k: v for k, v in base.items() if type(v) is int and v > 1}
    head_dims = {v for m in model.modules() if type(v := vars(m).get("head_dim")) is int and v > 1}
    units = dict(values)
    if len(head_dims) == 1:
        units.setdefault("head_dim", next(iter(head_dims)))
    strong = [(key, new) for key, value in values.items() for new in sorted(changes.get(value, ()))]
    weak = []  # e.g. heads x head_dim = projection width; coincidences are common
    for key, value in values.items():
        for other, unit in units.items():
            if other != key:
                weak += [(key, new // unit) for new in sorted(changes.get(value * unit, ())) if new % unit == 0]
    weak = [p for p in dict.fromkeys(weak) if p not in strong]
    new_sizes = sorted({n for news in changes.values() for n in news if n > 1})
    types = ({f.name: str(f.type) for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {})
    unset = [k for k, v in base.items() if v is None and not k.endswith("_token_id")
             and types.get(k, "int").startswith("int")]
    extra = [(key, n) for key in unset for n in new_sizes]
    if len(head_dims) == 1 and base.get("head_dim") is None:
        extra = [("head_dim", next(iter(head_dims))), *(p for p in extra if p[0] != "head_dim")]
    memo: dict[frozenset, tuple[frozenset, int] | None] = {}

    def misfits(candidate: dict[str, int]) -> tuple[frozenset, int] | None:
        key = frozenset(candidate.items())
        if key not in memo:
            if len(memo) >= MAX_BUILDS:
                raise _Spent  # caught by _choose: no config found within the budget
            try:
                proposed = config.__class__.from_dict({**base, **candidate})
            except Exception:  # a config its own validation rejects (a width the head count does not divide)
                memo[key] = None
            else:
                memo[key] = _misfit_names(model, proposed, want)
        return memo[key]

    return _choose([strong, weak, extra], misfits)


def _misfit_names(model: nn.Module, config: Any, want: dict[str, tuple[int, ...]]) -> tuple[frozenset, int] | None:
    """The (tensor, dim) pairs a model built from ``config`` would get wrong (a missing or extra tensor: all
    its dims and -1), with a hash of the shapes built; None when the class rejects the config. Dims, not
    tensors: fixing one dim is progress."""
    try:
        fresh = _rebuild(model, config)
    except Exception:  # a config the class rejects (e.g. heads not dividing the width)
        return None
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()} | _head_dims(fresh)
    wrong = set()
    for k in set(have) | set(want):
        a, b = have.get(k), want.get(k)
        if a is None or b is None or len(a) != len(b):  # worse than any wrong dim of it: every dim, and one more
            wrong.update((k, d) for d in range(-1, len(a or b)))
        else:
            wrong.update((k, d) for d in range(len(a)) if a[d] != b[d])
    return frozenset(wrong), hash(frozenset(have.items()))


# Combinations of proposals tried together when no single one helps, at most this many per size.
MAX_COMBINATIONS = 400
# Configs (each validated, most rebuilt on the meta device) one search may try before it gives up.
MAX_BUILDS = 200


class _Spent(Exception):
    pass


def _choose(phases: list[list[tuple[str, int]]], misfits: Any) -> dict[str, int] | None:
    """Add proposals one at a time, each time the one that fixes the most tensors, until all fit.

    Coincidences (a layer count equal to an old head count, a vocab size equal
    to an old width) fix nothing or break more, so they are never taken. A
    proposal that changes no shape is taken only for head counts equal to an old
    size (a module's head count changed with them), which the shapes alone cannot
    pin down (GPT-2's ``n_head``). On a tie, an equality
    proposal beats a product one: equality proposals go first (4 heads of 8 and
    2 heads of 16 have the same shapes; the size that changed says which is true).
    When no single proposal helps, pairs and then triples of those that change
    something (or that the config rejects alone) are tried: a hidden size with
    the head count that must divide it, a head count with the ``head_dim`` that
    keeps each head's width. Should that end short, the search starts again from
    the equalities it took, each step taking the best of singles, pairs and
    triples (a product that fixed a few tensors early can block the right pair).
    """
    import itertools

    def search(candidate: dict[str, int], thorough: bool) -> tuple[dict[str, int], frozenset, int] | None:
        start = misfits(candidate)
        if start is None:
            return None
        current, built = start

        def shapes(extra: dict[str, int]) -> int | None:  # None: rejected
            got = misfits({**candidate, **extra})
            return None if got is None else got[1]

        def improve(options: list[dict[str, int]]) -> bool:
            nonlocal current, built
            scored = []
            for order, extra in enumerate(options):
                got = misfits({**candidate, **extra})
                if got is not None and len(got[0]) < len(current):
                    scored.append((len(got[0]), order, got))
            if not scored:
                return False
            _, order, (current, built) = min(scored, key=lambda t: t[:2])
            candidate.update(options[order])
            return True

        def combinations(sizes: tuple[int, ...]) -> list[dict[str, int]]:
            pool = [(k, v) for phase in phases for k, v in phase if k not in candidate]
            relevant = [(k, v) for k, v in pool if shapes({k: v}) != built]  # changes some shape, or is rejected
            return [dict(c) for size in sizes for c in itertools.islice(
                (c for c in itertools.combinations(relevant, size) if len({k for k, _ in c}) == size),
                MAX_COMBINATIONS)]

        def singles() -> None:  # the strongest phase that helps, from the top again after each step
            while current and any(improve([{k: v} for k, v in phase if k not in candidate]) for phase in phases):
                pass

        if thorough:
            while current and improve(combinations((1, 2, 3))):
                pass
            return candidate, current, built
        singles()
        while current:
            if not (improve(combinations((2,))) or improve(combinations((3,)))):
                break
            singles()
        return candidate, current, built

    try:
        found = search({}, thorough=False)
        if found is not None and found[1]:
            found = search({k: v for k, v in found[0].items() if (k, v) in phases[0]}, thorough=True)
        if found is None or found[1]:
            return None
        candidate, _, built = found
        for key, value in phases[0]:  # only an equality: a product that changes no shape is a coincidence
            if key not in candidate and "head" in key:
                got = misfits({**candidate, key: value})
                if got is not None and got[1] == built:
                    candidate[key] = value
    except _Spent:
        return None
    return candidate
