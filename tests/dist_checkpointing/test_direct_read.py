"""Whole-chunk loads read straight into the destination: same bytes as tensorstore's reads, for
every layout, and used wherever a load needs whole stored chunks."""

from __future__ import annotations

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedTensor, direct_read, loading
from megatron_core.dist_checkpointing.direct_read import contiguous_span


def test_contiguous_span():
    assert contiguous_span((4, 6), ((1, 3), (0, 6))) == (6, 12)  # whole rows
    assert contiguous_span((4, 6), ((2, 3), (1, 4))) == (13, 3)  # part of one row
    assert contiguous_span((4, 6), ((1, 3), (0, 3))) is None  # half rows: strided
    assert contiguous_span((1, 4, 6), ((0, 1), (1, 2), (0, 6))) == (6, 6)
    assert contiguous_span((), ()) == (0, 1)


def _save(tmp_path, full, axis, parts, dtype):
    state = [ShardedTensor.from_rank_offsets("t", c.clone(), (axis, r, parts))
             for r, c in enumerate(full.chunk(parts, axis))]
    dc.save({"t": state}, tmp_path / "ckpt")


def _load(tmp_path, full, axis, parts):
    return [dc.load({"t": ShardedTensor.from_rank_offsets("t", torch.empty_like(c), (axis, r, parts))},
                    tmp_path / "ckpt")["t"] for r, c in enumerate(full.chunk(parts, axis))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("save_axis", "save_parts", "load_axis", "load_parts"),
                         [(0, 2, 0, 2), (1, 2, 1, 2), (0, 2, 0, 1), (1, 2, 1, 1), (1, 4, 0, 1), (0, 1, 1, 2)])
def test_same_bytes_as_tensorstore_for_every_layout(tmp_path, monkeypatch, dtype, save_axis, save_parts, load_axis,
                                                    load_parts):
    full = torch.randn(768, 1536, generator=torch.Generator().manual_seed(0)).to(dtype)  # 4.5 MiB: tiled
    _save(tmp_path, full, save_axis, save_parts, dtype)
    used = []
    real = direct_read.DirectReader.try_read

    def spy(self, key, record, out, item):
        ok = real(self, key, record, out, item)
        used.append(ok)
        return ok

    monkeypatch.setattr(direct_read.DirectReader, "try_read", spy)
    direct = _load(tmp_path, full, load_axis, load_parts)
    monkeypatch.setattr(direct_read.DirectReader, "try_read", lambda *a: False)  # tensorstore only
    reference = _load(tmp_path, full, load_axis, load_parts)
    for got, ref, want in zip(direct, reference, full.chunk(load_parts, load_axis), strict=True):
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
        assert torch.equal(ref.view(torch.uint8), want.contiguous().view(torch.uint8))
    # whole stored chunks are read directly; only partial ones go through tensorstore
    whole_chunks = load_parts <= save_parts if save_axis == load_axis else load_parts == 1
    assert all(used) == whole_chunks and any(used) == whole_chunks, used


def test_same_layout_gpt_load_never_touches_tensorstore(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.randn(s)) for i, s in
             enumerate([(512, 700), (700, 512), (3,), ()])}
    dc.save(state, tmp_path / "ckpt")
    monkeypatch.setattr(loading.TensorReader, "read_into", lambda *a: pytest.fail("tensorstore read"))
    out = dc.load({k: ShardedTensor.from_rank_offsets(k, torch.empty_like(v.data)) for k, v in state.items()},
                  tmp_path / "ckpt")
    assert all(torch.equal(out[k], v.data) for k, v in state.items())
