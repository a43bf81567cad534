"""Least-squares refits of layers whose input channels were removed (layer-wise reconstruction).

A layer that read removed channels computes ``W' X_kept`` where it used to
compute ``Y = W X``. Its best weights on calibration data solve the ridge
problem ``min ||Y - W' X_kept||^2 + lambda ||W'||^2``, whose solution
``W' = (Y X_kept^T) (X_kept X_kept^T + lambda I)^-1`` needs only two
accumulated matrices: the Gram matrix of the inputs (what SparseGPT calls the
Hessian) and their cross product with the targets, both in float32 whatever
the weights' dtype. A convolution is the same problem on its unfolded input
patches. The intercept (the bias, or for a bias-free layer the running mean of
the BatchNorm that reads it) is fitted as the weight of a constant input.

Pure tensor code and in-place weight updates: which layers to refit, on what
activations and in what order is :mod:`secateurs.methods.reconstruct`'s job.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..patches import is_transposed_linear, weight_matrix

# Dampings tried when the refit chooses its own (relative to the mean squared input).
DAMP_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

__all__ = ["DAMP_GRID", "FitStats", "ShiftStats", "apply_fit_", "apply_shift_", "has_intercept"]

class FitStats:
    """Gram matrix of a layer's (pruned) inputs and their cross product with its (dense) outputs.

    With ``intercept``, a constant input of 1 is appended: its fitted weight is
    the bias. Rows are kept in ``parts`` separate sums (the caller says which
    part a batch belongs to), so that the damping can be chosen on held-out
    rows (:meth:`solve` with ``damp=None``).
    """

    def __init__(self, in_features: int, out_features: int, intercept: bool, parts: int = 1) -> None:
        d = in_features + int(intercept)
        self.intercept = intercept
        self.grams = [torch.zeros(d, d) for _ in range(parts)]
        self.crosses = [torch.zeros(out_features, d) for _ in range(parts)]
        self.energies = [0.0] * parts  # sums of squared targets, float64 via Python
        self.rows = 0

    def update(self, x: Tensor, y: Tensor, part: int = 0) -> None:
        """Add rows ``x`` (n, in) and their targets ``y`` (n, out) to ``part``."""
        x = x.detach().float()
        y = y.detach().float()
        if self.intercept:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        if self.grams[part].device != x.device:
            self.grams[part], self.crosses[part] = self.grams[part].to(x.device), self.crosses[part].to(x.device)
        self.grams[part].addmm_(x.T, x)
        self.crosses[part].addmm_(y.T, x)
        self.energies[part] += float(y.double().pow(2).sum())
        self.rows += x.shape[0]

    def _total(self, parts: list[int]) -> tuple[Tensor, Tensor, float]:
        gram = sum(self.grams[p].double().cpu() for p in parts)
        cross = sum(self.crosses[p].double().cpu() for p in parts)
        return gram, cross, sum(self.energies[p] for p in parts)

    @staticmethod
    def _residual(coef: Tensor, gram: Tensor, cross: Tensor, energy: float) -> float:
        c = coef.double().cpu()
        return max(0.0, float((c @ gram * c).sum() - 2 * (cross * c).sum() + energy))

    def error(self, coef: Tensor) -> float:
        """Relative squared error ``||Y - coef X||^2 / ||Y||^2`` of a coefficient matrix (out, in[+1])."""
        gram, cross, energy = self._total(list(range(len(self.grams))))
        return self._residual(coef, gram, cross, energy) / max(energy, 1e-30)

    def _solve(self, gram: Tensor, cross: Tensor, damp: float) -> Tensor:
        diag = torch.diagonal(gram)
        features = diag[: diag.numel() - int(self.intercept)]
        scale = float(features.mean()) if features.numel() else 1.0
        ridge = torch.ones_like(diag)
        if self.intercept:
            ridge[-1] = 0.0  # the intercept is not damped
        lam = max(damp, 1e-8) * max(scale, 1e-12)
        for _ in range(8):  # dead inputs, fewer rows than features: more damping until it factors
            chol, info = torch.linalg.cholesky_ex(gram + torch.diag(ridge * lam))
            if int(info) == 0:
                break
            lam *= 10
        else:
            chol = torch.linalg.cholesky(gram + torch.diag(torch.ones_like(diag) * lam))
        # coef @ G = C  <=>  G coef^T = C^T (G symmetric)
        return torch.cholesky_solve(cross.T, chol).T

    def choose_damp(self, grid: tuple[float, ...] = DAMP_GRID) -> float:
        """The damping (relative to the mean squared input) whose fits predict the other parts' rows best."""
        if len(self.grams) < 2:
            raise ValueError("choosing the damping needs at least two parts")
        parts = range(len(self.grams))
        best, best_error = grid[0], float("inf")
        held = [self._total([p]) for p in parts]
        rest = [self._total([q for q in parts if q != p]) for p in parts]
        for damp in grid:
            error = sum(self._residual(self._solve(g, c, damp), *held[p]) for p, (g, c, _) in zip(parts, rest,
                                                                                                    strict=True))
            if error < best_error:
                best, best_error = damp, error
        return best

    def solve(self, damp: float) -> Tensor:
        """The ridge solution (out, in[+1]) on all rows; ``damp`` is lambda relative to the mean squared input."""
        gram, cross, _ = self._total(list(range(len(self.grams))))
        return self._solve(gram, cross, damp).float()


