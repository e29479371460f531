"""slice_plan: a rank's part of a fused/reshaped tensor, read box by box, equals that part of the whole transform."""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import layouts
from megatron_core.interop.slice_plan import gather, plan

H = 8


def _cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "qkv_gqa_weight": (layouts.qkv_transforms(4, 2, 2), [r(8, H), r(4, H), r(4, H)]),
        "qkv_gqa_bias": (layouts.qkv_transforms(4, 2, 2), [r(8), r(4), r(4)]),
        "gated_fc1": (layouts.GATED_FC1, [r(6, H), r(6, H)]),
        "conv1d_transpose": (layouts.TRANSPOSE, [r(H, 12)]),
        "gpt2_c_attn": (layouts.chain(layouts.TRANSPOSE, layouts.split_rows_transforms(3),
                                      layouts.qkv_transforms(4, 4, 2)), [r(H, 3 * H)]),
        "t5_kv": (layouts.kv_transforms(4, 2), [r(8, H), r(8, H)]),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_each_half_reads_half_and_matches_the_whole_transform(case):
    pair, sources = _cases()[case]
    want = pair[0](sources)[0]
    maps = plan(pair[0], [s.shape for s in sources])
    assert maps is not None
    reads: list[int] = []

    def read(i: int, box: tuple[slice, ...]) -> torch.Tensor:
        reads.append(sources[i][box].numel())
        return sources[i][box]

    assert torch.equal(gather(maps, [torch.arange(n) for n in want.shape], read), want)
    for dim in range(want.dim()):
        half = want.shape[dim] // 2
        for part in range(2):
            local = [torch.arange(n) for n in want.shape]
            local[dim] = torch.arange(part * half, (part + 1) * half)
            reads.clear()
            got = gather(maps, local, read)
            assert torch.equal(got, want.index_select(dim, local[dim])), (case, dim, part)
            assert sum(reads) == want.numel() // 2, (case, dim, part, reads)  # nothing read twice or in excess


def test_unplannable_transforms_give_none():
    stacked = layouts.unstack_transforms()[0]  # one stacked tensor -> one output per expert
    assert plan(stacked, [torch.Size([3, 4, 5])], 1) is None
    assert plan(lambda t: [t[0] * 2], [torch.Size([4, 4])]) is None  # not marked as reindexing
