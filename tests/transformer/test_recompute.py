"""Activation recompute: bytes kept for backward (none > selective > full) and exact gradients.

The bytes are measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd
keeps for backward passes through the pack hook; storages are counted once (views share them)
and parameters are left out, so the figure is the activation memory a step holds between
forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.transformer_block import TransformerBlock
from specs.gpt import get_gpt_layer_local_spec

S, B, H, HEADS, LAYERS = 16, 2, 32, 4, 2
FP32 = 4

RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}


def _config(mode: str, tp: int = 1, dropout: float = 0.1) -> TransformerConfig:
    return TransformerConfig(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, hidden_dropout=dropout,
        attention_dropout=dropout, tensor_model_parallel_size=tp, **RECOMPUTE[mode],
    )


def _block(mode: str, tp: int = 1, dropout: float = 0.1) -> TransformerBlock:
    torch.manual_seed(1)  # the same weights in every mode
    return TransformerBlock(_config(mode, tp, dropout), get_gpt_layer_local_spec())


def _input() -> torch.Tensor:
    return torch.randn(S, B, H, generator=torch.Generator().manual_seed(2)).requires_grad_()


def _saved_activation_bytes(block: TransformerBlock, hidden: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of distinct non-parameter storages autograd keeps for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = block(hidden, attention_mask=None)
    return sum(storages.values()), out


def test_bytes_kept_for_backward_shrink_none_selective_full():
    model_parallel_manual_seed(0)
    saved = {}
    for mode in RECOMPUTE:
        block = _block(mode).train()
        saved[mode], out = _saved_activation_bytes(block, _input())
        out.sum().backward()  # the graph is complete
    # What the attention core keeps per layer beyond its inputs (CPU fp32 causal training with dropout
    # runs the blocked kernel; s = 16 is one block): the softmax probabilities [b, np, s, s] fp32 and
    # the dropout keep mask, one byte per probability. Its q/k/v copies weigh what the checkpoint
    # keeps instead (the fused QKV output), so they cancel.
    probabilities = B * HEADS * S * S * FP32
    attention_saving = saved["none"] - saved["selective"]
    assert attention_saving == LAYERS * (probabilities + probabilities // FP32), saved
    # Full recompute keeps only the input of each checkpointed chunk ([s, b, h] fp32 each), plus
    # what the final layer norm (outside the layers) keeps: its input, and mean and 1/std [s, b].
    layer_input = S * B * H * FP32
    final_norm = layer_input + 2 * S * B * FP32
    assert saved["full-uniform-1"] == LAYERS * layer_input + final_norm, saved
    assert saved["full-uniform-2"] == layer_input + final_norm, saved
    assert saved["full-uniform-2"] < saved["full-uniform-1"] < saved["selective"] < saved["none"]
    # Block recompute of the first layer: the second layer keeps what it keeps without recompute.
    per_layer = (saved["none"] - final_norm) // LAYERS
    assert saved["full-block-1"] == layer_input + per_layer + final_norm, saved


def _outputs_and_grads(mode: str, tp: int = 1, dropout: float = 0.1, seed: int = 5) -> dict[str, torch.Tensor]:
    block = _block(mode, tp, dropout).train()
    hidden = _input()
    model_parallel_manual_seed(seed)  # the same dropout masks in every mode
    out = block(hidden, attention_mask=None)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    result = {"out": out.detach(), "input.grad": hidden.grad}
    result.update({name: p.grad for name, p in block.named_parameters()})
    return result


@pytest.mark.parametrize("mode", [m for m in RECOMPUTE if m != "none"])
def test_recompute_gives_the_same_outputs_and_grads_with_dropout(mode):
    reference = _outputs_and_grads("none")
    got = _outputs_and_grads(mode)
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    # The dropout masks matter: another seed gives other gradients.
    other = _outputs_and_grads("none", seed=6)
    assert not torch.allclose(other["input.grad"], reference["input.grad"])


def test_selective_recompute_is_off_in_eval_and_under_no_grad():
    block = _block("selective").eval()
    plain = _block("none").eval()
    hidden = _input()
    torch.testing.assert_close(block(hidden, attention_mask=None), plain(hidden, attention_mask=None))
    with torch.no_grad():
        block.train()(hidden.detach(), attention_mask=None)  # no checkpoint without autograd


def _tp2_grads(modes: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    return {mode: _outputs_and_grads(mode, tp=2) for mode in modes}


def test_recompute_at_tp2_matches_no_recompute(tmp_path):
    modes = ["none", "selective", "full-uniform-1"]
    for rank, per_mode in enumerate(run_distributed(_tp2_grads, 2, modes, tmp_dir=tmp_path)):
        for mode in modes[1:]:
            for name, value in per_mode["none"].items():
                torch.testing.assert_close(per_mode[mode][name], value, rtol=0, atol=0, msg=f"{mode} rank {rank} {name}")


@pytest.mark.parametrize("overrides,field", [
    (dict(recompute_granularity="full"), "recompute_method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "recompute_num_layers"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3), "recompute_num_layers"),
    (dict(recompute_granularity="selective", recompute_method="uniform"), "recompute_method"),
    (dict(recompute_granularity="selective", recompute_num_layers=1), "recompute_num_layers"),
    (dict(recompute_num_layers=1), "recompute_num_layers"),
    (dict(recompute_granularity="partial"), "recompute_granularity"),
])
def test_unsupported_recompute_settings_fail_at_construction(overrides, field):
    with pytest.raises(ValueError, match=field):
        TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **overrides)
