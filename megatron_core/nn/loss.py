"""``ParallelCrossEntropyLoss``: ``torch.nn.CrossEntropyLoss`` that understands vocabulary-split logits."""

from __future__ import annotations

import torch

from megatron_core.nn.functional import parallel_cross_entropy

__all__ = ["ParallelCrossEntropyLoss"]


class ParallelCrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in ``torch.nn.CrossEntropyLoss`` (same arguments) for whole or vocabulary-split logits.

    Logits tagged with a parallel dim (an ungathered column ``ParallelLinear`` output, or any tensor
    passed through ``RegisterParallelDim``) are taken as this rank's slice of the classes along that
    dim, and the loss is computed without gathering them; the tagged dim may be dim 1 (torch's
    layout) or the last one (``[b, s, V/tp]`` logits with ``[b, s]`` targets). Anything else is
    ``torch.nn.CrossEntropyLoss`` exactly.

    Example:
        >>> head = ParallelLinear(64, vocab, dim=1, gather_output=False)
        >>> loss = ParallelCrossEntropyLoss(ignore_index=0)(head(hidden), labels)
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return parallel_cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
