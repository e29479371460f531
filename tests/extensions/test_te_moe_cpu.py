"""The Transformer Engine MoE spec (``get_gpt_layer_te_spec(num_experts=...)``) against the local one.

Stand-in TE (CPU, ``tests/extensions/fake_te``). Verifies the wiring: same initial weights (through the
TE->local key map), logits, gradients, checkpoint keys and the experts' ``allreduce = False`` marker, for
``SequentialMLP`` experts and a gated shared expert built from ``TEColumnParallelLinear`` /
``TERowParallelLinear``. Does not verify TE's kernels (GEMM numerics, TF32/bf16/FP8 paths) nor expert or
tensor parallelism with TE.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from megatron_core.extensions.te_key_map import te_to_local_state_dict
from megatron_core.models.gpt import GPTModel
from tests.extensions._fake_te import fake_te
from tests.transformer.moe.moe_harness import SEQ, VOCAB, build_moe_gpt, moe_config


@pytest.fixture
def te() -> Iterator[ModuleType]:
    with fake_te() as wrappers:
        yield wrappers


def _te_moe_gpt(seed: int) -> GPTModel:
    from specs.gpt import get_gpt_layer_te_spec

    torch.manual_seed(seed)
    config = moe_config()
    return GPTModel(config, get_gpt_layer_te_spec(num_experts=config.num_moe_experts), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                    parallel_output=False)


def test_te_moe_spec_matches_the_local_spec(te: ModuleType) -> None:
    torch.manual_seed(3)
    local = build_moe_gpt(moe_config())
    te_model = _te_moe_gpt(3)
    local_sd, mapped = local.state_dict(), te_to_local_state_dict(te_model.state_dict())
    assert mapped.keys() == local_sd.keys()
    assert all(torch.equal(mapped[k], local_sd[k]) for k in local_sd)
    expert = te_model.decoder.layers[0].mlp.experts.local_experts[0]
    assert (type(expert.linear_fc1).__name__, type(expert.linear_fc2).__name__) == \
        ("TEColumnParallelLinear", "TERowParallelLinear")
    shared = te_model.decoder.layers[0].mlp.shared_experts
    assert type(shared.linear_fc1).__name__ == "TEColumnParallelLinear"
    experts = [p for n, p in te_model.named_parameters() if ".mlp.experts." in n]
    assert experts and all(p.allreduce is False for p in experts)  # type: ignore[attr-defined]
    assert all(getattr(p, "allreduce", True) for n, p in te_model.named_parameters() if ".mlp.experts." not in n)

    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    losses = [m(tokens, positions, None, labels=tokens).mean() for m in (local, te_model)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for loss in losses:
        loss.backward()  # aux and z losses included (router in training mode)
    grads_local = {n: p.grad for n, p in local.named_parameters()}
    grads_te = te_to_local_state_dict({n: p.grad for n, p in te_model.named_parameters()})
    assert grads_te.keys() == grads_local.keys()
    for name, grad in grads_local.items():
        torch.testing.assert_close(grads_te[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_te_moe_checkpoint_keys_equal_the_local_ones(te: ModuleType) -> None:
    torch.manual_seed(4)
    local = build_moe_gpt(moe_config())
    te_model = _te_moe_gpt(4)
    local_keys = {k: v.key for k, v in local.sharded_state_dict().items()}
    te_keys = {k: v.key for k, v in te_model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    te_keys = {k: v for k, v in te_keys.items() if not v.endswith("_extra_state")}
    moe_local = {v for v in local_keys.values() if ".mlp." in v}
    moe_te = {v for v in te_keys.values() if ".mlp." in v}
    assert moe_te == moe_local and "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight" in moe_te
