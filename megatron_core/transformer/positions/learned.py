"""Learned absolute positions: a replicated table of one vector per position, added to the tokens.

The table is drawn in fp32 and then cast, as the parallel layers do: the same seed gives the same
weights at every TP size and in every ``params_dtype``. The state-dict key is ``weight``, so a
model holding it as ``position_embeddings`` keeps Megatron-Core's ``position_embeddings.weight``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_core.module import MegatronModule

InitMethod = Callable[[torch.Tensor], object]


def replicated_table(
    rows: int, dim: int, init_method: InitMethod = torch.nn.init.normal_, dtype: torch.dtype = torch.float32,
    perform_initialization: bool = True,
) -> torch.Tensor:
    """A ``[rows, dim]`` table drawn in fp32 by ``init_method`` (zeros when not initialising), cast to ``dtype``."""
    table = torch.empty(rows, dim, dtype=torch.float32)
    if perform_initialization:
        init_method(table)
    else:
        table.zero_()
    return table.to(dtype)


class LearnedPositionEmbedding(MegatronModule):
    """Position ids -> learned vectors (``weight`` ``[max_positions, dim]``, replicated over TP).

    Args:
        max_positions: number of positions in the table (the longest sequence).
        embedding_dim: width of each vector.
        init_method: in-place initialiser of the fp32 table (``torch.nn.Embedding``'s N(0, 1) by
            default; models pass ``config.init_method``).
        dtype: of the parameter.
        perform_initialization: draw the table (else zeros, to be loaded).
    """

    def __init__(
        self, max_positions: int, embedding_dim: int, init_method: InitMethod = torch.nn.init.normal_,
        dtype: torch.dtype = torch.float32, perform_initialization: bool = True,
    ) -> None:
        super().__init__()
        if max_positions <= 0 or embedding_dim <= 0:
            raise ValueError(
                f"LearnedPositionEmbedding: max_positions={max_positions} and embedding_dim={embedding_dim} "
                "must both be positive"
            )
        self.max_positions, self.embedding_dim = max_positions, embedding_dim
        self.weight = torch.nn.Parameter(
            replicated_table(max_positions, embedding_dim, init_method, dtype, perform_initialization)
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids (any shape, each < ``max_positions``) -> ``[*position_ids.shape, dim]``."""
        return F.embedding(position_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.max_positions}, {self.embedding_dim}"
