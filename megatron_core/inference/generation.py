"""Autoregressive generation with or without the key/value cache.

With the cache the prompt runs once, then every step feeds one token at position
``sequence_len_offset``; without it every step re-runs the whole sequence. Both give the same
tokens and (up to float rounding) the same logits; the cache makes each step O(s) instead of O(s^2).

Tensor parallelism: the vocab-parallel logits are gathered on every TP rank and the token chosen on
TP rank 0 is broadcast, so all ranks of a model replica continue with the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.inference.inference_params import InferenceParams
from megatron_core.inference.sampling import SamplingParams, sample


@dataclass
class GenerationOutput:
    """``tokens``: ``[b, prompt + generated]``; ``logits``: ``[b, generated, vocab]`` (full vocab, fp32)."""

    tokens: torch.Tensor
    logits: torch.Tensor

    def new_tokens(self, prompt_length: int) -> torch.Tensor:
        return self.tokens[:, prompt_length:]


def gather_vocab_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[..., vocab / tp]`` on each TP rank -> ``[..., vocab]`` on every TP rank."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.group_world_size(group)
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _broadcast_from_tp_rank0(tokens: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    if group is not None and parallel_state.group_world_size(group) > 1:
        dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens


def _positions(start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, length)  # [b, s]


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
             sampling: SamplingParams | None = None, *, use_cache: bool = True, vocab_size: int | None = None,
             eos_id: int | None = None, seed: int = 0) -> GenerationOutput:
    """Continue ``prompt`` (``[b, p]`` token ids, equal lengths) by ``max_new_tokens`` tokens.

    Args:
        model: a language model ``forward(tokens, position_ids, attention_mask, inference_params=...)``
            returning logits ``[b, s, vocab / tp]``; put in eval mode for the call.
        prompt: the prompts, ``[b, p]``.
        max_new_tokens: tokens to generate per sequence.
        sampling: greedy by default.
        use_cache: decode with the key/value cache (else re-run the full sequence each step).
        vocab_size: the real vocabulary; logits of padded ids beyond it are never chosen.
        eos_id: a sequence that produced it continues with ``eos_id`` only; generation stops early
            once every sequence has.
        seed: seed of the sampling generator (sampling is reproducible).
    """
    sampling = sampling or SamplingParams()
    batch, prompt_len = prompt.shape
    max_len = getattr(model, "max_sequence_length", None)
    if max_len is not None and prompt_len + max_new_tokens > max_len:
        raise ValueError(f"generate: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_sequence_length={max_len}; shorten the prompt or generate fewer tokens")
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    params = InferenceParams(batch, prompt_len + max_new_tokens) if use_cache else None
    tokens = prompt
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    step_logits = []
    try:
        inputs, start = prompt, 0
        for _ in range(max_new_tokens):
            if params is None:
                inputs, start = tokens, 0
            logits = model(inputs, _positions(start, inputs.size(1), batch, prompt.device), None,
                           inference_params=params)
            last = gather_vocab_logits(logits[:, -1]).float()  # [b, vocab]
            if vocab_size is not None:
                last = last[:, :vocab_size]
            if params is not None:
                params.advance(inputs.size(1))
            step_logits.append(last)
            next_ids = _broadcast_from_tp_rank0(sample(last, sampling, generator))
            if eos_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                finished |= next_ids == eos_id
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            inputs, start = next_ids[:, None], tokens.size(1) - 1
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return GenerationOutput(tokens=tokens, logits=torch.stack(step_logits, dim=1))
