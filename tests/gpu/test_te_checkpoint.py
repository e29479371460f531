"""A checkpoint saved from the TE spec (GPU) loads into the local spec on CPU at TP=1 and TP=2, bit-exact,
and checkpoints saved by the local spec at TP=1 and TP=2 load into the TE spec, under strict loading.

Chain of hops (each into a freshly built model with an unrelated seed)::

    local TP1 CPU (random weights) -A-> TE TP1 GPU (check) -B-> local TP1 CPU (check)
                                                            -B-> local TP2 CPU (gloo) -C-> TE TP1 GPU (check)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_core import dist_checkpointing, parallel_state
from megatron_core.extensions.te_key_map import te_to_local_state_dict
from megatron_core.testing import run_distributed
from tests.extensions._te_models import FAMILIES, build, randomize_

pytestmark = pytest.mark.cuda


def _load(family: str, backend: str, tp: int, src: str, device: str) -> torch.nn.Module:
    model = build(family, backend, seed=2000 + tp, tp=tp, device=device)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), src), strict=True)
    return model


def _local_tp2_hop(family: str, src: str, dst: str) -> None:
    parallel_state.initialize_model_parallel(2, 1)
    model = _load(family, "local", 2, src, "cpu")
    dist_checkpointing.save(model.sharded_state_dict(), dst)


def _cpu_state(model: torch.nn.Module, te: bool) -> dict[str, torch.Tensor]:
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return te_to_local_state_dict(state) if te else state


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("family", FAMILIES)
def test_te_and_local_checkpoints_are_interchangeable(family: str, tmp_path: Path) -> None:
    ckpt = {name: str(tmp_path / name) for name in "ABC"}
    source = build(family, "local", seed=0)
    randomize_(source, seed=321)
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    dist_checkpointing.save(source.sharded_state_dict(), ckpt["A"])

    te_model = _load(family, "te", 1, ckpt["A"], "cuda")  # local TP1 -> TE
    _assert_same(_cpu_state(te_model, te=True), expected)
    dist_checkpointing.save(te_model.sharded_state_dict(), ckpt["B"])

    _assert_same(_cpu_state(_load(family, "local", 1, ckpt["B"], "cpu"), te=False), expected)  # TE -> local TP1
    run_distributed(_local_tp2_hop, 2, family, ckpt["B"], ckpt["C"], tmp_dir=tmp_path)  # TE -> local TP2
    _assert_same(_cpu_state(_load(family, "te", 1, ckpt["C"], "cuda"), te=True), expected)  # local TP2 -> TE
