"""Cut a batch into this context-parallel rank's load-balanced chunks of the sequence.

The sequence (length ``S``, divisible by ``2 * cp``) is cut into ``2 * cp`` chunks; CP rank ``r``
keeps chunks ``r`` and ``2 * cp - 1 - r``, concatenated (see ``ring_attention``). Everything that
runs along the sequence is cut the same way: tokens, labels, loss mask, position ids. Positions
stay the *true* positions of the tokens, so learned and rotary embeddings see the same positions as
without context parallelism.
"""

from __future__ import annotations

import torch

from megatron_core import parallel_state
from megatron_core.transformer.context_parallel.ring_attention import cp_chunk_ids


def check_sequence_length(seq_len: int, cp_size: int) -> None:
    """Raise unless ``seq_len`` splits into ``2 * cp_size`` equal chunks."""
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 x context_parallel_size = {2 * cp_size}; "
            f"pad or cut the sequences to a multiple of {2 * cp_size}, or lower context_parallel_size"
        )


def cp_position_ids(seq_len: int, cp_rank: int, cp_size: int, device: torch.device | None = None) -> torch.Tensor:
    """True positions ``[2 * seq_len / (2 cp)]`` of the tokens CP rank ``cp_rank`` holds."""
    check_sequence_length(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    first, second = cp_chunk_ids(cp_rank, cp_size)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def split_for_cp_rank(tensor: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's two chunks of ``tensor`` along ``seq_dim`` (a copy when ``cp_size > 1``)."""
    if cp_size == 1:
        return tensor
    seq_len = tensor.shape[seq_dim]
    index = cp_position_ids(seq_len, cp_rank, cp_size, tensor.device)
    return tensor.index_select(seq_dim, index)


def get_batch_on_this_cp_rank(
    batch: dict[str, torch.Tensor | None], cp_rank: int | None = None, cp_size: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Megatron-Core's name: cut every ``[b, s]`` entry of ``batch`` to this CP rank's chunks.

    ``position_ids`` are created (the true positions ``0 .. s-1``) when the batch has none, so the
    model sees each token's real position. ``attention_mask`` entries are not supported under CP
    (the ring attention is causal or unmasked by its mask type) and raise.

    Args:
        batch: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``... each ``[b, s]`` (or None).
        cp_rank, cp_size: default to ``parallel_state``'s.
    """
    cp_size = parallel_state.get_context_parallel_world_size() if cp_size is None else cp_size
    cp_rank = parallel_state.get_context_parallel_rank() if cp_rank is None else cp_rank
    if cp_size == 1:
        return dict(batch)
    if batch.get("attention_mask") is not None:
        raise ValueError(
            "get_batch_on_this_cp_rank: an explicit attention_mask cannot be split for context parallelism; "
            "drop it (causal attention is the layer's mask type) and mask the loss with loss_mask"
        )
    sample = next(v for v in batch.values() if v is not None)
    out: dict[str, torch.Tensor | None] = {}
    if batch.get("position_ids") is None:
        b, s = sample.shape[0], sample.shape[1]
        out["position_ids"] = torch.arange(s, device=sample.device).expand(b, s)
    for name, value in batch.items():
        if name == "attention_mask":
            continue
        source = out.get(name, value) if name == "position_ids" else value
        out[name] = None if source is None else split_for_cp_rank(source, cp_rank, cp_size, seq_dim=1)
    if "position_ids" not in batch:
        out["position_ids"] = split_for_cp_rank(out["position_ids"], cp_rank, cp_size)  # type: ignore[arg-type]
    return out
