"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

Nobody materialises the full ``[..., vocab]`` logits: each rank holds ``[..., vocab/tp]`` and three
small all-reduces (max, target logit, sum of exponentials; plus the logit sum for label smoothing)
give every rank the exact loss. Matches ``torch.nn.functional.cross_entropy(reduction='none')`` on
the gathered logits, label smoothing and ``ignore_index`` included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.tensor_parallel.utils import VocabUtility


def _all_reduce(t: torch.Tensor, group: ProcessGroup | None, op: Any = dist.ReduceOp.SUM) -> None:
    if parallel_state.group_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def check_loss_inputs(fn: str, what: str, scores: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> None:
    """Raise ValueError unless ``scores`` is ``target``'s shape plus one dimension and smoothing is in [0, 1)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: must lie in [0, 1); use e.g. 0.0 or 0.1")
    if scores.shape[:-1] != target.shape:
        raise ValueError(
            f"{fn}: {what} shape {tuple(scores.shape)} does not match target shape {tuple(target.shape)}; "
            f"{what} must be target's shape plus one last dimension"
        )


class TargetSlice:
    """Where each token's target lives in this rank's vocabulary slice."""

    def __init__(self, target: torch.Tensor, ignore_index: int, first: int, last: int) -> None:
        self.ignored = target == ignore_index
        self.not_mine = (target < first) | (target >= last)  # includes ignored targets
        self.local = (target - first).masked_fill(self.not_mine, 0)


def loss_and_softmax_(
    logits: torch.Tensor, tg: TargetSlice, rows: slice, smoothing: float, vocab: int, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss, log-partition ``lse`` over the whole (all ranks') vocabulary, and the softmax.

    ``logits`` ``[..., V/tp]`` (fp32, owned by the caller: overwritten) becomes the softmax; ``rows``
    picks the tokens of ``tg`` they belong to (``slice(None)``: all). Shared by
    :func:`vocab_parallel_cross_entropy` and the chunked ``linear_cross_entropy``.
    """
    local, not_mine = tg.local[rows], tg.not_mine[rows]
    logits_max = logits.amax(dim=-1)  # [c] (amax: max(dim) also finds indices, several times slower)
    _all_reduce(logits_max, group, dist.ReduceOp.MAX)
    shifted = logits.sub_(logits_max.unsqueeze(-1))  # [c, V/tp], max-subtracted for stability
    predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(not_mine, 0.0)
    _all_reduce(predicted, group)
    if smoothing > 0.0:
        sum_logits = shifted.sum(dim=-1)
        _all_reduce(sum_logits, group)
    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1)
    _all_reduce(sum_exp, group)
    log_z = sum_exp.log()
    loss = log_z - predicted  # -log p(target)
    if smoothing > 0.0:
        # PyTorch's definition: target distribution (1 - eps) one-hot + eps / V uniform.
        loss = (1.0 - smoothing) * loss + smoothing * (log_z - sum_logits / vocab)
    softmax = exp.div_(sum_exp.unsqueeze(-1))
    return loss.masked_fill_(tg.ignored[rows], 0.0), log_z.add_(logits_max), softmax


def softmax_minus_target_(
    softmax: torch.Tensor, tg: TargetSlice, rows: slice | torch.Tensor, smoothing: float, vocab: int
) -> torch.Tensor:
    """``softmax - target distribution`` in place: the logit gradient (rows of ignored tokens zero)."""
    grad = softmax.sub_(smoothing / vocab) if smoothing > 0.0 else softmax
    hit = (~tg.not_mine[rows]).to(grad.dtype) * (1.0 - smoothing)
    grad.scatter_add_(-1, tg.local[rows].unsqueeze(-1), -hit.unsqueeze(-1))
    ignored = tg.ignored[rows]
    if bool(ignored.any()):  # a full pass over the [..., V/tp] buffer: only when some token is ignored
        grad.masked_fill_(ignored.unsqueeze(-1), 0.0)
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        label_smoothing: float,
        ignore_index: int,
        group: ProcessGroup | None,
    ) -> torch.Tensor:
        rank, world = parallel_state.group_rank(group), parallel_state.group_world_size(group)
        partition_vocab = logits.size(-1)
        vocab_size = partition_vocab * world
        tg = TargetSlice(target, ignore_index,
                         *VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab, rank, world))
        # fp32 throughout: exp/log of bf16 logits lose too much; the result is fp32. One [..., V/tp]
        # buffer of our own (the caller's logits stay intact) becomes the softmax.
        logits32 = logits.float() if logits.dtype != torch.float32 else logits.clone()
        loss, _, softmax = loss_and_softmax_(logits32, tg, slice(None), label_smoothing, vocab_size, group)
        ctx.save_for_backward(softmax)
        ctx.tg, ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype = tg, label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (softmax,) = ctx.saved_tensors
        # d loss / d logits = softmax - target distribution (on a copy: keep the saved one intact)
        grad = softmax_minus_target_(softmax.clone(), ctx.tg, slice(None), ctx.label_smoothing, ctx.vocab_size)
        grad.mul_(grad_loss.float().unsqueeze(-1))  # in place: the [..., V/tp] buffer is the big one
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross entropy from vocabulary-split logits.

    Args:
        vocab_parallel_logits: ``[..., vocab/tp]``, this rank's slice of the vocabulary (rank order).
        target: ``[...]`` global token ids.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        ignore_index: targets with this id get loss 0 and no gradient.
        group: tensor-parallel group; None for ``parallel_state``'s.

    Returns:
        ``[...]`` fp32 loss per token (shaped like ``target``).
    """
    check_loss_inputs("vocab_parallel_cross_entropy", "logits", vocab_parallel_logits, target, label_smoothing)
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, ignore_index, group)
