"""Cached and uncached decoding give the same tokens and logits; TP=2 generates what TP=1 does."""

import pytest
import torch

from megatron_core import TransformerConfig, parallel_state
from megatron_core.inference import SamplingParams, generate
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from specs.gpt import get_gpt_layer_local_spec

VOCAB = 64


def _model(position_embedding_type, tp=1, num_query_groups=None, init_method_std=0.02):
    model_parallel_manual_seed(5)
    config = TransformerConfig(num_layers=2, hidden_size=48, num_attention_heads=4, num_query_groups=num_query_groups,
                               hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
                               init_method_std=init_method_std)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=24,
                    position_embedding_type=position_embedding_type)


@pytest.mark.parametrize("position_embedding_type, groups", [("learned_absolute", None), ("rope", 2)])
def test_cached_equals_uncached(position_embedding_type, groups):
    model = _model(position_embedding_type, num_query_groups=groups)
    prompt = torch.randint(0, VOCAB, (3, 5))
    cached = generate(model, prompt, 12, use_cache=True)
    uncached = generate(model, prompt, 12, use_cache=False)
    assert cached.tokens.shape == (3, 17) and cached.logits.shape == (3, 12, VOCAB)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.tokens[:, :5], prompt)
    # Sampling: same seed, same tokens, cached or not; top-k keeps tokens among the k best.
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9)
    a = generate(model, prompt, 12, params, use_cache=True, seed=1)
    b = generate(model, prompt, 12, params, use_cache=False, seed=1)
    assert torch.equal(a.tokens, b.tokens)
    chosen = a.tokens[:, 5:]
    assert (a.logits.gather(-1, chosen[..., None]) >= a.logits.topk(5).values[..., -1:]).all()


def test_eos_stops_and_bounds_are_checked():
    model = _model("learned_absolute")
    prompt = torch.randint(0, VOCAB, (1, 4))
    first = int(generate(model, prompt, 1).tokens[0, -1])
    out = generate(model, prompt, 10, eos_id=first)
    assert out.tokens.shape == (1, 5)
    with pytest.raises(ValueError, match="max_sequence_length=24"):
        generate(model, prompt, 21)


def _tp2_generate(prompt):
    parallel_state.initialize_model_parallel(2)
    return generate(_model("rope", tp=2), prompt, 8, use_cache=True)


def test_tp2_generates_like_tp1(tmp_path):
    prompt = torch.randint(0, VOCAB, (2, 4))
    reference = generate(_model("rope"), prompt, 8, use_cache=True)
    for out in run_distributed(_tp2_generate, 2, prompt, tmp_dir=tmp_path):
        assert torch.equal(out.tokens, reference.tokens)
        torch.testing.assert_close(out.logits, reference.logits, rtol=1e-4, atol=1e-4)


class _PaddedIdsWin(torch.nn.Module):
    """The model, with the logits of the padded ids (``>= real``) pushed far above the rest."""

    def __init__(self, model: torch.nn.Module, real: int) -> None:
        super().__init__()
        self.model, self.real = model, real
        self.max_sequence_length = model.max_sequence_length

    def forward(self, *args, **kwargs):
        logits = self.model(*args, **kwargs).clone()
        logits[..., self.real:] += 100.0
        return logits


def _reference_greedy(model, prompt, steps, real, eos_id):
    """Plain loop: full re-run each step, argmax over the real vocabulary, finished rows repeat eos."""
    tokens, finished, rows = prompt, torch.zeros(prompt.size(0), dtype=torch.bool), []
    with torch.no_grad():
        for _ in range(steps):
            positions = torch.arange(tokens.size(1)).expand_as(tokens)
            last = model(tokens, positions, None)[:, -1, :real]
            rows.append(last)
            nxt = torch.where(finished, torch.full_like(last[:, 0], eos_id, dtype=torch.long), last.argmax(-1))
            finished |= nxt == eos_id
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if finished.all():
                break
    return tokens, torch.stack(rows, 1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_vocab_size_and_eos_with_a_batch(use_cache):
    """Batch of 3: padded ids never chosen (though their logits win); a row that emits eos keeps emitting
    it while the others go on; generation stops once every row has; tokens and logits as a plain loop."""
    real = 50
    # Large weights: varied greedy continuations (small ones repeat one token forever).
    model = _PaddedIdsWin(_model("learned_absolute", init_method_std=1.0), real).eval()
    prompt = torch.randint(0, real, (3, 4), generator=torch.Generator().manual_seed(2))
    free, _ = _reference_greedy(model, prompt, 12, real, eos_id=-1)  # never stops
    # eos := the token row 0 emits 3rd, so row 0 finishes early; the other rows must not stop with it.
    eos = int(free[0, 6])
    assert eos not in free[1:, 4:].flatten().tolist(), "pick a prompt where only row 0 ever emits eos"
    assert (free[0, 7:] != eos).any(), "row 0 must go on with other tokens when not stopped"
    want_tokens, want_logits = _reference_greedy(model, prompt, 12, real, eos)
    out = generate(model, prompt, 12, use_cache=use_cache, vocab_size=real, eos_id=eos)
    assert out.logits.shape[-1] == real and int(out.tokens.max()) < real
    assert torch.equal(out.tokens, want_tokens)
    torch.testing.assert_close(out.logits, want_logits, atol=1e-3, rtol=1e-5)  # logits ~10 with these weights
    assert (out.tokens[0, 7:] == eos).all() and out.tokens.size(1) == 16  # the other rows ran all 12 steps
    assert torch.equal(out.tokens[1:], free[1:])
