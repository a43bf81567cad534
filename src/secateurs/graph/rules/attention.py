"""Rules for attention: einsum, ``nn.MultiheadAttention``'s functional form and SDPA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..registry import UnknownCall, arg, rule, tensors

if TYPE_CHECKING:
    from ..trace import Tracer


@rule("torch.einsum", "torch.functional.einsum")
def einsum(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``einsum("bhid,bhjd->bhij", q, k)``: dims with the same letter are one dimension.

    Contracted letters couple the operands like a matmul's inner dim; output
    letters carry the labels of the operands' dims with that letter.
    """
    equation = args[0]
    operands = tensors(list(args[1:]))
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        raise UnknownCall
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise UnknownCall
    by_letter: dict[str, list[Tensor]] = {}
    for term, t in zip(terms, operands, strict=True):
        if len(term) != t.dim():
            raise UnknownCall
        for letter, lab in zip(term, tr.get(t), strict=True):
            by_letter.setdefault(letter, []).append(lab)
    full: dict[str, Tensor] = {}
    for letter, labs in by_letter.items():
        size = max(lab.numel() for lab in labs)
        labs = [lab for lab in labs if lab.numel() == size]  # size-1 dims broadcast
        for lab in labs[1:]:
            tr.couple(labs[0], lab)
        full[letter] = labs[0]
    if len(rhs) != out.dim() or any(full[c].numel() != n for c, n in zip(rhs, out.shape, strict=True)):
        raise UnknownCall
    tr.set(out, [full[c] for c in rhs])


@rule("torch.nn.functional.multi_head_attention_forward")
def multi_head_attention(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` runs).

    Its code requires the projection width to equal the model width and to be
    divisible by the head count. So the model dim is coupled index by index to
    the query/key/value/output projection dims, and position d of every head is
    one unit: pruning it narrows every head (head_dim shrinks, heads stay).
    """
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
    a = {n: arg(args, kwargs, i, n) for i, n in enumerate(names)}
    separate = arg(args, kwargs, 17, "use_separate_proj_weight", False)
    if separate or a["bias_k"] is not None or a["in_proj_weight"] is None:
        raise UnknownCall
    q, k, v = a["query"], a["key"], a["value"]
    heads = int(a["num_heads"])
    width = q.shape[-1]
    lq = tr.get(q)
    for t in (k, v):
        tr.couple(tr.get(t)[-1], lq[-1])
    lw = tr.get(a["in_proj_weight"])
    tr.couple(lw[1], lq[-1])
    if a["in_proj_bias"] is not None:
        tr.couple(tr.get(a["in_proj_bias"])[0], lw[0])
    model_grid = lq[-1].view(heads, -1)
    for part in range(3):
        grid = lw[0][part * width : (part + 1) * width].view(heads, -1)
        tr.couple(grid, model_grid)  # projection width follows the model width
        tr.couple(grid, grid[0])  # the same position in every head
    lo = tr.get(a["out_proj_weight"])
    tr.couple(lo[1], lw[0][2 * width :])
    if a["out_proj_bias"] is not None:
        tr.couple(tr.get(a["out_proj_bias"])[0], lo[0])
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    attn = outs[0]
    tr.set(attn, list(lq[:-1]) + [lo[0]])
    for extra in outs[1:]:
        if isinstance(extra, Tensor):
            tr.frozen(extra)


@rule("torch.nn.functional.scaled_dot_product_attention", "torch._C._nn.scaled_dot_product_attention")
def sdpa(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``F.scaled_dot_product_attention(q, k, v)``: (..., heads, tokens, dim) each.

    q and k contract over their last dim; heads pair up (with grouped-query
    attention, key/value head h serves query heads h*g .. h*g+g-1, so removing
    a KV head removes its query group). The output takes q's heads and tokens
    and v's last dim.
    """
    q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(args, kwargs, 3, "attn_mask")
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise UnknownCall
    lq, lk, lv = tr.get(q), tr.get(k), tr.get(v)
    tr.couple(lq[-1], lk[-1])
    tr.couple(lk[-2], lv[-2])
    for d in range(q.dim() - 2):
        hq, hk = lq[d], lk[d]
        tr.couple(hk, lv[d])
        if hq.numel() == hk.numel():
            tr.couple(hq, hk)
        elif hk.numel() > 1 and hq.numel() % hk.numel() == 0:
            tr.couple(hq.view(hk.numel(), -1), hk.unsqueeze(1))
        elif hk.numel() != 1:
            raise UnknownCall
    if isinstance(mask, Tensor):
        lm = tr.get(mask)
        for d in range(mask.dim()):  # a mask broadcasts against (..., heads, tokens, tokens)
            od = q.dim() - mask.dim() + d
            if mask.shape[d] > 1 and 0 <= od < q.dim() - 2:
                tr.couple(lm[d], lq[od])
    tr.set(out, list(lq[:-1]) + [lv[-1]])
