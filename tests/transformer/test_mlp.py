"""MLP activations and gating against plain maths; the gated fc1's checkpoint layout at TP 1 and 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_core import parallel_state as ps
from megatron_core.activations import squared_relu
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.mlp import MLP, MLPSubmodules, apply_swiglu_sharded_factory
from megatron_core.transformer.spec_utils import ModuleSpec, SpecError, check_spec

H, FFN = 16, 24


def _config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN, init_method_std=0.2)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _mlp(cfg: TransformerConfig) -> MLP:
    return MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


@pytest.mark.parametrize("name,fn", [("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu),
                                     ("squared_relu", squared_relu)])
def test_plain_activations(name, fn):
    mlp = _mlp(_config(activation_func=name))
    x = torch.randn(5, 2, H)
    out, bias = mlp(x)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    expected = F.linear(fn(F.linear(x, fc1.weight, fc1.bias)), fc2.weight)
    torch.testing.assert_close(out, expected)
    assert bias is fc2.bias


@pytest.mark.parametrize("name,fn", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_activations_use_gate_then_up(name, fn):
    mlp = _mlp(_config(activation_func=name, add_bias_linear=False))
    assert mlp.linear_fc1.weight.shape == (2 * FFN, H)
    x = torch.randn(5, 2, H)
    gate, up = mlp.linear_fc1.weight[:FFN], mlp.linear_fc1.weight[FFN:]
    expected = F.linear(fn(x @ gate.T) * (x @ up.T), mlp.linear_fc2.weight)
    out, bias = mlp(x)
    assert bias is None
    torch.testing.assert_close(out, expected)


def test_activation_module_slot_replaces_the_config_function():
    class DoubledSwiGLU(torch.nn.Module):
        def __init__(self, *, config):
            super().__init__()

        def forward(self, x):
            gate, up = x.chunk(2, dim=-1)
            return 2 * F.silu(gate) * up

    cfg = _config(activation_func="swiglu", add_bias_linear=False)
    torch.manual_seed(0)
    plain = _mlp(cfg)
    torch.manual_seed(0)
    custom = MLP(cfg, MLPSubmodules(ColumnParallelLinear, RowParallelLinear, activation_func=DoubledSwiGLU))
    x = torch.randn(3, 1, H)
    torch.testing.assert_close(custom(x)[0], 2 * plain(x)[0])


def test_protocol_check_names_the_slot():
    class Fc1NoStride(torch.nn.Module):
        def __init__(self, input_size, output_size, /, *, config, init_method, gather_output, bias,
                     skip_bias_add, is_expert, tp_comm_buffer_name):  # no tp_group / stride
            super().__init__()

    spec = ModuleSpec(MLP, submodules=MLPSubmodules(linear_fc1=Fc1NoStride, linear_fc2=RowParallelLinear))
    with pytest.raises(SpecError, match=r"'mlp\.linear_fc1'.*Fc1NoStride"):
        check_spec(spec, "mlp")


def _fc1_layout_worker(tp: int) -> tuple[list[tuple], torch.Tensor, torch.Tensor]:
    """Each rank's swiglu fc1 shards: (global_offset, local_shape, global_shape, fragments) + data."""
    ps.initialize_model_parallel(tp)
    model_parallel_manual_seed(5)
    mlp = _mlp(_config(activation_func="swiglu", tensor_model_parallel_size=tp))
    factory = mlp.sharded_state_dict(prefix="mlp.")["mlp.linear_fc1.weight"]
    assert isinstance(factory, ShardedTensorFactory)
    shards = factory.build()
    assert all(isinstance(s, ShardedTensor) and s.key == "mlp.linear_fc1.weight" for s in shards)
    merged = factory.merge_fn([s.data for s in shards])
    torch.testing.assert_close(merged, mlp.linear_fc1.weight.detach())
    bias_factory = mlp.sharded_state_dict()["linear_fc1.bias"]
    assert isinstance(bias_factory, ShardedTensorFactory) and len(bias_factory.build()) == 2
    meta = [(s.global_offset, s.local_shape, s.global_shape, s.axis_fragmentations) for s in shards]
    return meta, shards[0].data.clone(), shards[1].data.clone()


def test_swiglu_checkpoint_layout_is_gate_then_up_globally(tmp_path):
    (meta1, gate1, up1), = run_distributed(_fc1_layout_worker, 1, 1, tmp_dir=tmp_path)
    assert meta1 == [((0, 0), (FFN, H), (2 * FFN, H), (2, 1)), ((FFN, 0), (FFN, H), (2 * FFN, H), (2, 1))]
    full = torch.cat([gate1, up1])  # the TP=1 fc1 weight: [gate; up]
    ranks = run_distributed(_fc1_layout_worker, 2, 2, tmp_dir=tmp_path)
    half = FFN // 2
    for r, (meta, gate, up) in enumerate(ranks):
        assert meta == [((r * half, 0), (half, H), (2 * FFN, H), (4, 1)),
                        ((FFN + r * half, 0), (half, H), (2 * FFN, H), (4, 1))]
        # The same seed at TP=2 stores exactly the TP=1 rows at those offsets.
        torch.testing.assert_close(gate, full[r * half:(r + 1) * half], rtol=0, atol=0)
        torch.testing.assert_close(up, full[FFN + r * half:FFN + (r + 1) * half], rtol=0, atol=0)


def test_swiglu_factory_with_prepended_axis():
    data = torch.arange(8.0).view(4, 2)
    base = ShardedTensor.from_rank_offsets("w", data, (0, 1, 3), (1, 1, 2), prepend_axis_num=1)
    shards = apply_swiglu_sharded_factory(base, ((0, 1, 3),)).build()
    assert [s.global_offset for s in shards] == [(1, 2, 0), (1, 6, 0)]
    assert all(s.global_shape == (3, 8, 2) for s in shards)
