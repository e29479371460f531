"""LayerNorm / RMSNorm against torch's, zero-centred gamma, and WrappedNorm's choice by config."""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.testing import run_distributed
from megatron_core.transformer.norms import LayerNorm, RMSNorm, WrappedNorm, build_norm


def _config(**overrides) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, **overrides)


def test_layernorm_and_rmsnorm_match_torch():
    x = torch.randn(5, 3, 16)
    ours_ln, torch_ln = LayerNorm(_config(), 16, eps=1e-6), torch.nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        for p in (ours_ln.weight, ours_ln.bias, torch_ln.weight, torch_ln.bias):
            p.copy_(torch.linspace(-1, 2, 16))
    torch.testing.assert_close(ours_ln(x), torch_ln(x))
    ours_rms, torch_rms = RMSNorm(_config(), 16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours_rms.weight.copy_(torch.linspace(-1, 2, 16))
        torch_rms.weight.copy_(torch.linspace(-1, 2, 16))
    torch.testing.assert_close(ours_rms(x), torch_rms(x))
    assert set(dict(ours_ln.named_parameters())) == {"weight", "bias"}
    assert set(dict(ours_rms.named_parameters())) == {"weight"}


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_zero_centered_gamma_stores_gamma_minus_one(cls):
    x = torch.randn(4, 16)
    plain, centred = cls(_config(), 16), cls(_config(layernorm_zero_centered_gamma=True), 16)
    assert torch.all(centred.weight == 0)
    torch.testing.assert_close(centred(x), plain(x))


def test_wrapped_norm_follows_config_and_tags_sequence_parallel():
    assert isinstance(WrappedNorm(_config(), 16), LayerNorm)
    rms = WrappedNorm(_config(normalization="RMSNorm"), 16, eps=1e-3)
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-3
    assert not any(p.sequence_parallel for p in build_norm(_config(), 16).parameters())


def _sequence_parallel_tags() -> list[bool]:
    ps.initialize_model_parallel(2)  # a sequence-parallel config needs the TP=2 world it describes
    sp = build_norm(_config(tensor_model_parallel_size=2, sequence_parallel=True), 16)
    return [p.sequence_parallel for p in sp.parameters()]


def test_sequence_parallel_norm_params_are_tagged(tmp_path):
    assert run_distributed(_sequence_parallel_tags, 2, tmp_dir=tmp_path) == [[True, True], [True, True]]
