"""Checkpoints move between the TE and the local spec at TP=1 and TP=2, bit-exact, under strict loading.

TE runs as the CPU reference of its API (see ``fake_te``). One chain of hops, each loading the
previous checkpoint into a freshly built model (other seed) and saving it again::

    local TP1 (random weights) -> TE TP2 -> local TP1 (check)
    local TP1 -> TE TP1 (check) -> local TP2 -> TE TP2 -> local TP1 (check)

Any hop that misplaced a slice would change the final weights, so equality at the checks proves
every direction: TE save at TP1/TP2 -> local load at TP1/TP2, and local save at TP1/TP2 -> TE load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_core import dist_checkpointing, parallel_state
from megatron_core.extensions.te_key_map import te_to_local_state_dict
from megatron_core.testing import run_distributed
from tests.extensions._fake_te import enable_fake_te, fake_te
from tests.extensions._te_models import FAMILIES, build, randomize_


def _load_then_save(family: str, backend: str, tp: int, src: str, dst: str | None) -> dict[str, torch.Tensor]:
    """Build ``backend`` at ``tp`` (seed unrelated to the checkpoint), load ``src``, save to ``dst``."""
    model = build(family, backend, seed=1000 + tp, tp=tp)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), src)  # strict: every key, both ways
    model.load_state_dict(loaded, strict=True)
    if dst is not None:
        dist_checkpointing.save(model.sharded_state_dict(), dst)
    return te_to_local_state_dict(model.state_dict()) if backend == "te" else model.state_dict()


def _hop_worker(family: str, backend: str, src: str, dst: str) -> None:
    if backend == "te":
        enable_fake_te()
    parallel_state.initialize_model_parallel(2, 1)
    _load_then_save(family, backend, 2, src, dst)


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_move_between_te_and_local_at_tp1_and_tp2(family: str, tmp_path: Path) -> None:
    """Stand-in TE (CPU). Verifies checkpoint keys/layouts move between TE and local specs at TP 1 and 2, bit-
    exact. Does not verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths,
    FP8).
    """
    ckpt = {name: str(tmp_path / name) for name in "ABCDE"}
    source = build(family, "local", seed=0)
    randomize_(source, seed=123)  # norms and biases too, so nothing passes by its initial value
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    dist_checkpointing.save(source.sharded_state_dict(), ckpt["A"])

    run_distributed(_hop_worker, 2, family, "te", ckpt["A"], ckpt["B"], tmp_dir=tmp_path)  # local TP1 -> TE TP2
    _assert_same(_load_then_save(family, "local", 1, ckpt["B"], None), expected)  # TE TP2 -> local TP1

    with fake_te():
        _assert_same(_load_then_save(family, "te", 1, ckpt["A"], ckpt["C"]), expected)  # local TP1 -> TE TP1
    run_distributed(_hop_worker, 2, family, "local", ckpt["C"], ckpt["D"], tmp_dir=tmp_path)  # TE TP1 -> local TP2
    run_distributed(_hop_worker, 2, family, "te", ckpt["D"], ckpt["E"], tmp_dir=tmp_path)  # local TP2 -> TE TP2
    _assert_same(_load_then_save(family, "local", 1, ckpt["E"], None), expected)  # TE TP2 -> local TP1
