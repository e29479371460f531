"""GroupedMLP: packed expert weights (no per-step copy), same values and gradients as SequentialMLP."""

from __future__ import annotations

import pytest
import torch

from megatron_core.transformer.moe.grouped_experts import GroupedMLP, _adjacent, stack_weights
from tests.transformer.moe.moe_harness import build_moe_gpt, moe_config


def _experts(model: torch.nn.Module) -> GroupedMLP:
    experts = model.decoder.layers[0].mlp.experts
    assert isinstance(experts, GroupedMLP)
    return experts


def _fc1(experts: GroupedMLP) -> list[torch.nn.Parameter]:
    return [e.linear_fc1.weight for e in experts.local_experts]


def test_packed_weights_are_stacked_without_copy_and_stay_packed_after_to():
    torch.manual_seed(0)
    model = build_moe_gpt(moe_config(), grouped=True)
    experts = _experts(model)
    weights = _fc1(experts)
    assert _adjacent(weights) and _adjacent([e.linear_fc2.weight for e in experts.local_experts])
    stacked = stack_weights(weights)
    assert stacked.data_ptr() == weights[0].data_ptr()  # a view: no copy
    torch.testing.assert_close(stacked, torch.stack(weights), rtol=0, atol=0)
    # the gradient reaches each expert's own Parameter
    (stacked * torch.arange(len(weights)).view(-1, 1, 1)).sum().backward()
    for e, w in enumerate(weights):
        torch.testing.assert_close(w.grad, torch.full_like(w, float(e)), rtol=0, atol=0)
    model.to(torch.float64)
    assert _adjacent(_fc1(experts)) and _fc1(experts)[0].dtype == torch.float64
    # a weight moved elsewhere: the forward falls back to a copy with the same values
    moved = _fc1(experts)
    moved[1].data = moved[1].data.clone()
    assert not _adjacent(moved)
    torch.testing.assert_close(stack_weights(moved), torch.stack(moved), rtol=0, atol=0)


@pytest.mark.parametrize("ffn", [32, 64])  # = hidden: weights on fc2's input; wider: on its output
def test_grouped_equals_sequential_outputs_and_gradients(ffn):
    torch.manual_seed(0)
    grouped = build_moe_gpt(moe_config(moe_ffn_hidden_size=ffn), grouped=True)
    sequential = build_moe_gpt(moe_config(moe_ffn_hidden_size=ffn), grouped=False)
    sequential.load_state_dict(grouped.state_dict())
    tokens = torch.randint(0, 64, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    losses = [model(tokens, positions, None, labels=tokens).mean() for model in (grouped, sequential)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for loss in losses:
        loss.backward()
    seq_params = dict(sequential.named_parameters())
    for name, p in grouped.named_parameters():
        torch.testing.assert_close(p.grad, seq_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_grouped_experts_under_torch_compile_match_eager():
    """Regional torch.compile (aot_eager: no code generation) of an MoE model with grouped experts: the
    grouped GEMM's fake kernel takes bf16 only, so compiled fp32 graphs use the loop; same gradients."""
    from megatron_core.training.compile import compile_layers

    torch.manual_seed(0)
    eager = build_moe_gpt(moe_config(moe_ffn_hidden_size=64), grouped=True)
    torch.manual_seed(0)
    compiled = build_moe_gpt(moe_config(moe_ffn_hidden_size=64), grouped=True)
    compile_layers(compiled, backend="aot_eager")
    tokens = torch.randint(0, 64, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    for model in (eager, compiled):
        model(tokens, positions, None, labels=tokens).mean().backward()
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
