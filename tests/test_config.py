"""TransformerConfig: derived values, validation messages that name the field, JSON/YAML round trip."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from megatron_core.config import TransformerConfig

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=8)


def make(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**BASE, **overrides})


def test_derived_sizes():
    cfg = make()
    assert cfg.ffn_hidden_size == 256
    assert cfg.kv_channels == 8
    assert cfg.num_query_groups == 8
    assert cfg.query_projection_size == 64


def test_explicit_values_are_kept():
    cfg = make(ffn_hidden_size=100, kv_channels=16, num_query_groups=2)
    assert (cfg.ffn_hidden_size, cfg.kv_channels, cfg.num_query_groups) == (100, 16, 2)


def test_kv_channels_allows_hidden_not_divisible_by_heads():
    cfg = make(hidden_size=60, kv_channels=10)
    assert cfg.query_projection_size == 80


def test_gated_activation_name_sets_glu():
    cfg = make(activation_func="swiglu")
    assert cfg.gated_linear_unit is True
    assert cfg.activation is torch.nn.functional.silu


def test_activation_callable_is_stored_by_name():
    cfg = make(activation_func=torch.nn.functional.relu)
    assert cfg.activation_func == "relu"


def test_params_dtype_accepts_torch_dtype():
    assert make(params_dtype=torch.bfloat16).torch_dtype == torch.bfloat16


def test_output_layer_init_is_scaled():
    cfg = make(num_layers=8, init_method_std=0.02)
    torch.manual_seed(0)
    w = cfg.output_layer_init_method(torch.empty(512, 512))
    assert abs(w.std().item() - 0.02 / 4.0) < 2e-4


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_round_trip(fmt):
    cfg = make(activation_func="swiglu", normalization="RMSNorm", num_query_groups=2, params_dtype="bfloat16",
               tensor_model_parallel_size=2, sequence_parallel=True)
    text = cfg.to_json() if fmt == "json" else cfg.to_yaml()
    back = TransformerConfig.from_json(text) if fmt == "json" else TransformerConfig.from_yaml(text)
    assert back == cfg


def test_yaml_from_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(make().to_yaml())
    assert TransformerConfig.from_yaml(path) == make()


INVALID = [
    # (overrides, field that must be named, a phrase of the message)
    (dict(num_layers=0), "num_layers", "positive"),
    (dict(num_layers=-3), "num_layers", "positive"),
    (dict(hidden_size=0), "hidden_size", "positive"),
    (dict(num_attention_heads=0), "num_attention_heads", "positive"),
    (dict(num_query_groups=0), "num_query_groups", "positive"),
    (dict(ffn_hidden_size=0), "ffn_hidden_size", "positive"),
    (dict(kv_channels=-1), "kv_channels", "positive"),
    (dict(hidden_size=60), "hidden_size", "kv_channels"),
    (dict(num_query_groups=3), "num_query_groups", "divide"),
    (dict(tensor_model_parallel_size=3), "num_attention_heads", "tensor_model_parallel_size"),
    (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size", "positive"),
    (dict(num_query_groups=2, tensor_model_parallel_size=4), "num_query_groups", "whole query groups"),
    (dict(ffn_hidden_size=66, tensor_model_parallel_size=4), "ffn_hidden_size", "multiple"),
    (dict(hidden_dropout=1.0), "hidden_dropout", "[0, 1)"),
    (dict(hidden_dropout=-0.1), "hidden_dropout", "[0, 1)"),
    (dict(attention_dropout=1.5), "attention_dropout", "[0, 1)"),
    (dict(activation_func="gelux"), "activation_func", "unknown activation"),
    (dict(activation_func=lambda x: x), "activation_func", "registered"),
    (dict(bf16=True, fp16=True), "bf16", "fp16"),
    (dict(sequence_parallel=True), "sequence_parallel", "tensor_model_parallel_size > 1"),
    (dict(normalization="BatchNorm"), "normalization", "LayerNorm"),
    (dict(params_dtype="float64"), "params_dtype", "float32"),
    (dict(layernorm_epsilon=0.0), "layernorm_epsilon", "> 0"),
    (dict(init_method_std=0.0), "init_method_std", "> 0"),
    (dict(softmax_scale=-1.0), "softmax_scale", "> 0"),
    (dict(pipeline_model_parallel_size=0), "pipeline_model_parallel_size", "positive"),
    (dict(num_layers=3, pipeline_model_parallel_size=2), "num_layers", "evenly"),
    (dict(num_layers_in_first_pipeline_stage=1), "num_layers_in_first_pipeline_stage", "pipeline_model_parallel_size"),
    (dict(num_layers=4, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=5),
     "num_layers_in_first_pipeline_stage", "add up"),
    (dict(recompute_method="uniform"), "recompute_method", "recompute_granularity"),
    (dict(recompute_granularity="everything"), "recompute_granularity", "full"),
    (dict(hidden_sizes=64), "hidden_sizes", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("overrides,field,phrase", INVALID, ids=[f"{i}-{f}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_config_names_field(overrides, field, phrase):
    with pytest.raises(ValidationError) as info:
        make(**overrides)
    message = str(info.value)
    assert field in message
    assert phrase in message


def test_pipeline_overrides_that_add_up_are_accepted():
    cfg = make(num_layers=5, pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=1,
               num_layers_in_last_pipeline_stage=2)
    assert cfg.num_layers_in_first_pipeline_stage == 1
