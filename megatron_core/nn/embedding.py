"""``ParallelEmbedding``: ``torch.nn.Embedding`` that can split its table across tensor-parallel ranks.

=========  ===========================================  =========================================
``dim``    class built (all are ``ParallelEmbedding``)  local table / what forward does
=========  ===========================================  =========================================
None       plain embedding                              ``[V, D]``: exactly ``nn.Embedding``
0          vocabulary split, a ``VocabParallelEmbedding``  ``[V/tp, D]``; partial lookups summed
1 or -1    embedding-dim split                          ``[V, D/tp]``; output all-gathered
=========  ===========================================  =========================================

The table is initialised as ``nn.Embedding``'s (``N(0, 1)``, padding row zero) from the same seed,
at every TP size. A split table supports ``padding_idx`` (its row stays zero and gets no gradient)
but not ``max_norm``, ``scale_grad_by_freq`` or ``sparse``: those raise ``UnsupportedArgumentError``.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.module import MegatronModule, make_sharded_tensors_for_checkpoint
from megatron_core.nn._base import (
    TorchLoadMixin,
    check_divisible,
    linear_layer_config,
    local_slice,
    normalize_dim,
    tp_rank,
    tp_size,
)
from megatron_core.nn.functional import _check_split_embedding_args, parallel_embedding
from megatron_core.nn.init import shard_init_helper_
from megatron_core.tensor_parallel.layers import VocabParallelEmbedding, set_tensor_model_parallel_attributes

__all__ = ["ParallelEmbedding"]


def _normal_init(tensor: torch.Tensor) -> None:
    torch.nn.init.normal_(tensor)  # nn.Embedding.reset_parameters


class ParallelEmbedding(TorchLoadMixin, MegatronModule):
    """Drop-in ``torch.nn.Embedding`` with optional tensor-parallel splitting.

    Args:
        num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
        _weight, _freeze, device, dtype: as ``torch.nn.Embedding`` (``_weight`` is the full table).
        dim: None (not split), 0 (split the vocabulary), 1 / -1 (split the embedding dimension).
        gather_output: ``dim=1`` only: return ``[*, D]`` (default) or ``[*, D/tp]`` tagged -1.
    """

    num_embeddings: int
    embedding_dim: int
    dim: int | None
    weight: torch.nn.Parameter

    def __new__(cls, *args: Any, **kwargs: Any) -> ParallelEmbedding:
        if cls is ParallelEmbedding:
            cls = _CLASSES[normalize_dim(kwargs.get("dim"), "ParallelEmbedding")]
        return super().__new__(cls)

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, max_norm: float | None = None,
        norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
        _weight: torch.Tensor | None = None, _freeze: bool = False, device: Any = None,
        dtype: torch.dtype | None = None, *, dim: int | None = None, gather_output: bool = True,
    ) -> None:
        dim = normalize_dim(dim, "ParallelEmbedding")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx} must lie in [-{num_embeddings}, {num_embeddings})")
            padding_idx %= num_embeddings
        if dim is not None:
            _check_split_embedding_args(max_norm, scale_grad_by_freq, sparse)
            check_divisible(num_embeddings if dim == 0 else embedding_dim,
                            "ParallelEmbedding num_embeddings" if dim == 0 else "ParallelEmbedding embedding_dim")
        self._build(num_embeddings, embedding_dim, dtype, perform_init=_weight is None)
        self.num_embeddings, self.embedding_dim, self.dim = num_embeddings, embedding_dim, dim
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
        self.scale_grad_by_freq, self.sparse, self.gather_output = scale_grad_by_freq, sparse, gather_output
        with torch.no_grad():
            if _weight is not None:
                if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                    raise ValueError(f"_weight has shape {tuple(_weight.shape)}, expected "
                                     f"({num_embeddings}, {embedding_dim}) (the full table)")
                full = _weight if dim is None else local_slice(_weight, dim, tp_rank(), tp_size())
                self.weight.copy_(full)
            else:  # as nn.Embedding: a given table keeps its padding row
                self._zero_padding_row()
        self.weight.requires_grad_(not _freeze)
        if device is not None:
            self.to(device)

    def _build(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None, perform_init: bool) -> None:
        raise NotImplementedError  # each layout allocates (and initialises) its own table

    def _local_padding_row(self) -> int | None:
        if self.padding_idx is None:
            return None
        if self.dim != 0:
            return self.padding_idx
        first = tp_rank() * self.weight.shape[0]
        local = self.padding_idx - first
        return local if 0 <= local < self.weight.shape[0] else None

    def _zero_padding_row(self) -> None:
        row = self._local_padding_row()
        if row is not None:
            self.weight[row].fill_(0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Ids ``[*]`` -> embeddings ``[*, D]`` (``[*, D/tp]`` for an ungathered dim=1 split)."""
        return parallel_embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
            self.sparse, num_embeddings=self.num_embeddings, dim=self.dim, gather_output=self.gather_output,
        )

    def _get_name(self) -> str:
        return "ParallelEmbedding"

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, dim={self.dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text + ("" if self.dim is None else f", tp={tp_size()}")


class _Embedding(ParallelEmbedding):
    """``dim=None``: the full table, ``F.embedding`` with every ``nn.Embedding`` option."""

    def _build(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None, perform_init: bool) -> None:
        MegatronModule.__init__(self, None)
        self.weight = torch.nn.Parameter(torch.empty((num_embeddings, embedding_dim), dtype=dtype))
        if perform_init:
            _normal_init(self.weight.data)


class _VocabSplitEmbedding(ParallelEmbedding, VocabParallelEmbedding):
    """``dim=0``: ``[V/tp, D]`` per rank (a ``VocabParallelEmbedding``, its checkpoint layout included)."""

    def _build(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None, perform_init: bool) -> None:
        VocabParallelEmbedding.__init__(
            self, num_embeddings, embedding_dim, init_method=_normal_init,
            config=linear_layer_config(dtype, perform_initialization=perform_init),
        )


class _EmbeddingDimSplit(ParallelEmbedding):
    """``dim=1``: ``[V, D/tp]`` per rank; the lookups are all-gathered along the embedding dim."""

    def _build(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None, perform_init: bool) -> None:
        MegatronModule.__init__(self, linear_layer_config(dtype))
        self.weight = torch.nn.Parameter(torch.empty((num_embeddings, embedding_dim // tp_size()), dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        if perform_init:
            shard_init_helper_(_normal_init, self.weight, dim=1)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (), metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Weight split along axis 1 (the embedding dimension)."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 1}, sharded_offsets)


_CLASSES: dict[int | None, type[ParallelEmbedding]] = {None: _Embedding, 0: _VocabSplitEmbedding, 1: _EmbeddingDimSplit}
