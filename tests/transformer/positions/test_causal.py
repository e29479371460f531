"""The one causal-mask helper: both alignments against torch's own definitions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_core.transformer.positions import causal_mask

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("sq,sk", [(4, 4), (2, 5), (5, 3)])
def test_top_left_is_torchs_is_causal(sq, sk):
    q, k, v = torch.randn(1, 1, sq, 8), torch.randn(1, 1, sk, 8), torch.randn(1, 1, sk, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # torch: top-left aligned
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=~causal_mask(sq, sk, alignment="top_left"))
    torch.testing.assert_close(got, expected)
    if sq == sk:
        square = torch.nn.Transformer.generate_square_subsequent_mask(sq) < 0  # -inf above the diagonal
        assert torch.equal(causal_mask(sq, sk, alignment="top_left"), square)


@pytest.mark.parametrize("sq,sk", [(4, 4), (2, 5), (1, 6)])
def test_bottom_right_puts_the_queries_last(sq, sk):
    # Query i is the token at position sk - sq + i of the keys: it sees keys 0 .. sk - sq + i.
    full = torch.ones(sk, sk, dtype=torch.bool).triu(diagonal=1)  # the square mask of all sk tokens
    assert torch.equal(causal_mask(sq, sk), full[sk - sq:])
    assert torch.equal(causal_mask(sq, sk, alignment="bottom_right"), causal_mask(sq, sk))


def test_alignments_agree_on_square_masks_and_reject_others():
    assert torch.equal(causal_mask(6, 6), causal_mask(6, 6, alignment="top_left"))
    assert not torch.equal(causal_mask(2, 5), causal_mask(2, 5, alignment="top_left"))
    with pytest.raises(ValueError, match="alignment='diagonal'"):
        causal_mask(2, 2, alignment="diagonal")  # type: ignore[arg-type]


def _defined_functions(name: str) -> list[str]:
    found = []
    for path in sorted((ROOT / "megatron_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found.append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("name,home", [
    ("relative_position_bucket", "megatron_core/transformer/positions/relative.py"),
    ("causal_mask", "megatron_core/transformer/positions/causal.py"),
    ("apply_rotary_pos_emb", "megatron_core/transformer/positions/rotary.py"),
    ("sinusoidal_table", "megatron_core/transformer/positions/sinusoidal.py"),
])
def test_each_position_helper_is_defined_once(name, home):
    assert _defined_functions(name) == [home]
