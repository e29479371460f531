"""Registry dispatch and the errors of from_hf / to_hf that do not depend on a family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_core.interop import (
    FAMILY_MODULES,
    HFInteropError,
    from_hf,
    get_family,
    state_dict_from_hf,
    to_hf,
)

transformers = pytest.importorskip("transformers")


def _config(**overrides):
    fields = dict(n_embd=32, n_head=2, n_layer=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**fields, **overrides})


def test_registry_lists_gpt2_and_llama():
    assert {"gpt2", "llama"} <= set(FAMILY_MODULES)
    assert get_family("gpt2").hf_model_classes == ("GPT2LMHeadModel",)
    assert get_family("llama").hf_model_classes == ("LlamaForCausalLM",)


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(HFInteropError, match=r"model_type='not_a_family'.*known: \[.*'gpt2'.*'llama'"):
        get_family("not_a_family")


def test_from_hf_wants_the_causal_lm_class():
    base = transformers.GPT2Model(_config(n_layer=1))
    with pytest.raises(HFInteropError, match="GPT2LMHeadModel.*got GPT2Model"):
        from_hf(base)


def test_missing_and_unexpected_keys_are_named():
    hf = transformers.GPT2LMHeadModel(_config())
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(HFInteropError, match=r"missing key 'transformer.h.1.mlp.c_fc.bias'"):
        state_dict_from_hf(sd, hf.config)
    sd = dict(hf.state_dict())
    sd["transformer.h.2.ln_1.weight"] = torch.ones(32)
    with pytest.raises(HFInteropError, match=r"unexpected key.*transformer.h.2.ln_1.weight"):
        state_dict_from_hf(sd, hf.config)


def test_state_dict_from_hf_without_models():
    config = _config(n_positions=16)
    hf = transformers.GPT2LMHeadModel(config)
    blueprint, sd = state_dict_from_hf(hf.state_dict(), config)
    assert blueprint.family == "gpt2"
    assert sd["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (96, 32)
    assert sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (128, 32)
    assert "output_layer.weight" not in sd  # tied: the word embedding is the output layer


def test_to_hf_refuses_unknown_models_and_unrepresentable_ones():
    with pytest.raises(HFInteropError, match="cannot infer the Hugging Face family"):
        to_hf(torch.nn.Linear(2, 2))
    from megatron_core.config import TransformerConfig
    from megatron_core.models.gpt import GPTModel
    from specs.gpt import get_gpt_layer_local_spec

    # rope + LayerNorm + gelu: neither GPT-2 (learned positions) nor Llama (RMSNorm, swiglu).
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=50, max_sequence_length=8,
                     position_embedding_type="rope")
    with pytest.raises(HFInteropError, match="cannot infer"):
        to_hf(model)
    with pytest.raises(HFInteropError, match=r"to_hf\(llama\): Llama cannot represent:.*LayerNorm"):
        to_hf(model, model_type="llama")


def test_from_hf_refuses_tensor_parallel_overrides():
    hf = transformers.GPT2LMHeadModel(_config(n_layer=1))
    with pytest.raises(HFInteropError, match="TP=1"):
        from_hf(hf, config_overrides={"tensor_model_parallel_size": 2})


def test_dtype_follows_the_hf_model():
    hf = transformers.GPT2LMHeadModel(_config(n_layer=1))
    ours = from_hf(hf.to(torch.bfloat16))
    assert ours.config.params_dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    back = to_hf(ours)
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_config_overrides_and_hf_config_template_survive():
    config = _config(n_layer=1, bos_token_id=3, eos_token_id=4)
    ours = from_hf(transformers.GPT2LMHeadModel(config), config_overrides={"hidden_dropout": 0.0})
    assert ours.config.hidden_dropout == 0.0
    back = to_hf(ours)
    assert (back.config.bos_token_id, back.config.eos_token_id) == (3, 4)


def test_fake_config_dispatch():
    with pytest.raises(HFInteropError, match="no Hugging Face converter"):
        state_dict_from_hf({}, SimpleNamespace(model_type="xlnet_fake"))


def _convert_at_tp2() -> list[str]:
    from megatron_core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    hf = transformers.GPT2LMHeadModel(_config(n_layer=1))
    errors = []
    for convert in (from_hf, to_hf):
        try:
            convert(hf)
        except HFInteropError as err:
            errors.append(str(err))
    return errors


def test_conversion_refuses_a_tensor_parallel_world(tmp_path):
    from megatron_core.testing import run_distributed

    for errors in run_distributed(_convert_at_tp2, 2, tmp_dir=tmp_path, timeout=120):
        assert len(errors) == 2
        assert all("tensor-parallel world size is 2" in e and "Fix:" in e for e in errors)
