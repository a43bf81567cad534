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

    ``indices[member][c]`` are the indices of ``member``'s dimension that belong
    to channel ``c`` (usually one, several after a flatten or for grouped convs).
    """

    id: int
    members: list[Member]
    indices: dict[Member, list[Tensor]]
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

    def group_of(self, tensor: str, dim: int) -> list[Group]:
        member = Member(tensor, dim)
        return [g for g in self.groups if member in g.indices]


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
    shapes: dict[str, tuple[int, ...]] = {}
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    # channel root -> member -> index list
    channels: dict[int, dict[Member, Tensor]] = defaultdict(dict)
    for name, labels in trace.tensor_labels.items():
        shapes[name] = tuple(state[name].shape) if name in state else tuple(lab.numel() for lab in labels)
        for dim, lab in enumerate(labels):
            r = roots[lab]
            if lab.numel() <= 1:
                continue
            order = torch.argsort(r, stable=True)
            sorted_roots = r[order]
            uniq, counts = torch.unique_consecutive(sorted_roots, return_counts=True)
            for root, idx in zip(uniq.tolist(), torch.split(order, counts.tolist()), strict=True):
                if root != 0:
                    channels[root][Member(name, dim)] = idx
    # group channels by the set of members and the number of indices in each
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for root, members in channels.items():
        key = tuple(sorted(((m.tensor, m.dim, idx.numel()) for m, idx in members.items())))
        buckets[key].append(root)
    groups: list[Group] = []
    for key, roots_in in buckets.items():
        members = [Member(t, d) for t, d, _ in key]
        # order channels by their position in the first member's dimension
        roots_in.sort(key=lambda r: int(channels[r][members[0]].min()))
        if len(roots_in) < 2:
            continue  # a single channel can never be removed (no zero-width layers)
        indices = {m: [channels[r][m] for r in roots_in] for m in members}
        groups.append(Group(id=len(groups), members=members, indices=indices, size=len(roots_in), roots=roots_in))
    for name, labels in trace.tensor_labels.items():
        if name not in frozen and all(bool((roots[lab] == 0).all()) for lab in labels if lab.numel() > 1):
            if any(lab.numel() > 1 for lab in labels) and name in dict(model.named_parameters()):
                frozen[name] = "coupled to the model's inputs/outputs or to an operation it cannot follow"
    links = [(m, a, roots[lab]) for m, a, lab in trace.attribute_links]
    return DependencyGraph(groups=groups, tensor_shapes=shapes, unknown_calls=trace.unknown_calls,
                           frozen_tensors=frozen, size_attributes=links)
