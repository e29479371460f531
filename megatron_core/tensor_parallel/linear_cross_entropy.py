"""Output layer + cross entropy fused over chunks of tokens: the ``[tokens, vocab]`` logits never exist whole.

``linear_cross_entropy(hidden, weight, bias, target)`` equals
``vocab_parallel_cross_entropy(F.linear(hidden, weight, bias).float(), target)`` (per-token fp32
loss, vocabulary split over tensor-parallel ranks: each rank holds ``weight`` rows of its vocab slice,
three small all-reduces per chunk give the exact log-partition).

How the memory stays small: the forward walks the tokens ``chunk_tokens`` at a time, computes the
chunk's logits ``[c, vocab/tp]``, its loss, and, when gradients are wanted, its logit gradient
``softmax - one_hot`` in the same buffer; it then folds that into the input gradient (``G @ W``,
``[c, h]``) and the weight gradient (``G^T @ H``, accumulated into one ``[vocab/tp, h]`` fp32 buffer:
the size of the weight gradient any method produces) and drops the chunk. So the forward does the
three matmuls of the output layer and the backward none, as long as every token's incoming gradient
is the same number (``loss.mean()``, or a masked mean where the kept tokens share one weight): the
backward scales the input-gradient rows by their token's gradient and the weight gradient by the
common one. Tokens whose gradient differs from the most frequent value (e.g. loss-masked tokens)
are corrected exactly by recomputing only their logits. The backward may run once (no
``retain_graph`` double backward).

Speed (fp32, CPU): with a vocabulary-sized output the logits GEMM runs transposed (``weight @
hidden^T``, see ``_logits``; through oneDNN by default, see ``cpu_matmul``), chunks are multiples of 64
tokens, and the weight gradient is created by
the first chunk's GEMM (no zero-filled 150 MB buffer at GPT-2 small).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.tensor_parallel.cpu_matmul import CpuMatmul, matmul_nt, onednn_applies
from megatron_core.tensor_parallel.cross_entropy import (
    TargetSlice,
    check_loss_inputs,
    loss_and_softmax_,
    softmax_minus_target_,
)
from megatron_core.tensor_parallel.utils import VocabUtility

#: Default chunk: at most this many fp32 logits ([chunk, vocab/tp]) at a time (36 MiB): at GPT-2 small
#: shapes (1024 tokens, vocabulary 50257) 128 tokens, the loss's working memory ~0.15 of the full logits.
CHUNK_LOGITS = 9 * 1024 * 1024


def default_chunk_tokens(vocab_per_rank: int) -> int:
    """Tokens per chunk: at most :data:`CHUNK_LOGITS` logits (but >= 64 tokens), a multiple of 64.

    Aligned GEMM rows are faster: at GPT-2 small (1024 tokens, vocabulary 50257, 2 threads) the loss
    with its three matmuls took 1.33 s in chunks of 128 tokens, 1.43 s in chunks of 176.
    """
    return max(64, CHUNK_LOGITS // max(1, vocab_per_rank) // 64 * 64)


#: fp32 logits of at least this many vocabulary rows (per rank) are computed transposed (see :func:`_logits`).
TRANSPOSED_MIN_VOCAB = 4096


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: CpuMatmul,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.dtype]:
    """fp32 logits ``[c, V/tp]`` and the dtype the matmul ran in (bf16 under autocast or bf16 weights).

    ``dtype`` forces the matmul's dtype (the backward runs outside the forward's autocast). In fp32
    with a vocabulary of at least :data:`TRANSPOSED_MIN_VOCAB` rows the logits are computed as
    ``weight @ hidden^T`` (``[V/tp, c]``) and returned as its transposed view: ``hidden @ weight^T``
    with a vocabulary-wide output runs at ~2/3 of MKL's fp32 rate on one thread and worse on two,
    the transposed product at the full rate. Same products; the loss's sums over the vocabulary then
    run in another order (differences of a few fp32 ulps in the loss). With oneDNN (``backend``, see
    :mod:`~megatron_core.tensor_parallel.cpu_matmul`) the plain layout runs faster still.
    """
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if onednn_applies(backend, hidden, weight, bias):
        return matmul_nt(hidden, weight, bias), torch.float32
    fp32 = all(t.dtype == torch.float32 for t in (hidden, weight) + (() if bias is None else (bias,)))
    if fp32 and weight.shape[0] >= TRANSPOSED_MIN_VOCAB and not torch.is_autocast_enabled(hidden.device.type):
        out = torch.mm(weight, hidden.t()) if bias is None else torch.addmm(bias.unsqueeze(-1), weight, hidden.t())
        return out.t(), torch.float32
    logits = F.linear(hidden, weight, bias)
    return logits.float(), logits.dtype


def _accumulate(buf: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``buf + a @ b`` in fp32, in place (``buf`` None: the product itself, no zero-filled buffer)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if buf is None else buf.addmm_(a, b)
    product = (a @ b).float()
    return product if buf is None else buf.add_(product)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        smoothing: float,
        ignore_index: int,
        chunk: int,
        group: ProcessGroup | None,
        backend: CpuMatmul,
    ) -> torch.Tensor:
        rank, world = parallel_state.group_rank(group), parallel_state.group_world_size(group)
        vocab = weight.shape[0] * world
        tg = TargetSlice(target, ignore_index, *VocabUtility.vocab_range_from_per_partition_vocab_size(
            weight.shape[0], rank, world))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        loss, lse = hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)
        # [input grad, weight grad, bias grad]: the weight/bias grads are created by the first chunk.
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(hidden, dtype=torch.float32) if need_h else None, None, None]
        eager = None  # fold gradients in the forward: only when the matmuls run in fp32 (else see backward)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            logits, ctx.compute_dtype = _logits(hidden[rows], weight, bias, backend)  # [c, V/tp]
            eager = ctx.compute_dtype == torch.float32 and (need_h or need_w or need_b)
            loss[rows], lse[rows], softmax = loss_and_softmax_(logits, tg, rows, smoothing, vocab, group)
            del logits  # the softmax took its buffer
            if eager:
                grad = softmax_minus_target_(softmax, tg, rows, smoothing, vocab)
                part = _fold(grad, hidden[rows], weight, ctx.compute_dtype, grads, need_h, need_w, need_b, backend)
                if part is not None:
                    grads[0][rows] = part  # type: ignore[index]
                del grad
            del softmax  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.tg, ctx.smoothing, ctx.vocab, ctx.chunk, ctx.eager = tg, smoothing, vocab, chunk, bool(eager)
        ctx.backend = backend
        ctx.needs = (need_h, need_w, need_b)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice; its gradient buffers are used up")
        hidden, weight, bias, lse = ctx.saved_tensors
        grads: list[torch.Tensor | None] = ctx.grads
        ctx.grads = None
        tg: TargetSlice = ctx.tg
        g = grad_loss.float().masked_fill(tg.ignored, 0.0)  # [n]
        valid = ~tg.ignored
        if ctx.eager:
            # Folded in the forward with gradient 1 per token: scale the input-gradient rows by their
            # token's gradient, the weight gradient by the most frequent one, then correct the others.
            if grads[0] is not None:
                grads[0].mul_(g.unsqueeze(-1))
            values, counts = torch.unique(g[valid], return_counts=True)
            common = values[counts.argmax()] if values.numel() else g.new_zeros(())
            for buf in grads[1:]:
                if buf is not None:
                    buf.mul_(common)
            _recompute(ctx, (valid & (g != common)).nonzero().squeeze(-1), g - common, hidden, weight, bias, lse,
                       grads, False)
        else:
            # Low precision: the unfused arithmetic chunk by chunk (gradient scaled before the bf16 matmuls).
            _recompute(ctx, valid.nonzero().squeeze(-1), g, hidden, weight, bias, lse, grads, ctx.needs[0])
        need_h, need_w, need_b = ctx.needs
        grad_h, grad_w, grad_b = grads
        if need_w and grad_w is None:  # no token reached a chunk
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_b and grad_b is None:
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(weight.dtype),
            None, None, None, None, None, None,
        )


def _fold(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
    grads: list[torch.Tensor | None], need_h: bool, need_w: bool, need_b: bool, backend: CpuMatmul,
) -> torch.Tensor | None:
    """Add one chunk's logit gradient ``[c, V/tp]`` to ``grads`` = [_, weight grad, bias grad]; return its input grad.

    A gradient entry that is None is created by its first chunk (no zero-filled buffer to add to).
    """
    low = grad.to(dtype)
    if need_w:
        grads[1] = _accumulate(grads[1], low.t(), hidden.to(dtype))  # [V/tp, c] @ [c, h]
    if need_b:
        part = low.sum(dim=0).float()
        grads[2] = part if grads[2] is None else grads[2].add_(part)
    if not need_h:
        return None
    weight = weight.to(dtype)
    if onednn_applies(backend, low, weight):
        return matmul_nt(low, weight.t())  # [c, V/tp] @ [V/tp, h] -> [c, h]
    return low @ weight


def _recompute(
    ctx: Any, rows: torch.Tensor, scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, grads: list[torch.Tensor | None], need_h: bool,
) -> None:
    """Add ``scale_t * dlogits_t`` of the tokens ``rows`` to the weight/bias ``grads`` (their logits recomputed).

    With ``need_h`` it also writes those tokens' rows of the input gradient ``grads[0]``.
    """
    _, need_w, need_b = ctx.needs
    for start in range(0, rows.numel(), ctx.chunk):
        idx = rows[start:start + ctx.chunk]
        logits, dtype = _logits(hidden[idx], weight, bias, ctx.backend, ctx.compute_dtype)
        grad = softmax_minus_target_(logits.sub_(lse[idx].unsqueeze(-1)).exp_(), ctx.tg, idx, ctx.smoothing, ctx.vocab)
        grad.mul_(scale[idx].unsqueeze(-1))
        part = _fold(grad, hidden[idx], weight, dtype, grads, need_h, need_w, need_b, ctx.backend)
        if part is not None:
            grads[0][idx] = part.float()  # type: ignore[index]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    group: ProcessGroup | None = None,
    cpu_matmul: CpuMatmul = "onednn",
) -> torch.Tensor:
    """Per-token cross entropy of ``hidden @ weight.T + bias`` without holding the whole logits.

    Args:
        hidden: ``[..., h]`` inputs of the output layer, the same on every TP rank (gather first
            with sequence parallelism; the caller's TP mapping reduces the input gradient).
        weight: ``[vocab/tp, h]`` this rank's rows of the output layer (rank order).
        target: ``[...]`` global token ids.
        bias: ``[vocab/tp]`` or None.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        ignore_index: targets with this id get loss 0 and no gradient.
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`).
        group: tensor-parallel group; None for ``parallel_state``'s.
        cpu_matmul: "onednn" runs CPU fp32 matmuls through oneDNN (see
            :mod:`~megatron_core.tensor_parallel.cpu_matmul`), "torch" through ``torch.mm``.

    Returns:
        ``[...]`` fp32 loss per token (shaped like ``target``).
    """
    check_loss_inputs("linear_cross_entropy", "hidden", hidden, target, label_smoothing)
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # [n, h]
    loss = _LinearCrossEntropy.apply(flat, weight, bias, target.reshape(-1), label_smoothing, ignore_index,
                                     chunk, group, cpu_matmul)
    return loss.view(target.shape)
