"""Causal self-attention in query blocks, with a hand-written backward that reuses saved probabilities.

Why: for fp32 training on CPU at the sequence lengths of small models (s ~ 128-1024), PyTorch's CPU
flash kernel behind ``F.scaled_dot_product_attention(is_causal=True)`` is slower than plain batched
GEMMs: it works in small tiles and recomputes the probabilities in its backward. Here the queries
are split into blocks; block ``i`` multiplies only with the keys it can see (``[:end_i]``), so
the upper triangle of the score matrix is mostly skipped, and only the diagonal tile needs a mask.
The backward is the textbook one (dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
dQ = scale * dS K, dK = scale * dS^T Q), with each product one GEMM over the visible keys.

Memory cost: the forward SAVES the causal probabilities for the backward, about
``b * np * s^2 / 2`` values (exactly ``saved_probability_bytes``), where the flash kernel saves
only O(s) per row. The caller (``DotProductAttention``) uses this path only below a cap.

Dropout on the probabilities (training): each block's keep mask comes from
``tensor_parallel.cpu_dropout.keep_mask`` (16 random bits per element of torch's CPU generator,
~3.5x cheaper than ``F.dropout``; SDPA with dropout leaves its flash kernel for the unfused math path
on CPU) and is saved for the backward (1 byte per probability).

GQA: query heads are regrouped as ``[b * ng, s * (np / ng), hn]`` (the heads sharing a key/value
head become extra rows of one GEMM), so K and V are never repeated; this costs one copy of the
queries, the output and their gradient when ``np > ng``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from megatron_core.tensor_parallel.cpu_dropout import keep_mask

# Query positions per block. Measured fwd+bwd of one call (hn 64-128, 1-2 threads): blocks of 64
# beat blocks of 32 or 128 at s = 128..1024, at 0.65-0.9x the time of torch's CPU flash kernel.
BLOCK_SIZE = 64


def query_blocks(seq_len: int, block_size: int | None = None) -> list[tuple[int, int]]:
    """The ``[start, end)`` position ranges of the query blocks for ``seq_len`` positions."""
    if block_size is None:
        block_size = BLOCK_SIZE
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: a query block needs at least one position")
    return [(start, min(start + block_size, seq_len)) for start in range(0, seq_len, block_size)]


def saved_probability_bytes(
    batch: int, heads: int, seq_len: int, element_size: int = 4, block_size: int | None = None,
    dropout: bool = False,
) -> int:
    """Bytes of probabilities (and dropout masks) the forward saves for its backward (every block's [rows, visible keys])."""
    visible = sum((end - start) * end for start, end in query_blocks(seq_len, block_size))
    return batch * heads * visible * (element_size + (1 if dropout else 0))


def _diagonal_mask(rows: int, group: int, device: torch.device) -> torch.Tensor:
    """True = masked out, ``[rows * group, rows]``: row ``t * group + j`` (position t, head j) sees keys <= t."""
    mask = torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1)
    return mask.repeat_interleave(group, dim=0) if group > 1 else mask


