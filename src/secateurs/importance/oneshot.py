"""One-shot pruning with calibration statistics of a layer's inputs: Wanda and SparseGPT.

Both work on a weight in ``(out_features, in_features)`` layout and the
statistics of the inputs it saw; both return a keep-mask, and SparseGPT also
the updated weight. Pure functions: no hooks, no modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SecateursError
from ..masks import lowest_k, nm_mask

__all__ = ["InputStats", "magnitude_keep", "sparsegpt", "wanda"]


_UPDATE_CHUNK = 1 << 20  # input entries copied to float32 at once for the Hessian (4 MB)...
_UPDATE_MIN_TOKENS = 128  # ...but at least this many tokens: each update passes over the whole Hessian


class InputStats:
    """Running statistics of a Linear layer's inputs (rows are tokens), kept on the inputs' device.

    Squared norms accumulate in float64 (a vector: exact enough to rank by, for
    free); the Hessian ``X^T X`` in float32 whatever the inputs' dtype, as
    SparseGPT's reference does: half the memory of float64 for a matrix that,
    for a 70B model's down projection, holds 28672^2 entries. With the Hessian,
    its diagonal is the squared norms (no float64 copy of every input is made).
    """

    def __init__(self, in_features: int, hessian: bool):
        self.count = 0
        self.in_features = in_features
        self.with_hessian = hessian
        # made on the first batch's device (a GPU's Hessian never passes through host memory)
        self.sq_norm: Tensor | None = None
        self.hessian: Tensor | None = None
        self._factor: tuple[float, Tensor, Tensor] | None = None  # (damp, H^-1 factor, dead inputs), once spent

    def _allocate(self, device: torch.device) -> None:
        """The running sums, on ``device``, unless they exist already (once spent, nothing is allocated)."""
        if self.sq_norm is not None or self.hessian is not None or self._factor is not None:
            return
        if self.with_hessian:
            self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)
        else:
            self.sq_norm = torch.zeros(self.in_features, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> None:
        self._check_unspent()
        x = x.detach().reshape(-1, x.shape[-1])
        self._allocate(x.device)  # on the first batch
        self.count += x.shape[0]
        if self.hessian is None:
            self.sq_norm += x.to(torch.float64).square_().sum(0)
        else:  # float32 copies of a few hundred tokens at a time, not of every token of a wide input
            for part in x.split(max(_UPDATE_MIN_TOKENS, _UPDATE_CHUNK // max(x.shape[1], 1))):
                x32 = part.to(torch.float32)
                self.hessian.addmm_(x32.T, x32)

    def squared_norms(self) -> Tensor:
        """Sum of each input feature's squares over the tokens seen."""
        self._check_unspent()
        self._allocate(torch.device("cpu"))  # when no batch came
        return self.sq_norm if self.hessian is None else self.hessian.diagonal().to(torch.float64)

    def _check_unspent(self) -> None:
        if self._factor is not None:
            raise SecateursError("these input statistics were spent on SparseGPT: collect new ones")

    def inverse_hessian(self, damp: float, consume: bool = False) -> tuple[Tensor, Tensor]:
        """SparseGPT's upper Cholesky factor of the damped inverse Hessian, and the inputs that were always zero.

        ``H = X^T X / count`` is damped by ``damp`` times its mean diagonal (always-zero inputs get a 1 on the
        diagonal). One matrix of the Hessian's size (a 70B model's down projection: 28672^2) is factorised
        in place. With ``consume`` it is the statistics' own: the factor is kept, so layers that share these
        statistics (q/k/v, gate/up) reuse it, and the statistics serve nothing else afterwards.
        """
        if self._factor is not None:
            if self._factor[0] != damp:
                raise SecateursError(f"these input statistics were spent on SparseGPT with damp "
                                     f"{self._factor[0]}: collect new ones for damp {damp}")
            return self._factor[1], self._factor[2]
        if not self.with_hessian:
            raise SecateursError("SparseGPT needs the inputs' Hessian: collect the statistics with hessian=True")
        self._allocate(torch.device("cpu"))  # when no batch came
        h = self.hessian.div_(max(self.count, 1)) if consume else self.hessian / max(self.count, 1)
        dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
        h[dead, dead] = 1
        h.diagonal().add_(damp * torch.diag(h).mean())
        # h is symmetric, so its transpose is the same matrix in column-major order: LAPACK factorises that
        # view truly in place, where a row-major out= gets a full-size temporary at each of the three steps
        hinv = h.mT
        torch.linalg.cholesky(hinv, out=hinv)
        torch.cholesky_inverse(hinv, out=hinv)
        torch.linalg.cholesky(hinv, upper=True, out=hinv)
        if consume:
            self.hessian = None
            self._factor = (damp, hinv, dead)
        return hinv, dead


_SCORE_CHUNK = 1 << 20  # entries of a weight scored at once (about 20 MB of temporaries)


