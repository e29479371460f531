"""Fixed sinusoidal absolute positions ("Attention Is All You Need", the PyTorch tutorial's encoding), added to the tokens.

Channel ``2i`` holds ``sin(pos / base^(2i/d))`` and channel ``2i+1`` the matching cosine. The table is
derived from the constructor arguments, so it is a non-persistent buffer: no checkpoint key.
"""

from __future__ import annotations

import math

import torch

from megatron_core.module import MegatronModule


def sinusoidal_table(max_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[max_positions, dim]`` fp32 table, sin on even channels and cos on odd ones."""
    position = torch.arange(max_positions).unsqueeze(1)  # [p, 1]
    inv_freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(base) / dim))  # [ceil(d/2)]
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


class SinusoidalPositionEmbedding(MegatronModule):
    """Look up fixed sinusoidal position vectors.

    Args:
        embedding_dim: width of each position vector.
        max_positions: number of positions in the table.
        base: the wavelength ladder's base (10000 in the paper).
    """

    def __init__(self, embedding_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        if embedding_dim <= 0 or max_positions <= 0:
            raise ValueError(
                f"SinusoidalPositionEmbedding: embedding_dim={embedding_dim} and max_positions={max_positions} "
                "must both be positive"
            )
        self.embedding_dim, self.max_positions, self.base = embedding_dim, max_positions, base
        self.table: torch.Tensor
        self.register_buffer("table", sinusoidal_table(max_positions, embedding_dim, base), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids (any shape, each < ``max_positions``) -> ``[*position_ids.shape, d]``."""
        if position_ids.numel() and int(position_ids.max()) >= self.max_positions:
            raise ValueError(
                f"position id {int(position_ids.max())} is beyond the table of {self.max_positions} positions; "
                "raise max_positions"
            )
        return self.table[position_ids]

    def extra_repr(self) -> str:
        return f"{self.embedding_dim}, max_positions={self.max_positions}, base={self.base}"
