"""Tagging tensors with the dimension along which they are split across tensor-parallel ranks.

A tag is a plain Python attribute on the tensor object, so it travels with that object only: an
op that makes a new tensor (``view``, ``+``, an activation...) drops it. Layers tag what they
return (a column-parallel ``ParallelLinear`` with ``gather_output=False`` tags its output ``-1``),
and consumers read the tag (``ParallelCrossEntropyLoss`` treats ``-1``-tagged logits as
vocabulary-split). After reshaping a split tensor, re-tag it with ``RegisterParallelDim``.

Parameters need no tag: ``get_parallel_dim`` reads the ``partition_dim`` that the tensor-parallel
layers put on their split parameters.
"""

from __future__ import annotations

import torch

_ATTR = "_parallel_dim"


def set_parallel_dim(tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Tag ``tensor`` as split along ``dim`` (None: not split) and return it."""
    if dim is not None and not -tensor.dim() <= dim < max(tensor.dim(), 1):
        raise ValueError(
            f"set_parallel_dim: dim={dim} is out of range for a tensor of shape {tuple(tensor.shape)}"
        )
    setattr(tensor, _ATTR, dim)
    return tensor


def get_parallel_dim(tensor: torch.Tensor) -> int | None:
    """The dimension along which ``tensor`` is split across TP ranks, or None when it is whole.

    Reads the tag set by ``set_parallel_dim`` / ``RegisterParallelDim``, else the
    ``partition_dim`` of a TP-split parameter.
    """
    if hasattr(tensor, _ATTR):
        return getattr(tensor, _ATTR)
    if getattr(tensor, "tensor_model_parallel", False):
        return int(tensor.partition_dim)  # type: ignore[attr-defined]
    return None


class RegisterParallelDim(torch.nn.Module):
    """A module that tags its input as split along ``dim`` and returns it unchanged.

    Example:
        >>> x = torch.randn(3, 4)
        >>> get_parallel_dim(RegisterParallelDim(dim=-1)(x))
        -1
    """

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return set_parallel_dim(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
