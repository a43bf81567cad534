"""Coupled groups of channels, built from a label trace.

A *channel* is one connected component of labels: the set of indices, across
every parameter and buffer dimension it touches, that must be removed
together. A *group* is a set of channels that touch exactly the same tensor
dimensions (for example the 64 output channels of ``conv1`` together with
``bn1`` and the input channels of the convolutions that read them): the
natural unit for "prune 30% of this layer".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .trace import LabelTrace, trace_labels

__all__ = ["Member", "Group", "DependencyGraph", "build_graph"]


@dataclass(frozen=True)
class Member:
    """One tensor dimension a group touches."""

    tensor: str  # qualified parameter/buffer name
    dim: int


@dataclass
class Group:
    """Channels that touch the same tensor dimensions.

    ``indices[member]`` is a ``(size, k)`` tensor: row ``c`` holds the indices of
    ``member``'s dimension that belong to channel ``c`` (usually ``k = 1``; more
    after a flatten into Linear or for grouped convs).
    """

    id: int
    members: list[Member]
    indices: dict[Member, Tensor]
    size: int  # number of channels
    roots: list[int] = field(default_factory=list)  # the label component of each channel

    def names(self) -> list[str]:
        return sorted({m.tensor for m in self.members})

    def describe(self) -> str:
        tensors = self.names()
        head = ", ".join(tensors[:3]) + (f", +{len(tensors) - 3} more" if len(tensors) > 3 else "")
        return f"group {self.id} ({self.size} channels: {head})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": self.size,
            "members": [{"tensor": m.tensor, "dim": m.dim} for m in self.members],
        }


@dataclass
class DependencyGraph:
    """Prunable groups of a model, and what could not be pruned and why."""

    groups: list[Group]
    tensor_shapes: dict[str, tuple[int, ...]]
    unknown_calls: dict[str, int] = field(default_factory=dict)
    frozen_tensors: dict[str, str] = field(default_factory=dict)
    # (module name, attribute, label components of the dim whose size it holds)
    size_attributes: list[tuple[str, str, Tensor]] = field(default_factory=list)
    output_shapes: Any = None  # the model's output shapes on the traced inputs

    def new_sizes(self, removed_roots: set[int]) -> dict[str, dict[str, int]]:
        """New values of size-holding attributes once the channels with these roots are gone."""
        out: dict[str, dict[str, int]] = {}
        for module, attr, roots in self.size_attributes:
            if attr in out.get(module, {}):
                continue
            gone = sum(1 for r in roots.tolist() if r in removed_roots)
            if gone:
                out.setdefault(module, {})[attr] = roots.numel() - gone
        return out



def build_graph(
    model: nn.Module, example_inputs: Any, *, frozen_tensors: dict[str, str] | None = None
) -> DependencyGraph:
    """Trace ``model`` and group its prunable channels.

    Args:
        model: the model.
        example_inputs: inputs for one forward pass.
        frozen_tensors: parameter/buffer names to keep whole, with the reason.
    """
    frozen_tensors = dict(frozen_tensors or {})
    trace = trace_labels(model, example_inputs, frozen_tensors=list(frozen_tensors))
    return _group(trace, model, frozen_tensors)


def _buckets(run_member: Tensor, run_len: Tensor, runs_per_root: Tensor,
             root_first_run: Tensor) -> dict[tuple, list[int]]:
    """Channel roots bucketed by signature: the (member, count) of each of their runs, in order.

    Roots with the same signature are channels of one group. A model has tens of
    thousands of roots but a few hundred signatures, so the roots are bucketed by
    a polynomial hash of their runs (tensor ops), every root is then checked
    run by run against its bucket's first root, and only one signature per bucket
    is built in Python. Should the check ever fail (a hash collision), the exact
    Python loop decides.
    """
    n_roots = runs_per_root.numel()
    owner = torch.repeat_interleave(torch.arange(n_roots), runs_per_root)
    position = torch.arange(run_member.numel()) - root_first_run[owner]
    value = run_member * 1_000_003 + run_len + 1
    longest = int(position.max()) + 1 if position.numel() else 1
    base = 0x9E3779B97F4A7C15  # an odd multiplier, arithmetic mod 2**64
    powers = [pow(base, j, 1 << 64) for j in range(longest)]
    powers_t = torch.tensor([p - (1 << 64) if p >= 1 << 63 else p for p in powers], dtype=torch.long)
    key = torch.zeros(n_roots, dtype=torch.long).index_add_(0, owner, value * powers_t[position])
    key = key * 0x2545F4914F6CDD1D + runs_per_root  # the run count too (collisions are caught below)
    _, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n_roots, dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(n_roots), "amin")
    rep = first[inverse]  # each root's bucket representative: the bucket's first root
    rep_run = root_first_run[rep[owner]] + position
    same = bool((runs_per_root == runs_per_root[rep]).all()) and bool(
        ((run_member == run_member[rep_run]) & (run_len == run_len[rep_run])).all())
    buckets: dict[tuple, list[int]] = {}
    if same:
        order = torch.argsort(rep, stable=True)
        reps, counts = torch.unique_consecutive(rep[order], return_counts=True)
        # the runs of each representative, back to back
        n_runs = runs_per_root[reps]
        offsets = torch.cumsum(n_runs, 0) - n_runs
        runs = torch.repeat_interleave(root_first_run[reps] - offsets, n_runs) + torch.arange(int(n_runs.sum()))
        mem_l, len_l = run_member[runs].tolist(), run_len[runs].tolist()
        # buckets in order of their first root, as the loop below makes them
        pos = 0
        for n, roots in zip(n_runs.tolist(), torch.split(order, counts.tolist()), strict=True):
            buckets[tuple(zip(mem_l[pos : pos + n], len_l[pos : pos + n], strict=True))] = roots.tolist()
            pos += n
        return buckets
    mem_l, len_l, nruns = run_member.tolist(), run_len.tolist(), runs_per_root.tolist()
    pos = 0
    for i, n in enumerate(nruns):
        buckets.setdefault(tuple(zip(mem_l[pos : pos + n], len_l[pos : pos + n], strict=True)), []).append(i)
        pos += n
    return buckets


def _group(trace: LabelTrace, model: nn.Module, frozen: dict[str, str]) -> DependencyGraph:
    roots = trace.components()
    params = dict(model.named_parameters())
    state = params | dict(model.named_buffers())
    shapes = {name: tuple(state[name].shape) if name in state else tuple(lab.numel() for lab in labels)
              for name, labels in trace.tensor_labels.items()}
    # One row per (channel root, member dim, index), built and grouped with tensor ops:
    # models have tens of thousands of channels and Python loops over them are slow.
    dims = [(name, dim, lab) for name, labels in trace.tensor_labels.items() for dim, lab in enumerate(labels)
            if lab.numel() > 1]
    members: list[Member] = []
    groups: list[Group] = []
    live_count: list[int] = []
    if dims:
        sizes = torch.tensor([lab.numel() for _, _, lab in dims])
        all_roots = roots[torch.cat([lab for _, _, lab in dims])]
        dim_of = torch.repeat_interleave(torch.arange(len(dims)), sizes)
        position = torch.arange(all_roots.numel()) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        live = all_roots != 0
        live_count = torch.bincount(dim_of[live], minlength=len(dims)).tolist()
        # members: the dims with at least one live (prunable) label, numbered in trace order
        member_of = torch.full((len(dims),), -1, dtype=torch.long)
        kept = [i for i, n in enumerate(live_count) if n]
        member_of[kept] = torch.arange(len(kept))
        members = [Member(dims[i][0], dims[i][1]) for i in kept]
        root_col, member_col, index_col = all_roots[live], member_of[dim_of[live]], position[live]
    if members:
        n_mem = len(members)
        span = int(index_col.max()) + 1
        order = torch.argsort((root_col * n_mem + member_col) * span + index_col)
        root_col, member_col, index_col = root_col[order], member_col[order], index_col[order]
        run_key, run_len = torch.unique_consecutive(root_col * n_mem + member_col, return_counts=True)
        run_start = torch.cumsum(run_len, 0) - run_len
        run_root, run_member = run_key // n_mem, run_key % n_mem
        root_ids, runs_per_root = torch.unique_consecutive(run_root, return_counts=True)
        root_first_run = torch.cumsum(runs_per_root, 0) - runs_per_root
        buckets = _buckets(run_member, run_len, runs_per_root, root_first_run)
        aranges: dict[int, Tensor] = {}
        for signature, root_pos in buckets.items():
            if len(root_pos) < 2:
                continue  # a single channel can never be removed (no zero-width layers)
            rp = torch.tensor(root_pos)
            first_run = root_first_run[rp]
            rp = rp[torch.argsort(index_col[run_start[first_run]], stable=True)]  # channels by first index
            # starts[c, j]: where channel c's run in the signature's j-th member begins
            starts = run_start[root_first_run[rp].unsqueeze(1) + torch.arange(len(signature))]
            singles = index_col[starts] if all(k == 1 for _, k in signature) else None
            indices: dict[Member, Tensor] = {}
            for j, (mid, k) in enumerate(signature):
                if singles is not None:
                    indices[members[mid]] = singles[:, j : j + 1]
                else:
                    steps = aranges.setdefault(k, torch.arange(k))
                    indices[members[mid]] = index_col[starts[:, j : j + 1] + steps]
            group_members = [members[mid] for mid, _ in signature]
            groups.append(Group(id=len(groups), members=group_members, indices=indices, size=len(root_pos),
                                roots=root_ids[rp].tolist()))
    live_names = {dims[i][0] for i, n in enumerate(live_count) if n}
    for name, labels in trace.tensor_labels.items():
        if name in frozen or name not in params or name in live_names or not any(lab.numel() > 1 for lab in labels):
            continue
        frozen[name] = "coupled to the model's inputs/outputs or to an operation it cannot follow"
    links = [(m, a, roots[lab]) for m, a, lab in trace.attribute_links]
    return DependencyGraph(groups=groups, tensor_shapes=shapes, unknown_calls=trace.unknown_calls,
                           frozen_tensors=frozen, size_attributes=links, output_shapes=trace.output_shapes)
