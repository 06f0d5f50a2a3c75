"""Token merges described by positions, and their pure-PyTorch twin.

ToMe's splits (alternating, every k-th, random) and output orders (by score, by index, with a
distillation token second) differ, but every one of its merges is the same thing once written by
token positions: output row ``o`` starts from input token ``out_pos[o]``, and the merged input
tokens ``src_pos[k]`` are reduced into output row ``dst_row[k]``. :class:`TokenMerge` holds that;
the functions here compute with it exactly as ToMe's ``gather`` / ``scatter_reduce`` do.
The Triton twin is ``tempme_kernels.segment`` (through :mod:`tempme_fast.tome.segment_ops`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class TokenMerge(NamedTuple):
    """One merge of ``[B', tokens, C]`` into ``[B', N_out, C]`` by positions (all int64).

    Attributes:
        out_pos: ``[B', N_out]`` the input token output row ``o`` starts from.
        src_pos: ``[B', r]`` input tokens merged away, in rank order (best score first).
        dst_row: ``[B', r]`` the output row each of them is reduced into.
        tokens: input tokens the merge covers (ToMe's k-th split drops a tail beyond it).
    """

    out_pos: torch.Tensor
    src_pos: torch.Tensor
    dst_row: torch.Tensor
    tokens: int

    @property
    def r(self) -> int:
        return self.src_pos.shape[1]

    @property
    def n_out(self) -> int:
        return self.out_pos.shape[1]


def _rows(idx: torch.Tensor, width: int) -> torch.Tensor:
    return idx.unsqueeze(-1).expand(-1, -1, width)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float32 (float64 stays float64), then cast back once, as ``ops.merge`` does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_reduce(x: torch.Tensor, m: TokenMerge, mode: str) -> torch.Tensor:
    """``x [B', N, C]`` -> ``[B', N_out, C]``: ToMe's ``dst.scatter_reduce(src, reduce=mode)``.

    ``mode`` is a ``scatter_reduce`` reduction (``"sum"``, ``"mean"``, ``"amax"``, ``"amin"``,
    ``"prod"``); a row's own token takes part (``include_self=True``, as ToMe). Float sums run in
    float32 and come back in ``x``'s dtype; differentiable in ``x``.
    """
    xw = x.to(work_dtype(x.dtype)) if mode in ("sum", "mean") and x.is_floating_point() else x
    out = xw.gather(1, _rows(m.out_pos, x.shape[-1]))
    if m.r:
        src = xw.gather(1, _rows(m.src_pos, x.shape[-1]))
        out = out.scatter_reduce(1, _rows(m.dst_row, x.shape[-1]), src, reduce=mode, include_self=True)
    return out.to(x.dtype)


def wavg(x: torch.Tensor, size: torch.Tensor, m: TokenMerge) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMe's ``merge_wavg``: ``sum(size * x) / sum(size)`` per output row, and the summed sizes.

    Args:
        x: ``[B', N, C]`` float; size: ``[B', N, 1]`` positive (no gradient flows into it).
    Returns:
        ``(x [B', N_out, C], size [B', N_out, 1])`` in their dtypes. A row nothing merged into keeps
        its value exactly (ToMe's ``(x * s) / s`` may differ from it by a rounding).
    """
    work = work_dtype(x.dtype)
    xw, sw = x.to(work), size.detach().to(work)
    total = segment_reduce(xw * sw, m, "sum")
    s_total = segment_reduce(sw, m, "sum")
    own = sw.gather(1, _rows(m.out_pos, 1))
    kept = xw.gather(1, _rows(m.out_pos, x.shape[-1]))
    out = torch.where(s_total > own, total / s_total, kept)
    return out.to(x.dtype), s_total.to(size.dtype)


def inverse_rows(m: TokenMerge) -> torch.Tensor:
    """``[B', tokens]`` int64: the output row every input token ended in (for ``unmerge``)."""
    rows = m.out_pos.shape[0]
    inv = torch.empty(rows, m.tokens, dtype=torch.int64, device=m.out_pos.device)
    inv.scatter_(1, m.out_pos, torch.arange(m.n_out, device=inv.device).expand(rows, -1))
    if m.r:
        inv.scatter_(1, m.src_pos, m.dst_row)
    return inv


def unmerge(x: torch.Tensor, m: TokenMerge, inv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [B', N_out, C]`` -> ``[B', tokens, C]``: every input token gets its output row's value.

    A gather, so the gradient sums over the tokens that share a row.
    """
    inv = inverse_rows(m) if inv is None else inv
    return x.gather(1, _rows(inv, x.shape[-1]))
