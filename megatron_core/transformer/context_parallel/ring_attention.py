"""Ring attention over the context-parallel group, forward and backward (online-softmax merge).

Layout (Megatron-Core's load balancing): the sequence of length ``S`` is cut into ``2 * cp``
chunks of ``c = S / (2 * cp)`` tokens; CP rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``
(concatenated: its local sequence is ``2c``). Under a causal mask, chunk ``i`` attends to chunks
``<= i``, so pairing an early chunk with a late one gives every rank the same work.

Forward: each rank keeps its queries; the key/value blocks travel around the ring (rank ``r``
sends to ``r + 1`` and receives from ``r - 1``, batched ``isend``/``irecv``, overlapped with the
block computation). At step ``t`` rank ``r`` holds the keys/values of rank ``(r - t) mod cp``; for
each (query chunk, key chunk) pair it computes a block's output and log-sum-exp (skipping pairs
entirely in the future, masking the diagonal pair causally) and merges them into the running
result: ``lse = logaddexp(lse, lse_blk)``, ``out = out * exp(lse_old - lse) + out_blk * exp(lse_blk - lse)``.

Backward: the keys/values travel the ring again, together with an accumulator of their
gradients. Each block's probabilities are rebuilt from the saved final log-sum-exp
(``p = exp(s - lse)``), ``ds = p * (dp - rowsum(dout * out))``; ``dq`` stays local, ``dk``/``dv``
are added to the travelling accumulator, which after ``cp`` hops is back on the rank owning those
keys.

Dropout on the probabilities draws each block's mask from its own generator, seeded with
``seed + i * 2cp + j`` for query chunk ``i`` and key chunk ``j``, so forward and backward (and a
recompute) see the same mask without keeping it. GQA: key/value heads are repeated to the query
heads inside a block and their gradients summed back over each group. The block maths runs in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def cp_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices (of ``2 * cp_size``) CP rank ``cp_rank`` holds."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


class _Ring:
    """This rank's place in the ring: who to send to and receive from (global ranks)."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start_exchange(self, send: torch.Tensor) -> tuple[list[Any], torch.Tensor]:
        """Send ``send`` to the next rank and receive the previous rank's tensor of the same shape."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group), dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return dist.batch_isend_irecv(ops), recv

    @staticmethod
    def finish(requests: list[Any]) -> None:
        for request in requests:
            request.wait()


def _dropout_keep(seed: int, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Scaled keep-mask (0 or 1/(1-p)) of one block, reproducible from ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(torch.float32) / (1.0 - p)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal: bool) -> torch.Tensor:
    """``[b, np, c, c]`` fp32 scores; the diagonal block masks keys after each query."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if diagonal:
        c = scores.shape[-1]
        future = torch.ones(c, c, dtype=torch.bool, device=scores.device).triu(diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


class _Blocks:
    """The (query chunk, key chunk) pairs of one ring step and their dropout seeds."""

    def __init__(self, cp: int, rank: int, step: int, causal: bool, chunk: int, seed: int) -> None:
        q_ids = cp_chunk_ids(rank, cp)
        k_ids = cp_chunk_ids((rank - step) % cp, cp)
        self.pairs: list[tuple[slice, slice, bool, int]] = []
        for a, qi in enumerate(q_ids):
            for b, kj in enumerate(k_ids):
                if causal and kj > qi:
                    continue  # entirely in the future of these queries
                self.pairs.append((slice(a * chunk, (a + 1) * chunk), slice(b * chunk, (b + 1) * chunk),
                                   causal and kj == qi, seed + qi * 2 * cp + kj))


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[b, ng, s, hn]`` -> ``[b, ng * groups, s, hn]`` (query head i uses key/value head i // groups)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _sum_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``_repeat_heads`` for gradients: sum each group's heads."""
    if groups == 1:
        return t
    b, heads, s, hn = t.shape
    return t.view(b, heads // groups, groups, s, hn).sum(dim=2)


class RingAttentionFunction(torch.autograd.Function):
    """``softmax(q k^T * scale [+ causal]) v`` with the sequence split over the CP group."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup, causal: bool,
        scale: float, dropout_p: float, seed: int,
    ) -> torch.Tensor:
        ring = _Ring(group)
        groups = q.shape[1] // k.shape[1]
        chunk = q.shape[2] // 2
        qf = q.float()
        out = torch.zeros_like(qf)  # [b, np, 2c, hn]
        lse = torch.full(qf.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)  # [b, np, 2c]
        kv = torch.stack([k, v])  # [2, b, ng, 2c, hn]
        for step in range(ring.size):
            pending = ring.start_exchange(kv) if step + 1 < ring.size else None
            kf, vf = (_repeat_heads(t.float(), groups) for t in kv)
            for qs, ks, diagonal, block_seed in _Blocks(ring.size, ring.rank, step, causal, chunk, seed).pairs:
                scores = _scores(qf[:, :, qs], kf[:, :, ks], scale, diagonal)
                block_lse = torch.logsumexp(scores, dim=-1)  # [b, np, c]
                probs = torch.exp(scores - block_lse[..., None])
                if dropout_p > 0.0:
                    probs = probs * _dropout_keep(block_seed, probs.shape, dropout_p, q.device)
                block_out = torch.matmul(probs, vf[:, :, ks])  # [b, np, c, hn]
                merged = torch.logaddexp(lse[:, :, qs], block_lse)
                out[:, :, qs] = (out[:, :, qs] * torch.exp(lse[:, :, qs] - merged)[..., None]
                                 + block_out * torch.exp(block_lse - merged)[..., None])
                lse[:, :, qs] = merged
            if pending is not None:
                _Ring.finish(pending[0])
                kv = pending[1]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (group, causal, scale, dropout_p, seed)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, dropout_p, seed = ctx.settings
        ring = _Ring(group)
        groups = q.shape[1] // k.shape[1]
        chunk = q.shape[2] // 2
        qf, do = q.float(), dout.float()
        delta = (do * out).sum(dim=-1)  # [b, np, 2c]: rowsum(dout * out)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # travels with kv
        for step in range(ring.size):
            pending = ring.start_exchange(kv) if step + 1 < ring.size else None
            kf, vf = (_repeat_heads(t.float(), groups) for t in kv)
            dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
            for qs, ks, diagonal, block_seed in _Blocks(ring.size, ring.rank, step, causal, chunk, seed).pairs:
                probs = torch.exp(_scores(qf[:, :, qs], kf[:, :, ks], scale, diagonal) - lse[:, :, qs, None])
                dprobs = torch.matmul(do[:, :, qs], vf[:, :, ks].transpose(-1, -2))  # [b, np, c, c]
                if dropout_p > 0.0:
                    keep = _dropout_keep(block_seed, probs.shape, dropout_p, q.device)
                    dv[:, :, ks] += torch.matmul((probs * keep).transpose(-1, -2), do[:, :, qs])
                    dprobs = dprobs * keep
                else:
                    dv[:, :, ks] += torch.matmul(probs.transpose(-1, -2), do[:, :, qs])
                dscores = probs * (dprobs - delta[:, :, qs, None]) * scale
                dq[:, :, qs] += torch.matmul(dscores, kf[:, :, ks])
                dk[:, :, ks] += torch.matmul(dscores.transpose(-1, -2), qf[:, :, qs])
            dkv += torch.stack([_sum_heads(dk, groups), _sum_heads(dv, groups)])
            grad_requests, dkv_next = ring.start_exchange(dkv)
            _Ring.finish(grad_requests)
            dkv = dkv_next
            if pending is not None:
                _Ring.finish(pending[0])
                kv = pending[1]
        # After size hops every key/value block's gradient is back on its owner.
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: ProcessGroup, *, causal: bool,
    softmax_scale: float, dropout_p: float = 0.0, seed: int = 0,
) -> torch.Tensor:
    """Attention of this rank's queries over the whole (context-parallel) sequence.

    Args:
        query: ``[b, np, 2c, hn]``: this rank's two chunks of the sequence (``cp_chunk_ids``).
        key, value: ``[b, ng, 2c, hn]`` (``np % ng == 0``), the same chunks.
        group: the context-parallel group (size >= 2).
        causal: causal mask over the *global* positions of the chunks.
        softmax_scale: the scores' scale.
        dropout_p: dropout on the attention probabilities.
        seed: base seed of the per-block dropout masks (the same value must be used for a recompute).

    Returns:
        ``[b, np, 2c, hn]`` in the query's dtype.
    """
    if query.shape[2] % 2 != 0:
        raise ValueError(
            f"ring attention needs an even local sequence (two chunks per rank); got {query.shape[2]} tokens. "
            "Fix: make the sequence length divisible by 2 * context_parallel_size"
        )
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads evenly")
    return RingAttentionFunction.apply(query, key, value, group, causal, softmax_scale, dropout_p, seed)