def _keep(scores: Tensor, sparsity: float, n: int | None, m: int | None) -> Tensor:
    """Per output row: keep the highest scores (unstructured), or ``n`` of every ``m`` inputs."""
    if n is not None and m is not None:
        return nm_mask(scores, n, m, dim=1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = round(sparsity * scores.shape[1])
    if k:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return keep


def _keep_rows(weight: Tensor, norm: Tensor | None, sparsity: float, n: int | None, m: int | None) -> Tensor:
    """Per output row, the keep-mask of the scores ``|W_ij|`` (times ``norm_j`` when given)."""
    # rows are ranked alone, so they are scored a few million entries at a time: the float32 scores and
    # top-k indices of a whole large projection would take several times the weight's own memory
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    step = max(1, _SCORE_CHUNK // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], step):
        scores = weight[start : start + step].detach().abs().float()
        keep[start : start + step] = _keep(scores if norm is None else scores.mul_(norm), sparsity, n, m)
    return keep


def magnitude_keep(weight: Tensor, sparsity: float, n: int | None = None, m: int | None = None) -> Tensor:
    """Keep the largest ``|W_ij|`` of each output row (or ``n`` of every ``m`` inputs): Wanda with every
    input's norm equal, for a weight no calibration data reached."""
    return _keep_rows(weight, None, sparsity, n, m)


def wanda(weight: Tensor, stats: InputStats, sparsity: float, n: int | None = None, m: int | None = None) -> Tensor:
    """Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, compared within each output row."""
    norm = (stats.squared_norms() / max(stats.count, 1)).sqrt().to(weight.device, torch.float32)
    return _keep_rows(weight, norm, sparsity, n, m)


_SOLVE_CHUNK = 1 << 22  # N:M rows solved at once: about this many float32 entries (16 MB) of working copy


def sparsegpt(weight: Tensor, stats: InputStats, sparsity: float, n: int | None = None, m: int | None = None,
              damp: float = 0.01, blocksize: int = 128, consume: bool = False,
              out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune columns left to right and let the remaining
    columns absorb each removal's error, using the inverse Hessian of the layer inputs.

    The Hessian ``X^T X`` is damped by ``damp`` times its mean diagonal; masks
    are chosen per block of ``blocksize`` columns (per ``m`` columns for N:M)
    from ``w^2 / [H^-1]_jj^2``, and the updates outside a block are applied
    lazily once the block is done. Returns ``(new_weight, keep_mask)``, the new weight in the weight's
    dtype, written into ``out`` when given (which may be ``weight`` itself: pruned in place).
    With ``consume`` the statistics' Hessian is factorised in place (no copy of it is made) and the
    factor is kept for other weights that share the statistics (see :meth:`InputStats.inverse_hessian`).

    The work is done on a float32 copy of the weight. With N:M every output row is pruned on its own,
    so on the CPU the rows are solved a few million entries at a time; an unstructured mask is chosen
    over all rows of a block, so the whole weight is copied at once.
    """
    hinv, dead = stats.inverse_hessian(damp, consume=consume)
    rows, cols = weight.shape
    result = torch.empty_like(weight) if out is None else out
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    # rows in slices on the CPU, where the copy counts against the process's memory; an accelerator's
    # column loop is bound by kernel launches, which slicing would multiply
    sliced = n is not None and m is not None and hinv.device.type == "cpu"
    step = max(1, _SOLVE_CHUNK // max(cols, 1)) if sliced else rows
    for first in range(0, rows, step):
        w = weight[first : first + step].detach().to(hinv.device, torch.float32, copy=True)
        w[:, dead] = 0
        kept = _solve(w, hinv, sparsity, n, m, blocksize)
        with torch.no_grad():
            result[first : first + step].copy_(w)  # (rounded into the weight's dtype)
        keep[first : first + step] = kept
        del w, kept
    return result, keep


_INNER = 16  # columns of a block updated column by column; the rest of the block gets their errors in one product


def _solve(w: Tensor, hinv: Tensor, sparsity: float, n: int | None, m: int | None, blocksize: int) -> Tensor:
    """SparseGPT on the float32 rows ``w`` (updated in place) with the inverse Hessian's factor ``hinv``;
    returns their keep-mask.

    Updates are lazy at two levels: a removal's error reaches the other columns of its group of
    ``_INNER`` columns at once, the rest of its block as one matrix product when the group is done, and the
    columns after the block when the block is done (the reference updates the whole block after each
    column: several times the memory traffic for the same arithmetic). A block is worked on transposed, so
    that each column is contiguous.
    """
    cols = w.shape[1]
    nm = n is not None and m is not None
    inner = max(m, _INNER // m * m) if nm else _INNER  # N:M groups never straddle two inner groups
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        width = end - start
        block = w[:, start:end].T.contiguous()  # (columns, rows)
        hblock = hinv[start:end, start:end]
        diag_sq = hblock.diagonal().square().unsqueeze(1)
        errors = torch.empty_like(block)
        if nm:
            drop = torch.empty_like(block, dtype=torch.bool)
        else:  # unstructured: the lowest saliencies over the whole block
            drop = lowest_k(w[:, start:end].square() / diag_sq.T, round(sparsity * block.numel())).T
        for first in range(0, width, inner):
            last = min(first + inner, width)
            for j in range(first, last):
                if nm and j % m == 0:  # the n most salient of these m inputs stay, in every row
                    kept = (block[j : j + m].square() / diag_sq[j : j + m]).topk(n, dim=0).indices
                    drop[j : j + m] = True
                    drop[j : j + m].scatter_(0, kept, False)
                column = block[j]
                err = torch.where(drop[j], column, 0).div_(hblock[j, j])
                if j + 1 < last:
                    block[j + 1 : last].addr_(hblock[j, j + 1 : last], err, alpha=-1)
                column.masked_fill_(drop[j], 0)
                errors[j] = err
            if last < width:
                block[last:].addmm_(hblock[first:last, last:].T, errors[first:last], alpha=-1)
        w[:, start:end] = block.T
        if end < cols:
            w[:, end:].addmm_(errors.T, hinv[start:end, end:], alpha=-1)  # in place: no temporary of w's size
        keep[:, start:end] = ~drop.T
    return keep
