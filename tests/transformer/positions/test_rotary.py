"""Rotary embeddings against complex-number rotation: full/partial, interleaved or not, offsets."""

from __future__ import annotations

import pytest
import torch

from megatron_core.transformer.positions import RotaryEmbedding, apply_rotary_pos_emb


def _complex_reference(t: torch.Tensor, positions: torch.Tensor, rot_dim: int, base: float, interleaved: bool):
    """Rotate channel pairs as complex numbers z * exp(i * pos * base^(-2j/rot_dim))."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = positions.double()[:, None] * inv_freq  # [s, rot/2]
    rot = t[..., :rot_dim].double()
    if interleaved:
        real, imag = rot[..., 0::2], rot[..., 1::2]
    else:
        real, imag = rot[..., : rot_dim // 2], rot[..., rot_dim // 2:]
    z = torch.complex(real, imag) * torch.polar(torch.ones_like(angles), angles)[:, None, None, :]
    if interleaved:
        out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((out.float(), t[..., rot_dim:]), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rotary_matches_complex_rotation(interleaved, percent):
    hn, s = 16, 11
    rope = RotaryEmbedding(hn, rotary_percent=percent, rotary_interleaved=interleaved, rotary_base=500)
    freqs = rope(s)
    assert freqs.shape == (s, 1, 1, int(hn * percent))
    t = torch.randn(s, 2, 3, hn)
    got = apply_rotary_pos_emb(t, freqs, rotary_interleaved=interleaved)
    expected = _complex_reference(t, torch.arange(s), int(hn * percent), 500, interleaved)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_offset_positions_and_interpolation():
    rope = RotaryEmbedding(8)
    torch.testing.assert_close(rope(3, offset=5), rope(8)[5:])
    torch.testing.assert_close(RotaryEmbedding(8, seq_len_interpolation_factor=2.0)(4)[2], rope(2)[1])
    assert "inv_freq" not in rope.state_dict()


def test_rotary_preserves_norms_and_rejects_mismatch():
    rope = RotaryEmbedding(8)
    t = torch.randn(5, 1, 2, 8)
    out = apply_rotary_pos_emb(t, rope(5))
    torch.testing.assert_close(out.norm(dim=-1), t.norm(dim=-1))
    with pytest.raises(ValueError, match="slice the angles"):
        apply_rotary_pos_emb(t, rope(4))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(8, rotary_percent=0.25 / 2)
