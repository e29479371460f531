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
        first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab, rank, world)

        # fp32 throughout: exp/log of bf16 logits lose too much; the result is fp32.
        logits32 = logits.float()
        logits_max = logits32.max(dim=-1).values  # [...]
        _all_reduce(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits32 - logits_max.unsqueeze(-1)  # [..., V/tp], max-subtracted for stability

        ignored = target == ignore_index
        not_mine = (target < first) | (target >= last)  # includes ignored targets
        local_target = (target - first).masked_fill(not_mine, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(not_mine, 0.0)
        _all_reduce(predicted, group)

        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp, group)
        log_z = sum_exp.log()
        loss = log_z - predicted  # -log p(target)

        if label_smoothing > 0.0:
            # PyTorch's definition: target distribution (1 - eps) one-hot + eps / V uniform.
            sum_logits = shifted.sum(dim=-1)
            _all_reduce(sum_logits, group)
            smooth_loss = log_z - sum_logits / vocab_size  # mean over the vocab of -log p
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth_loss
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))  # [..., V/tp], reuses the exp buffer
        ctx.save_for_backward(softmax, not_mine, local_target, ignored)
        ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype = label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        softmax, not_mine, local_target, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        # d loss / d logits = softmax - target distribution (a fresh tensor: keep saved ones intact)
        grad = softmax - eps / ctx.vocab_size
        hit = (~not_mine).to(grad.dtype) * (1.0 - eps)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        scale = grad_loss.float().masked_fill(ignored, 0.0)
        grad.mul_(scale.unsqueeze(-1))  # in place: the [..., V/tp] buffer is the big one
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
