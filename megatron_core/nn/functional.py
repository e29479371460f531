"""Functional forms of the drop-in parallel layers, plus every ``torch.nn.functional`` name.

``parallel_linear`` / ``parallel_embedding`` take this rank's *shard* of the weight (as held by
``ParallelLinear`` / ``ParallelEmbedding``) and run the matching collectives from
``megatron_core.tensor_parallel``; with ``dim=None`` they are exactly ``F.linear`` /
``F.embedding``. ``parallel_cross_entropy`` is ``F.cross_entropy`` that also accepts
vocabulary-split logits (tagged with ``get_parallel_dim``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from megatron_core.nn._base import UnsupportedArgumentError, normalize_dim, tp_group, tp_rank, tp_size
from megatron_core.nn.parallel_dim import get_parallel_dim, set_parallel_dim
from megatron_core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_core.tensor_parallel.utils import TensorParallelError

__all__ = ["parallel_cross_entropy", "parallel_embedding", "parallel_linear"]


# ----------------------------------------------------------------------------- linear
def parallel_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dim: int | None = None,
    gather_output: bool = True,
) -> torch.Tensor:
    """``y = x W^T + b`` with ``W`` split across TP ranks.

    Args:
        input: ``[*, in]``; for ``dim=0`` either the full ``[*, in]`` (scattered here) or this rank's
            ``[*, in/tp]`` (e.g. a column-parallel output kept split).
        weight: this rank's shard: ``[out/tp, in]`` for ``dim=1``, ``[out, in/tp]`` for ``dim=0``.
        bias: ``[out/tp]`` for ``dim=1``; the full ``[out]`` for ``dim=0`` (added after the reduction).
        dim: None (plain ``F.linear``), 1 / -1 (split output features), 0 (split input features).
        gather_output: ``dim=1`` only: all-gather the output to ``[*, out]``; False returns
            ``[*, out/tp]`` tagged ``get_parallel_dim(y) == -1``.

    Returns:
        ``[*, out]`` (``[*, out/tp]`` for an ungathered column split).
    """
    dim = normalize_dim(dim, "parallel_linear")
    if dim is None:
        return F.linear(input, weight, bias)
    group = tp_group()
    if dim == 1:
        out = F.linear(copy_to_tensor_model_parallel_region(input, group), weight, bias)  # [*, out/tp]
        if gather_output:
            return gather_from_tensor_model_parallel_region(out, group)  # [*, out]
        return set_parallel_dim(out, -1)
    local_in = weight.shape[1]
    if input.shape[-1] == local_in * tp_size() and tp_size() > 1:
        input = scatter_to_tensor_model_parallel_region(input, group)  # [*, in] -> [*, in/tp]
    elif input.shape[-1] != local_in:
        raise TensorParallelError(
            f"parallel_linear(dim=0): input has {input.shape[-1]} features; expected the full {local_in * tp_size()} "
            f"or this rank's {local_in} (in_features / tp)"
        )
    out = reduce_from_tensor_model_parallel_region(F.linear(input, weight), group)  # partial sums -> [*, out]
    return out if bias is None else out + bias


# ----------------------------------------------------------------------------- embedding
def _check_split_embedding_args(max_norm: float | None, scale_grad_by_freq: bool, sparse: bool) -> None:
    for name, value, default in (("max_norm", max_norm, None), ("scale_grad_by_freq", scale_grad_by_freq, False),
                                 ("sparse", sparse, False)):
        if value != default:
            raise UnsupportedArgumentError(
                f"{name}={value!r} is not supported by a split embedding (dim=0 or 1): the rows or their norms "
                f"are spread over ranks. Use dim=None for this argument, or leave {name}={default!r}"
            )


def parallel_embedding(
    input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, max_norm: float | None = None,
    norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
    num_embeddings: int | None = None, dim: int | None = None, gather_output: bool = True,
) -> torch.Tensor:
    """Embedding lookup with the table split across TP ranks.

    Args:
        input: token ids, any shape.
        weight: this rank's shard: ``[V/tp, D]`` for ``dim=0`` (vocabulary split), ``[V, D/tp]`` for
            ``dim=1`` (embedding split); the full ``[V, D]`` for ``dim=None``.
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: as ``F.embedding``; a split
            table supports ``padding_idx`` only.
        num_embeddings: full vocabulary size for ``dim=0`` (default: ``weight.shape[0] * tp``).
        dim: None, 0 or 1 / -1.
        gather_output: ``dim=1`` only: all-gather to ``[*, D]``; False returns ``[*, D/tp]`` tagged -1.

    Returns:
        ``[*input.shape, D]`` (``D/tp`` for an ungathered column split).
    """
    dim = normalize_dim(dim, "parallel_embedding")
    if dim is None:
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    _check_split_embedding_args(max_norm, scale_grad_by_freq, sparse)
    group, world = tp_group(), tp_size()
    if dim == 1:
        vocab = weight.shape[0]
        pad = None if padding_idx is None else padding_idx % vocab
        out = F.embedding(input, weight, pad)  # [*, D/tp]
        return gather_from_tensor_model_parallel_region(out, group) if gather_output else set_parallel_dim(out, -1)
    per_rank = weight.shape[0]
    vocab = per_rank * world if num_embeddings is None else num_embeddings
    if vocab != per_rank * world:
        raise TensorParallelError(
            f"parallel_embedding(dim=0): num_embeddings={vocab} but the shard has {per_rank} rows x {world} ranks"
        )
    first = tp_rank() * per_rank
    local_pad = None
    if padding_idx is not None and first <= padding_idx % vocab < first + per_rank:
        local_pad = padding_idx % vocab - first
    if world == 1:
        return F.embedding(input, weight, local_pad)
    outside = (input < first) | (input >= first + per_rank)
    local_ids = (input - first).masked_fill(outside, 0)
    out = F.embedding(local_ids, weight, local_pad).masked_fill(outside.unsqueeze(-1), 0.0)  # [*, D], partial
    return reduce_from_tensor_model_parallel_region(out, group)


# ----------------------------------------------------------------------------- cross entropy
def _classes_last(input: torch.Tensor, target: torch.Tensor, split_dim: int) -> torch.Tensor:
    """Move the tagged class dim of ``input`` last, checking ``target`` is ``input`` without it."""
    split_dim %= input.dim()
    expected = input.shape[:split_dim] + input.shape[split_dim + 1:]
    if target.shape != expected:
        raise ValueError(
            f"parallel_cross_entropy: logits {tuple(input.shape)} are split along dim {split_dim} (the classes), so "
            f"target must have shape {tuple(expected)} (class indices); got {tuple(target.shape)}. Probability "
            "targets are not supported on split logits"
        )
    return input.movedim(split_dim, -1)


def _reduce(loss: torch.Tensor, weights: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / weights.sum()
    raise ValueError(f"reduction={reduction!r}; use 'none', 'mean' or 'sum'")


def parallel_cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, size_average: bool | None = None,
    ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean", label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy`` that also takes logits split over the vocabulary.

    Logits tagged with a parallel dim (``get_parallel_dim``, e.g. an ungathered column
    ``ParallelLinear`` output, or ``RegisterParallelDim(-1)`` after a reshape) hold this rank's
    ``V/tp`` classes along that dim; the loss is computed without gathering them
    (``vocab_parallel_cross_entropy``). Untagged logits go to ``F.cross_entropy`` unchanged.

    Args:
        input: logits: ``(N, C)``, ``(N, C, d1, ...)``, or split ``(..., C/tp, ...)`` tagged on the class dim.
        target: class indices (or, untagged only, class probabilities) as in ``F.cross_entropy``.
        weight: per-class rescaling ``[C]`` (the full vocabulary); on split logits not with label smoothing.
        size_average, reduce: deprecated ``torch`` arguments, mapped to ``reduction`` as torch does.
        ignore_index, reduction, label_smoothing: as in ``F.cross_entropy``.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    split_dim = get_parallel_dim(input)
    if split_dim is None:
        return F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    logits = _classes_last(input, target, split_dim)  # [..., C/tp]
    if tp_size() == 1:
        logits = logits.movedim(-1, 1) if logits.dim() > 1 else logits  # torch's class dim
        return F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if weight is not None and label_smoothing > 0.0:
        raise UnsupportedArgumentError(
            "parallel_cross_entropy: class weights together with label_smoothing are not supported on "
            "vocabulary-split logits; drop one of them, or gather the logits (gather_output=True)"
        )
    loss = vocab_parallel_cross_entropy(logits, target, label_smoothing, ignore_index, tp_group())  # [...] fp32
    kept = (target != ignore_index).to(loss.dtype)
    if weight is not None:
        vocab = logits.shape[-1] * tp_size()
        if weight.shape != (vocab,):
            raise ValueError(f"parallel_cross_entropy: weight has shape {tuple(weight.shape)}, expected ({vocab},)")
        kept = kept * weight.to(loss.dtype)[target.clamp(0, vocab - 1)]
        loss = loss * kept
    return _reduce(loss, kept, reduction).to(input.dtype)


def __getattr__(name: str) -> Any:
    """Fall back to ``torch.nn.functional`` (``functional.relu``, ``functional.softmax``...)."""
    try:
        return getattr(F, name)
    except AttributeError:
        raise AttributeError(f"module 'megatron_core.nn.functional' has no attribute {name!r}") from None
