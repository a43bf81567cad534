"""The inputs of stacked expert weights: which tokens each matrix of a 3-D weight multiplies.

Mixture-of-experts layers in transformers 5 (Mixtral, Qwen-MoE, OLMoE, DeepSeek, ...) keep all their
experts' weights in one 3-D tensor, ``(experts, out, in)``, and pick one expert's matrix inside the forward
(``F.linear(tokens, self.gate_up_proj[e])``). No module runs per expert, so forward hooks cannot tell which
tokens each expert got. :class:`StackedInputs`, a torch-function mode active while such a module runs, sees
every pick of one matrix from a watched stack and every product with it, and hands the product's input rows
to a callback as ``(weight name, expert, rows, transposed)``. It reads the model's own computation: no
per-model code, and nothing changes what the forward computes.

A product is ``F.linear(x, stack[e])`` (the matrix is ``(out, in)``) or ``x @ stack[e]`` /
``torch.matmul(x, stack[e])`` (the matrix is ``(in, out)``: ``transposed``). transformers' fused kernels
(``grouped_mm``) multiply every expert at once and cannot be read this way: :func:`secateurs.utils.eager_experts` switches a
transformers model to its per-expert ``eager`` implementation for the duration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .oneshot import InputStats

__all__ = ["ExpertStats", "StackedInputs", "stack_identities"]

OnInput = Callable[[str, int, Tensor, bool], None]

_PICK = (Tensor.__getitem__, torch._C.TensorBase.__getitem__)
_LINEAR = (F.linear,)
_MATMUL = (torch.matmul, Tensor.__matmul__, Tensor.matmul, torch._C.TensorBase.matmul)


def _expert_index(index: Any) -> int | None:
    """The expert a subscript picks: an int, or an integer tensor of one element (None: anything else)."""
    if isinstance(index, tuple) and len(index) == 1:
        index = index[0]
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, Tensor) and index.numel() == 1 and not index.is_floating_point() \
            and index.dtype != torch.bool:
        return int(index)
    return None


class StackedInputs(TorchFunctionMode):
    """Reports the input rows of every product with one matrix of a watched 3-D weight.

    Args:
        weights: ``id(tensor) -> name`` of the stacks to watch (the very tensors the forward reads).
        on_input: called as ``on_input(name, expert, rows, transposed)``; ``rows`` is ``(tokens, in)``.
    """

    def __init__(self, weights: dict[int, str], on_input: OnInput) -> None:
        super().__init__()
        self._weights = weights
        self._on_input = on_input
        self._picked: dict[int, tuple[str, int, Tensor]] = {}  # id(matrix) -> (name, expert, matrix): held, so
        # that an id is never reused by another tensor while the mode is active

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _LINEAR or func in _MATMUL:
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            picked = self._picked.get(id(weight)) if isinstance(weight, Tensor) else None
            if picked is not None and picked[2] is weight:
                name, expert, _ = picked
                x = args[0] if args else kwargs.get("input")
                self._on_input(name, expert, x.detach().reshape(-1, x.shape[-1]), func not in _LINEAR)
        out = func(*args, **kwargs)
        if func in _PICK and args and id(args[0]) in self._weights and isinstance(out, Tensor) and out.dim() == 2:
            expert = _expert_index(args[1])
            if expert is not None:
                self._picked[id(out)] = (self._weights[id(args[0])], expert, out)
        return out


class ExpertStats:
    """Input statistics of each matrix of one stacked weight, and whether its matrices are ``(in, out)``.

    With ``only``, the statistics of those experts alone are kept (the others' products still tell the layout).
    """

    def __init__(self, hessian: bool, only: range | None = None) -> None:
        self.experts: dict[int, InputStats] = {}
        self.transposed: bool | None = None  # known once a product was seen
        self._hessian = hessian
        self._only = only

    @property
    def count(self) -> int:
        return sum(s.count for s in self.experts.values())

    def update(self, expert: int, rows: Tensor, transposed: bool) -> None:
        self.transposed = transposed
        if self._only is not None and expert not in self._only:
            return
        if expert not in self.experts:
            self.experts[expert] = InputStats(rows.shape[1], self._hessian)
        self.experts[expert].update(rows)


def stack_identities(module: nn.Module, names: dict[str, str]) -> dict[int, str]:
    """``id -> target name`` of ``module``'s stacks (``tensor name -> target name``), as its forward reads them
    (call inside ``parametrize.cached()``, so that a masked stack is one tensor for the whole forward)."""
    return {id(getattr(module, tensor)): name for tensor, name in names.items()}