class _BlockedCausalAttention(torch.autograd.Function):
    """q ``[G, s * r, hn]`` (r query heads per key/value head, row = position * r + head), k/v ``[G, s, hn]``.

    With dropout the output is ``c * (M o P) V`` (M the keep mask, c its scale); the backward uses
    dV = (M o P)^T (c dO) and dP = M o ((c dO) V^T), then the softmax backward with the undropped P.

    Every GEMM writes a fresh contiguous tensor: into a slice, torch's CPU bmm falls back to one
    small GEMM per batch entry (one parallel region each), which is slow on a busy machine.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int,
        block_size: int | None, dropout_p: float,
    ) -> torch.Tensor:
        blocks = query_blocks(k.shape[1], block_size)
        outs, probs, keeps = [], [], []
        keep_scale = 1.0
        masks: dict[int, torch.Tensor] = {}
        for start, end in blocks:
            if end - start not in masks:
                masks[end - start] = _diagonal_mask(end - start, group, q.device)
            # scores [G, (end - start) * r, end]: this block's queries against every key they can see
            scores = torch.baddbmm(q.new_empty(()), q[:, start * group:end * group], k[:, :end].transpose(1, 2),
                                   beta=0.0, alpha=scale)
            scores[:, :, start:end].masked_fill_(masks[end - start], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            del scores
            if dropout_p > 0.0:
                keep, keep_scale = keep_mask(p.shape, dropout_p)
                outs.append(torch.bmm(torch.where(keep, p, 0.0), v[:, :end]))  # scaled once, after the cat
                keeps.append(keep)
            else:
                outs.append(torch.bmm(p, v[:, :end]))  # [G, rows, hn]
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs, *keeps)
        ctx.scale, ctx.group, ctx.blocks, ctx.keep_scale = scale, group, blocks, keep_scale  # type: ignore[attr-defined]
        out = torch.cat(outs, dim=1)  # [G, s * r, hn]
        return out.mul_(keep_scale) if keeps else out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None, None]:
        q, k, v, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        scale, group, blocks = ctx.scale, ctx.group, ctx.blocks  # type: ignore[attr-defined]
        probs, keeps = saved[:len(blocks)], saved[len(blocks):]
        if keeps:
            grad_out = grad_out * ctx.keep_scale  # type: ignore[attr-defined]  # the output carries the keep scale
        grad_q: list[torch.Tensor] = []
        grad_k = grad_v = torch.empty(0)
        # Last block first: it sees every key, so its products initialise dK and dV.
        for (start, end), p, keep in reversed(list(zip(blocks, probs, keeps or [None] * len(blocks), strict=True))):
            q_i, go = q[:, start * group:end * group], grad_out[:, start * group:end * group]  # [G, rows, hn]
            p_used = p if keep is None else torch.where(keep, p, 0.0)
            part_v = torch.bmm(p_used.transpose(1, 2), go)  # dV += P^T dO, [G, end, hn]
            ds = torch.bmm(go, v[:, :end].transpose(1, 2))  # dP = dO V^T, [G, rows, end]
            if keep is not None:
                ds = torch.where(keep, ds, 0.0)
            # dS = P * (dP - rowsum(dP * P)) over whole rows (each block holds whole rows)
            ds = torch._softmax_backward_data(ds, p, -1, p.dtype)
            grad_q.append(torch.bmm(ds, k[:, :end]))  # dQ = dS K (scaled below)
            part_k = torch.bmm(ds.transpose(1, 2), q_i)  # dK += dS^T Q (scaled below)
            if end == k.shape[1]:
                grad_k, grad_v = part_k, part_v
            else:
                grad_k[:, :end].add_(part_k)
                grad_v[:, :end].add_(part_v)
        dq = torch.cat(grad_q[::-1], dim=1).mul_(scale)
        return dq, grad_k.mul_(scale), grad_v, None, None, None, None


def blocked_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_size: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal softmax attention with an exact backward, for equal query and key lengths.

    Args:
        q: queries ``[b, np, s, hn]``.
        k: keys ``[b, ng, s, hn]`` with ``np % ng == 0`` (query head i uses key head ``i // (np / ng)``).
        v: values ``[b, ng, s, hn]``.
        scale: multiplies the scores (usually ``1 / sqrt(hn)``).
        block_size: query positions per block (the last may be shorter); None means ``BLOCK_SIZE``.
        dropout_p: dropout on the probabilities (masks of ``cpu_dropout.keep_mask``, drawn block by
            block in order from torch's default CPU generator).

    Returns:
        ``[b, np, s, hn]``: ``dropout(softmax(q k^T * scale + causal mask)) v`` (query i sees keys j <= i).
    """
    b, np_, s, hn = q.shape
    ng = k.shape[1]
    if k.shape != (b, ng, s, hn) or v.shape != k.shape or np_ % ng != 0:
        raise ValueError(
            f"blocked_causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
            "q [b, np, s, hn] and k, v [b, ng, s, hn] with np divisible by ng (self-attention, equal lengths)"
        )
    group = np_ // ng
    # [b, np, s, hn] -> [b, ng, s, r, hn] -> [b * ng, s * r, hn] (a view when r == 1 and strides allow)
    qg = q.unflatten(1, (ng, group)).transpose(2, 3).reshape(b * ng, s * group, hn)
    out = _BlockedCausalAttention.apply(qg, k.reshape(b * ng, s, hn), v.reshape(b * ng, s, hn), scale, group,
                                        block_size, dropout_p)
    # [b * ng, s * r, hn] -> [b, ng, s, r, hn] -> [b, np, s, hn]
    return out.view(b, ng, s, group, hn).transpose(2, 3).reshape(b, np_, s, hn)
