"""Small helpers shared by the tensor-parallel layers: exact division, splits, vocab ranges."""

from __future__ import annotations

import torch


class TensorParallelError(ValueError):
    """A size cannot be split evenly across tensor-parallel ranks (or a layer is misused)."""


def ensure_divisibility(numerator: int, denominator: int, what: str = "numerator") -> None:
    """Raise ``TensorParallelError`` unless ``denominator`` divides ``numerator``.

    Args:
        numerator: the size being split.
        denominator: the number of pieces.
        what: name of the size, used in the error message.
    """
    if denominator <= 0 or numerator % denominator != 0:
        raise TensorParallelError(
            f"{what}={numerator} is not divisible by {denominator}; choose sizes so that {numerator} "
            f"splits evenly into {denominator} parts (e.g. a multiple of {denominator})"
        )


def divide(numerator: int, denominator: int, what: str = "numerator") -> int:
    """``numerator // denominator``, raising ``TensorParallelError`` if the division is not exact."""
    ensure_divisibility(numerator, denominator, what)
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> tuple[torch.Tensor, ...]:
    """Split ``tensor`` into ``num_partitions`` equal pieces along its last dimension.

    Args:
        tensor: the tensor to split.
        num_partitions: number of pieces; must divide the last dimension.
        contiguous_split_chunks: return contiguous copies instead of views.
    """
    last = tensor.dim() - 1
    size = divide(tensor.size(last), num_partitions, "last dimension")
    chunks = torch.split(tensor, size, dim=last)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return tuple(chunks)


def split_tensor_along_dim(tensor: torch.Tensor, num_partitions: int, rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's (contiguous) piece of ``tensor`` cut into ``num_partitions`` along ``dim``."""
    size = divide(tensor.size(dim), num_partitions, f"dimension {dim}")
    return tensor.narrow(dim, rank * size, size).contiguous()


class VocabUtility:
    """Which slice ``[first, last)`` of the vocabulary a tensor-parallel rank holds."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(
        per_partition_vocab_size: int, rank: int, world_size: int
    ) -> tuple[int, int]:
        """Range of rank ``rank`` when every rank holds ``per_partition_vocab_size`` entries."""
        del world_size  # kept for Megatron-Core's signature; the range does not depend on it
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
        """Range of rank ``rank`` of ``world_size`` for a vocabulary of ``global_vocab_size``."""
        per_partition = divide(global_vocab_size, world_size, "vocab size")
        return VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition, rank, world_size)
