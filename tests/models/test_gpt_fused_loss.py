"""GPTModel with labels: the fused output layer + loss (default) against the logits path (fusion off).

Same per-token loss and the same gradient on every parameter within 1e-6 in fp32: tied and untied
heads, a head with a bias (GPT-J), masked losses, and TP=2 with sequence parallelism.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.testing import run_distributed
from specs.gpt import get_gpt_layer_local_spec

S, B, VOCAB = 10, 3, 96
ATOL = 1e-6


def _config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**fields, **overrides})


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    return ids, torch.arange(S).expand(B, S), labels, mask


def _loss_and_grads(model: GPTModel, fused: bool, masked: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.config.cross_entropy_loss_fusion = fused
    model.zero_grad(set_to_none=True)
    ids, pos, labels, mask = _batch()
    loss = model(ids, pos, None, labels=labels)  # [b, s]
    assert loss.shape == (B, S) and loss.dtype == torch.float32
    total = (loss * mask).sum() / mask.sum() if masked else loss.mean()
    total.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model: GPTModel, masked: bool) -> None:
    loss_ref, grads_ref = _loss_and_grads(model, fused=False, masked=masked)
    loss, grads = _loss_and_grads(model, fused=True, masked=masked)
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("masked", [False, True], ids=["mean", "masked"])
@pytest.mark.parametrize("head", ["tied", "untied", "untied+bias"])
def test_fused_loss_matches_logits_path(head, masked):
    torch.manual_seed(0)
    kwargs = {"share_embeddings_and_output_weights": head == "tied", "output_layer_bias": head == "untied+bias"}
    model = GPTModel(_config(), get_gpt_layer_local_spec(), VOCAB, S, **kwargs)
    if head == "untied+bias":
        with torch.no_grad():
            model.output_layer.bias.normal_()
    assert model.config.cross_entropy_loss_fusion  # on by default
    _compare(model, masked)


def test_logits_without_labels_are_unchanged():
    model = GPTModel(_config(), get_gpt_layer_local_spec(), VOCAB, S)
    ids, pos, labels, _ = _batch()
    logits = model(ids, pos, None)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(model(ids, pos, None, labels=labels), expected.view(B, S), atol=ATOL, rtol=0)


def _tp2_sequence_parallel() -> None:
    ps.initialize_model_parallel(2)
    torch.manual_seed(0)
    model = GPTModel(_config(tensor_model_parallel_size=2, sequence_parallel=True), get_gpt_layer_local_spec(),
                     VOCAB, S, share_embeddings_and_output_weights=False)
    _compare(model, masked=True)


def test_fused_loss_at_tp2_with_sequence_parallelism(tmp_path):
    run_distributed(_tp2_sequence_parallel, 2, tmp_dir=tmp_path)
