"""Rotary position embeddings (RoPE): rotation angles per position, applied to queries and keys.

Rotary embeddings act inside attention (the model computes the angles once per forward and every
layer's attention rotates its q and k with them).

Conventions (Megatron-Core's): ``RotaryEmbedding(seq_len)`` returns the rotation angles as
``[s, 1, 1, rot_dim]``; ``apply_rotary_pos_emb(t, freqs)`` rotates the first ``rot_dim`` channels of
``t`` ``[s, b, heads, hn]`` and passes the rest through (partial rotary). Non-interleaved rotary
pairs channel ``i`` with ``i + rot_dim/2`` (GPT-NeoX / Llama-HF layout); interleaved pairs ``2i``
with ``2i + 1`` (GPT-J / original Meta layout).

Positions are the tokens' true positions: ``forward(s, offset)`` covers ``offset .. offset+s-1``;
``angles_for_positions(position_ids)`` gives one angle row per token for explicit positions (left
padding, packed documents, or a context-parallel rank's chunks of the sequence).
"""

from __future__ import annotations

import torch

from megatron_core.module import MegatronModule


class RotaryEmbedding(MegatronModule):
    """Rotary position angles for the first ``rotary_percent`` of each head's channels.

    Args:
        kv_channels: channels per attention head.
        rotary_percent: fraction of the channels that are rotated (1.0 = all).
        rotary_interleaved: pair adjacent channels (2i, 2i+1) instead of (i, i + dim/2).
        seq_len_interpolation_factor: divide positions by this (linear position interpolation).
        rotary_base: the base of the geometric frequency ladder (10000 for GPT-NeoX/Llama-2).
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: float | None = None,
        rotary_base: float = 10000,
    ) -> None:
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent={rotary_percent} must lie in (0, 1]; use 1.0 for full rotary")
        dim = kv_channels
        if rotary_percent < 1.0:
            dim = int(dim * rotary_percent)
        if dim % 2 != 0 or dim == 0:
            raise ValueError(
                f"rotary dimension {dim} (kv_channels={kv_channels} x rotary_percent={rotary_percent}) must "
                "be even and positive; adjust rotary_percent"
            )
        self.dim = dim
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        # Not persistent: it is derived from the constructor arguments, and Megatron-Core
        # checkpoints carry no such key.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """fp32 positions ``[n]`` -> angles ``[n, dim]``."""
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        freqs = torch.outer(positions, self.inv_freq)  # [n, dim/2]
        if self.rotary_interleaved:
            return freqs.repeat_interleave(2, dim=-1)  # [n, dim]: f0 f0 f1 f1 ...
        return torch.cat((freqs, freqs), dim=-1)  # [n, dim]: f0 f1 ... f0 f1 ...

    def forward(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Angles for positions ``offset .. offset + max_seq_len - 1``: ``[s, 1, 1, rot_dim]`` (fp32)."""
        positions = torch.arange(max_seq_len, device=self.inv_freq.device, dtype=torch.float32) + offset
        return self._angles(positions)[:, None, None, :]  # [s, 1, 1, dim]

    def angles_for_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Angles for explicit positions ``[b, s]``: ``[s, b, 1, rot_dim]`` (fp32), one row per token.

        Equal, bit for bit, to rows of ``forward(n)`` for the same integer positions.
        """
        b, s = position_ids.shape
        positions = position_ids.t().reshape(-1).to(device=self.inv_freq.device, dtype=torch.float32)  # [s*b]
        return self._angles(positions).view(s, b, 1, self.dim)  # [s, b, 1, dim]


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The 90-degree partner of each channel pair, with the sign of the rotation's sine term."""
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)  # back to (2i, 2i+1) pairs


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``freqs.shape[-1]`` channels of ``t`` by the angles ``freqs``.

    Args:
        t: queries or keys ``[s, b, heads, hn]``.
        freqs: angles ``[s, 1, 1, rot_dim]`` (or ``[s, b, 1, rot_dim]`` for per-sample positions) with
            ``rot_dim <= hn``, broadcast over batch and heads.
        rotary_interleaved: the channel pairing ``freqs`` was built for.

    Returns:
        ``t`` with its first ``rot_dim`` channels rotated, same shape and dtype.
    """
    rot_dim = freqs.shape[-1]
    if rot_dim > t.shape[-1]:
        raise ValueError(f"rotary dimension {rot_dim} exceeds the head dimension {t.shape[-1]}")
    if freqs.shape[0] != t.shape[0]:
        raise ValueError(
            f"rotary angles cover {freqs.shape[0]} positions but the input has sequence length {t.shape[0]}; "
            "slice the angles to the positions of this input"
        )
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    t_rot = t_rot * cos + _rotate_half(t_rot, rotary_interleaved) * sin
    return torch.cat((t_rot, t_pass), dim=-1) if t_pass.shape[-1] else t_rot
