"""GPT and Llama (GQA, RoPE) at context-parallel sizes 2 and 4 against CP=1: logits, loss, gradients.

Each CP rank feeds its load-balanced chunks (``get_batch_on_this_cp_rank``: tokens, labels, loss mask
and true position ids); the loss is normalised by the global token count, and the weight
gradients summed over the CP group (as the data x context parallel reduction does) equal the
single-process gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.context_parallel import get_batch_on_this_cp_rank, split_for_cp_rank
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import llama_config

B, S, VOCAB = 2, 16, 64


def _config(family: str, cp: int, tp: int = 1, **extra) -> TransformerConfig:
    sizes = dict(num_layers=2, hidden_size=32, context_parallel_size=cp, tensor_model_parallel_size=tp, **extra)
    if family == "llama":
        return llama_config(num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64, **sizes)
    return TransformerConfig(num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0, **sizes)


def _model(family: str, cp: int, tp: int = 1, **extra) -> GPTModel:
    model_parallel_manual_seed(0)
    return GPTModel(_config(family, cp, tp, **extra), get_gpt_layer_local_spec(), VOCAB, S,
                    position_embedding_type="rope" if family == "llama" else "learned_absolute")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    loss_mask = torch.ones(B, S)
    loss_mask[0, -5:] = 0  # padding at the end of one sample
    loss_mask[1, :2] = 0
    return {"tokens": torch.randint(0, VOCAB, (B, S), generator=g),
            "labels": torch.randint(0, VOCAB, (B, S), generator=g), "loss_mask": loss_mask,
            "position_ids": torch.arange(S).expand(B, S)}


def _run(model: GPTModel, batch: dict[str, torch.Tensor], grad_group=None) -> dict[str, torch.Tensor]:
    total = _batch()["loss_mask"].sum()  # the global token count (CP=1's normaliser)
    logits = model(batch["tokens"], batch["position_ids"], None)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s(/cp)]
    summed = (loss * batch["loss_mask"]).sum()
    (summed / total).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if grad_group is not None:
        for grad in grads.values():
            dist.all_reduce(grad, group=grad_group)
        dist.all_reduce(summed, group=grad_group)
    return {"logits": logits.detach(), "loss": summed.detach() / total, **grads}


def _cp_rank_run(family: str, cp: int, tp: int) -> dict[str, torch.Tensor]:
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    model = _model(family, cp, tp, sequence_parallel=tp > 1)
    out = _run(model, get_batch_on_this_cp_rank(_batch()), ps.get_context_parallel_group())
    if tp > 1:  # logits are split over TP by vocabulary: gather them
        parts = [torch.empty_like(out["logits"]) for _ in range(tp)]
        dist.all_gather(parts, out["logits"], group=ps.get_tensor_model_parallel_group())
        out["logits"] = torch.cat(parts, dim=-1)
    return out


def _reference(family: str) -> dict[str, torch.Tensor]:
    return _run(_model(family, 1), _batch())


@pytest.mark.parametrize("family,cp", [("gpt", 2), ("llama", 2), ("gpt", 4), ("llama", 4)])
def test_context_parallel_matches_single_process(tmp_path, family, cp):
    expected = _reference(family)
    for rank, got in enumerate(run_distributed(_cp_rank_run, cp, family, cp, 1, tmp_dir=tmp_path)):
        torch.testing.assert_close(got["logits"], split_for_cp_rank(expected["logits"], rank, cp), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["loss"], expected["loss"], atol=1e-6, rtol=1e-6)
        for name, value in expected.items():
            if name not in ("logits", "loss"):
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=f"rank {rank} {name}")


def test_tp2_x_cp2_with_sequence_parallel(tmp_path):
    expected = _reference("llama")
    results = run_distributed(_cp_rank_run, 4, "llama", 2, 2, tmp_dir=tmp_path)
    for rank, got in enumerate(results):  # rank = tp_rank + 2 * cp_rank
        tp_rank, cp_rank = rank % 2, rank // 2
        torch.testing.assert_close(got["logits"], split_for_cp_rank(expected["logits"], cp_rank, 2), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(got["loss"], expected["loss"], atol=1e-6, rtol=1e-6)
        name = "embedding.word_embeddings.weight"  # split over TP by vocabulary rows
        rows = expected[name].chunk(2, dim=0)[tp_rank]
        torch.testing.assert_close(got[name], rows, atol=1e-5, rtol=1e-5, msg=f"rank {rank}")


def test_families_without_context_parallel_refuse_it(tmp_path):
    run_distributed(_bert_refuses_cp, 2, tmp_dir=tmp_path)


def _bert_refuses_cp() -> None:
    from megatron_core.models.bert import BertModel
    from specs.bert import get_bert_layer_local_spec

    ps.initialize_model_parallel(context_parallel_size=2)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, context_parallel_size=2)
    with pytest.raises(ValueError, match="context_parallel_size=2"):
        BertModel(config, get_bert_layer_local_spec(), VOCAB, S)