class ShiftStats:
    """Mean difference between a layer's dense and pruned outputs per output channel (a bias correction)."""

    def __init__(self, out_features: int) -> None:
        self.total = torch.zeros(out_features, dtype=torch.float64)
        self.squares = 0.0  # sum of squared differences
        self.energy = 0.0  # sum of squared dense outputs
        self.rows = 0

    def update(self, dense: Tensor, pruned: Tensor) -> None:
        """Add rows (n, out) of the dense layer's outputs and the pruned layer's."""
        diff = dense.detach().double() - pruned.detach().double()
        self.total = self.total.to(diff.device) + diff.sum(0)
        self.squares += float(diff.pow(2).sum())
        self.energy += float(dense.detach().double().pow(2).sum())
        self.rows += diff.shape[0]

    def errors(self) -> tuple[float, float]:
        """Relative squared error before and after the shift."""
        gained = float(self.total.pow(2).sum()) / max(self.rows, 1)  # n * ||mean||^2
        scale = max(self.energy, 1e-30)
        return self.squares / scale, max(0.0, self.squares - gained) / scale

    def shift(self) -> Tensor:
        return (self.total / max(self.rows, 1)).float()


def _write_intercept(layer: nn.Module, follower: nn.Module | None, value: Tensor, add: bool) -> bool:
    """Set (or add ``value`` to) the layer's bias, or move its following BatchNorm's running mean."""
    bias = getattr(layer, "bias", None)
    if isinstance(bias, Tensor):
        if add:
            bias.data.add_(value.to(bias))
        else:
            bias.data.copy_(value.to(bias))
        return True
    if follower is not None and getattr(follower, "running_mean", None) is not None:
        # BN(y + b) = BN'(y) with BN' the same BatchNorm whose running mean is lower by b
        follower.running_mean.sub_(value.to(follower.running_mean))
        return True
    return False


def apply_fit_(layer: nn.Module, coef: Tensor, follower: nn.Module | None = None) -> None:
    """Write a :meth:`FitStats.solve` solution into ``layer`` (its intercept column, if any, as the bias)."""
    w = layer.weight
    in_features = weight_matrix(layer).shape[1]
    with torch.no_grad():
        matrix = coef[:, :in_features]
        new = matrix.T if is_transposed_linear(layer) else matrix.reshape(w.shape)
        w.data.copy_(new.to(w))
        if coef.shape[1] > in_features:
            _write_intercept(layer, follower, coef[:, in_features], add=False)


def apply_shift_(layer: nn.Module, shift: Tensor, follower: nn.Module | None = None) -> bool:
    """Add a :meth:`ShiftStats.shift` to the layer's output through its bias or following BatchNorm."""
    with torch.no_grad():
        return _write_intercept(layer, follower, shift, add=True)


def has_intercept(layer: nn.Module, follower: nn.Module | None) -> bool:
    """Whether a fitted intercept has somewhere to go (a bias, or a BatchNorm reading the output)."""
    return isinstance(getattr(layer, "bias", None), Tensor) or (
        follower is not None and getattr(follower, "running_mean", None) is not None)
