"""Coupled groups of channels, built from a label trace.

A *channel* is one connected component of labels: the set of indices, across
every parameter and buffer dimension it touches, that must be removed
together. A *group* is a set of channels that touch exactly the same tensor
dimensions (for example the 64 output channels of ``conv1`` together with
``bn1`` and the input channels of the convolutions that read them): the
natural unit for "prune 30% of this layer".
"""

from __future__ import annotations

from collections import defaultdict
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


def _group(trace: LabelTrace, model: nn.Module, frozen: dict[str, str]) -> DependencyGraph:
    roots = trace.components()
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    shapes = {name: tuple(state[name].shape) if name in state else tuple(lab.numel() for lab in labels)
              for name, labels in trace.tensor_labels.items()}
    # One row per (channel root, member dim, index), built and grouped with tensor ops:
    # models have tens of thousands of channels and Python loops over them are slow.
    members: list[Member] = []
    rows_root, rows_member, rows_index = [], [], []
    for name, labels in trace.tensor_labels.items():
        for dim, lab in enumerate(labels):
            if lab.numel() <= 1:
                continue
            r = roots[lab]
            idx = (r != 0).nonzero().flatten()
            if idx.numel() == 0:
                continue
            rows_root.append(r[idx])
            rows_member.append(torch.full_like(idx, len(members)))
            rows_index.append(idx)
            members.append(Member(name, dim))
    groups: list[Group] = []
    if members:
        root_col, member_col, index_col = torch.cat(rows_root), torch.cat(rows_member), torch.cat(rows_index)
        n_mem = len(members)
        span = int(index_col.max()) + 1
        order = torch.argsort((root_col * n_mem + member_col) * span + index_col)
        root_col, member_col, index_col = root_col[order], member_col[order], index_col[order]
        run_key, run_len = torch.unique_consecutive(root_col * n_mem + member_col, return_counts=True)
        run_start = torch.cumsum(run_len, 0) - run_len
        run_root, run_member = run_key // n_mem, run_key % n_mem
        root_ids, runs_per_root = torch.unique_consecutive(run_root, return_counts=True)
        root_first_run = torch.cumsum(runs_per_root, 0) - runs_per_root
        mem_l, len_l, nruns = run_member.tolist(), run_len.tolist(), runs_per_root.tolist()
        buckets: dict[tuple, list[int]] = defaultdict(list)
        pos = 0
        for i, n in enumerate(nruns):
            buckets[tuple(zip(mem_l[pos : pos + n], len_l[pos : pos + n], strict=True))].append(i)
            pos += n
        for signature, root_pos in buckets.items():
            if len(root_pos) < 2:
                continue  # a single channel can never be removed (no zero-width layers)
            rp = torch.tensor(root_pos)
            first = run_start[root_first_run[rp]]
            rp = rp[torch.argsort(index_col[first], stable=True)]  # channels in order of their first index
            indices: dict[Member, Tensor] = {}
            for j, (mid, k) in enumerate(signature):
                starts = run_start[root_first_run[rp] + j]
                indices[members[mid]] = index_col[starts.unsqueeze(1) + torch.arange(k)]
            group_members = [members[mid] for mid, _ in signature]
            groups.append(Group(id=len(groups), members=group_members, indices=indices, size=len(root_pos),
                                roots=root_ids[rp].tolist()))
    params = dict(model.named_parameters())
    for name, labels in trace.tensor_labels.items():
        if name in frozen or name not in params or not any(lab.numel() > 1 for lab in labels):
            continue
        if all(bool((roots[lab] == 0).all()) for lab in labels if lab.numel() > 1):
            frozen[name] = "coupled to the model's inputs/outputs or to an operation it cannot follow"
    links = [(m, a, roots[lab]) for m, a, lab in trace.attribute_links]
    return DependencyGraph(groups=groups, tensor_shapes=shapes, unknown_calls=trace.unknown_calls,
                           frozen_tensors=frozen, size_attributes=links, output_shapes=trace.output_shapes)
