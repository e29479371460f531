"""FP8 plumbing of ``extensions.te_fp8`` against the CPU stand-in of TE's API (``fake_te``).

Stand-in TE (CPU). Verifies: the recipe object built from the config for every recipe, TE's support
checks consulted, ``fp8_autocast`` entered with that recipe and the amax reduction group, the
errors (no TE, local spec, CPU tensors, unsupported recipe), and the FP8 ``_extra_state`` round
trip through our sharded checkpoints. Does not verify FP8 numerics, speed or real TE behaviour.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing, parallel_state
from megatron_core.extensions import te_fp8
from megatron_core.extensions.te_usability import TEUnavailableError, is_te_usable
from megatron_core.testing import run_distributed
from tests.extensions._fake_te import fake_te
from tests.extensions._te_models import batch, build, make_config


@pytest.fixture
def te() -> Iterator[ModuleType]:
    with fake_te() as wrappers:
        _fake("pytorch.fp8").ENTERED.clear()
        yield wrappers


def _fake(name: str) -> ModuleType:
    return importlib.import_module(f"transformer_engine.{name}")


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(("recipe", "cls"), [("delayed", "DelayedScaling"), ("tensorwise", "Float8CurrentScaling"),
                                             ("mxfp8", "MXFP8BlockScaling"), ("blockwise", "Float8BlockScaling")])
@pytest.mark.parametrize(("fp8", "fmt"), [("hybrid", "HYBRID"), ("e4m3", "E4M3")])
def test_recipe_object_follows_the_config(te: ModuleType, recipe: str, cls: str, fp8: str, fmt: str) -> None:
    built = te_fp8.build_fp8_recipe(make_config("gpt", fp8=fp8, fp8_recipe=recipe))
    assert type(built).__name__ == cls
    assert built.fp8_format.name == fmt


def test_delayed_recipe_takes_margin_and_amax_history(te: ModuleType) -> None:
    config = make_config("gpt", fp8="hybrid", fp8_margin=2, fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    built = te_fp8.build_fp8_recipe(config)
    assert (built.margin, built.amax_history_len, built.amax_compute_algo) == (2, 16, "max")
    default = te_fp8.build_fp8_recipe(make_config("gpt", fp8="hybrid"))
    # Megatron-Core's defaults reach TE, not TE's own (1024, "max")
    assert (default.margin, default.amax_history_len, default.amax_compute_algo) == (0, 1, "most_recent")


@pytest.mark.parametrize(("recipe", "check"), [("delayed", "is_fp8_available"), ("tensorwise", "is_fp8_available"),
                                               ("mxfp8", "is_mxfp8_available"),
                                               ("blockwise", "is_fp8_block_scaling_available")])
def test_unsupported_recipe_quotes_tes_reason(te: ModuleType, monkeypatch: pytest.MonkeyPatch, recipe: str,
                                              check: str) -> None:
    config = make_config("gpt", fp8="e4m3", fp8_recipe=recipe)
    te_fp8.check_fp8_support(config)  # the stand-in's GPU supports everything by default
    monkeypatch.setitem(_fake("pytorch.fp8").SUPPORT, check, (False, "needs compute capability 10.0"))
    with pytest.raises(RuntimeError, match=rf"fp8_recipe='{recipe}' is not supported.*compute capability 10.0"):
        te_fp8.check_fp8_support(config)


def test_recipe_missing_from_the_installed_te(te: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_fake("common.recipe"), "Float8BlockScaling")
    with pytest.raises(RuntimeError, match="Float8BlockScaling.*Fix"):
        te_fp8.build_fp8_recipe(make_config("gpt", fp8="e4m3", fp8_recipe="blockwise"))


# ----------------------------------------------------------------------------- the context
def test_fp8_context_is_a_no_op_without_fp8(te: ModuleType) -> None:
    with te_fp8.fp8_context(make_config("gpt")):
        pass
    assert _fake("pytorch.fp8").ENTERED == []


def test_fp8_context_enters_fp8_autocast_with_recipe_and_group(te: ModuleType) -> None:
    config = make_config("gpt", fp8="e4m3", fp8_recipe="tensorwise")
    manager = _fake("pytorch.fp8").FP8GlobalStateManager
    with te_fp8.fp8_context(config):
        assert manager.is_fp8_enabled()
    assert not manager.is_fp8_enabled()
    (entry,) = _fake("pytorch.fp8").ENTERED
    assert entry.enabled and type(entry.recipe).__name__ == "Float8CurrentScaling"
    assert entry.group is parallel_state.get_amax_reduction_group()  # None: a single process
    marker = object()
    with te_fp8.fp8_context(config, group=marker):  # type: ignore[arg-type]
        pass
    assert _fake("pytorch.fp8").ENTERED[-1].group is marker


def _amax_ranks_worker() -> list[list[int]]:
    out = []
    for tp, pp in ((2, 1), (1, 2)):
        parallel_state.initialize_model_parallel(tp, pp)
        out.append(dist.get_process_group_ranks(parallel_state.get_amax_reduction_group()))
        parallel_state.destroy_model_parallel()
    return out


def test_amax_reduction_group_is_one_pipeline_stage(tmp_path: Path) -> None:
    """4 ranks: TP2 x DP2 reduce over all four; PP2 x DP2 over the two ranks of each stage (Megatron-Core's group)."""
    ranks = run_distributed(_amax_ranks_worker, 4, tmp_dir=tmp_path)
    assert [r[0] for r in ranks] == [[0, 1, 2, 3]] * 4
    assert [r[1] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]


# ----------------------------------------------------------------------------- model checks
def test_fp8_model_errors(te: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    local = build("gpt", "local", seed=0, fp8="hybrid")
    with pytest.raises(ValueError, match=r"no Transformer Engine layers.*specs.gpt.get_gpt_layer_te_spec"):
        te_fp8.check_fp8_model(local, local.config)
    te_model = build("gpt", "te", seed=0, fp8="hybrid")
    with pytest.raises(ValueError, match=r"parameters on \['cpu'\].*run on \['cuda'\].*move the model to a GPU"):
        te_fp8.check_fp8_model(te_model, te_model.config)
    monkeypatch.setattr(te_fp8, "FP8_DEVICE_TYPES", ("cuda", "cpu"))
    te_fp8.check_fp8_model(te_model, te_model.config)
    te_fp8.check_fp8_model(local, make_config("gpt"))  # no fp8: nothing to check


@pytest.mark.skipif(is_te_usable(), reason="needs a machine without a usable Transformer Engine")
def test_fp8_without_transformer_engine_says_what_is_missing() -> None:
    config = make_config("gpt", fp8="hybrid")
    model = build("gpt", "local", seed=0, fp8="hybrid")
    for call in (lambda: te_fp8.build_fp8_recipe(config), lambda: te_fp8.check_fp8_model(model, config),
                 lambda: te_fp8.fp8_context(config).__enter__()):
        with pytest.raises(TEUnavailableError, match=r"FP8 training \(fp8='hybrid'.*Transformer Engine"):
            call()


# ----------------------------------------------------------------------------- checkpoints
def test_fp8_extra_state_round_trips_through_sharded_checkpoints(te: ModuleType, tmp_path: Path) -> None:
    model = build("gpt", "te", seed=0, fp8="hybrid")
    ids, positions = batch()
    with te_fp8.fp8_context(model.config):
        model(ids, positions, None).sum().backward()
    states = {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}
    # linear_qkv, linear_proj, linear_fc1, linear_fc2 of each of the 2 layers ran in "FP8"; core_attention did not
    assert sum(v.numel() > 0 for v in states.values()) == 8 and len(states) == 10
    sharded = model.sharded_state_dict()
    assert {k for k in sharded if k.endswith("_extra_state")} == set(states)
    dist_checkpointing.save(sharded, str(tmp_path / "ckpt"))

    fresh = build("gpt", "te", seed=1, fp8="hybrid")
    assert all(v.numel() == 0 for k, v in fresh.state_dict().items() if k.endswith("_extra_state"))
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "ckpt")), strict=True)
    restored = fresh.state_dict()
    for key, state in states.items():
        assert torch.equal(restored[key], state), key
    meta = fresh.decoder.layers[1].mlp.linear_fc2.fp8_meta
    assert meta["recipe"] == "DelayedScaling" and meta["forwards"] == 1


def test_without_fp8_checkpoints_hold_no_extra_state(te: ModuleType) -> None:
    model = build("gpt", "te", seed=0)
    assert not [k for k in model.sharded_state_dict() if k.endswith("_extra_state")]
