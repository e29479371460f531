"""MoE checkpoints reshard across (TP, EP, PP): saved at one layout, loaded at another, bit-exact.

The checkpoint keys experts by their *global* index (``...mlp.experts.local_experts.{g}...``), so a
rank at any expert-parallel size asks for exactly its experts. Weights and AdamW moments are set to
known values before saving (not the initialisation, which the loading model would reproduce by
itself) and compared bit for bit after loading; logits are compared with the single-process model.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.testing import run_distributed
from megatron_core.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_core.training.optimizer import build_adamw
from tests.transformer.moe.moe_harness import (
    SEQ,
    build_moe_gpt,
    local_slice,
    make_batches,
    moe_config,
    param_entries,
)

OVERRIDES = {"moe_token_dispatcher_type": "alltoall", "num_layers": 2}


def _reference(path) -> None:
    torch.manual_seed(0)
    model = build_moe_gpt(moe_config(**OVERRIDES)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():  # "trained" weights, far from any initialisation
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = make_batches(1)[0]
    with torch.no_grad():
        logits = model(batch["tokens"], torch.arange(SEQ).expand_as(batch["tokens"]), None)
    torch.save({"weights": model.state_dict(), "batch": batch, "logits": logits}, path)


def _moments(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weight * 2 + 1, weight.square() + 3


def _build(tp: int, ep: int, pp: int, seed: int):
    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model = build_moe_gpt(moe_config(tp, ep, pipeline_model_parallel_size=pp, **OVERRIDES)).eval()
    return model, build_adamw(model, lr=1e-3)


def _logits_diff(model, ref: dict) -> float:
    if not ps.is_pipeline_last_stage() or ps.get_pipeline_model_parallel_world_size() > 1:
        return 0.0
    batch = ref["batch"]
    with torch.no_grad():
        logits = model(batch["tokens"], torch.arange(SEQ).expand_as(batch["tokens"]), None)
    return (logits - ref["logits"]).abs().max().item()


def _save(tp: int, ep: int, pp: int, ref_path: str, save_dir: str) -> float:
    ref = torch.load(ref_path, weights_only=True)
    model, optimizer = _build(tp, ep, pp, seed=0)
    for p, entry in param_entries(model).values():
        with torch.no_grad():
            p.copy_(local_slice(ref["weights"][entry.key], entry))
        state = optimizer.state[p]
        state["step"] = torch.tensor(5.0)
        state["exp_avg"], state["exp_avg_sq"] = _moments(p.detach().clone())
    save_checkpoint(save_dir, 1, model, optimizer)
    return _logits_diff(model, ref)


def _load(tp: int, ep: int, pp: int, ref_path: str, save_dir: str) -> dict:
    ref = torch.load(ref_path, weights_only=True)
    model, optimizer = _build(tp, ep, pp, seed=123)  # a different initialisation: everything must be loaded
    load_checkpoint(f"{save_dir}/iter_0000001", model, optimizer)
    mismatched = []
    for name, (p, entry) in param_entries(model).items():
        expected = local_slice(ref["weights"][entry.key], entry)
        exp_avg, exp_avg_sq = _moments(expected)
        state = optimizer.state[p]
        if not (torch.equal(p.detach(), expected) and torch.equal(state["exp_avg"], exp_avg)
                and torch.equal(state["exp_avg_sq"], exp_avg_sq)):
            mismatched.append(name)
    experts = sorted({int(e.key.split("local_experts.")[1].split(".")[0])
                      for _, e in param_entries(model).values() if "local_experts." in e.key})
    return {"mismatched": mismatched, "logits": _logits_diff(model, ref), "experts": experts}


def _check_loaded(results: list[dict], loaded: tuple[int, int, int]) -> None:
    n_local = 8 // loaded[1]
    for rank, r in enumerate(results):
        assert r["mismatched"] == [], (loaded, rank, r["mismatched"][:5])
        assert r["logits"] <= 1e-5, (loaded, rank, r)
        ep_rank = (rank // loaded[0]) % loaded[1]  # experts are the EP rank's block of global experts
        assert r["experts"] == list(range(ep_rank * n_local, (ep_rank + 1) * n_local)), (loaded, rank, r)


def _save_at(tmp_path, saved: tuple[int, int, int], ref_path: str) -> str:
    save_dir = str(tmp_path / f"ckpt_tp{saved[0]}_ep{saved[1]}_pp{saved[2]}")
    diffs = run_distributed(_save, saved[0] * saved[1] * saved[2], *saved, ref_path, save_dir, tmp_dir=tmp_path)
    assert max(diffs) <= 1e-5
    return save_dir


@pytest.mark.slow
def test_saved_at_ep4_loads_at_ep1_ep2xpp2_and_tp2xep2(tmp_path):
    ref_path = str(tmp_path / "ref.pt")
    _reference(ref_path)
    save_dir = _save_at(tmp_path, (1, 4, 1), ref_path)
    for loaded in [(1, 1, 1), (1, 2, 2), (2, 2, 1)]:  # (TP, EP, PP)
        world = loaded[0] * loaded[1] * loaded[2]
        _check_loaded(run_distributed(_load, world, *loaded, ref_path, save_dir, tmp_dir=tmp_path), loaded)


@pytest.mark.slow
def test_saved_at_ep1_and_ep2_loads_at_ep4(tmp_path):
    ref_path = str(tmp_path / "ref.pt")
    _reference(ref_path)
    for saved in [(1, 1, 1), (1, 2, 1)]:
        save_dir = _save_at(tmp_path, saved, ref_path)
        _check_loaded(run_distributed(_load, 4, 1, 4, 1, ref_path, save_dir, tmp_dir=tmp_path), (1, 4, 1))
