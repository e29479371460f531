"""Expert parallelism (and TP x EP) against one process: same weights, outputs, loss and gradients.

Each data-parallel rank ``d`` runs batch ``d``. At EP=1 in one process every batch runs alone; under
EP a rank's non-expert gradients must equal its own batch's, and an expert's gradient (held by one
rank of each expert-parallel group) must equal the sum over that group's batches: those are the
tokens it received. Aux and z losses are on (coefficients 1e-2 / 1e-3), so their gradients are
compared too.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.testing import run_distributed
from megatron_core.transformer.utils import allreduce_tp_partial_grads
from tests.transformer.moe.moe_harness import (
    build_moe_gpt,
    gather_logits,
    is_expert_key,
    local_slice,
    make_batches,
    moe_config,
    param_entries,
    run_step,
)

WORLD = 4


def _reference(overrides: dict) -> dict:
    torch.manual_seed(0)
    overrides = {k: v for k, v in overrides.items() if k != "sequence_parallel"}  # one process: no TP to split over
    model = build_moe_gpt(moe_config(**overrides))
    batches = make_batches(WORLD)
    out: dict = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "batches": batches,
                 "logits": [], "loss": [], "grads": []}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits, loss = run_step(model, batch)
        out["logits"].append(logits)
        out["loss"].append(loss)
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def _ep_rank(tp: int, ep: int, overrides: dict, ref_path: str) -> dict:
    ref = torch.load(ref_path, weights_only=True)
    ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
    torch.manual_seed(0)
    model = build_moe_gpt(moe_config(tp, ep, **overrides))
    entries = param_entries(model)
    weight_diff = max((p.detach() - local_slice(ref["weights"][e.key], e)).abs().max().item()
                      for p, e in entries.values())
    d, k = ps.get_data_parallel_rank(), ps.get_expert_data_parallel_rank()
    logits, loss = run_step(model, ref["batches"][d])
    if overrides.get("sequence_parallel"):
        logits = gather_logits(logits)  # built with parallel_output=True
    allreduce_tp_partial_grads(model)  # sequence parallelism: norms saw this rank's tokens (finalize_model_grads)
    group_batches = [e + ep * k for e in range(ep)]  # the data-parallel ranks of this EP group
    grad_diff, expert_grads = 0.0, 0
    for p, e in entries.values():
        if is_expert_key(e.key):
            expected = sum(ref["grads"][b][e.key] for b in group_batches)
            expert_grads += 1
        else:
            expected = ref["grads"][d][e.key]
        grad_diff = max(grad_diff, (p.grad - local_slice(expected, e)).abs().max().item())
    return {"weights": weight_diff, "logits": (logits - ref["logits"][d]).abs().max().item(),
            "loss": abs(loss.item() - ref["loss"][d].item()), "grads": grad_diff, "expert_params": expert_grads}


def _ep_cases(tp: int, ep: int, cases: list[tuple[dict, str]]) -> list[dict]:
    out = []
    for overrides, ref_path in cases:  # one set of processes for several configurations
        out.append(_ep_rank(tp, ep, overrides, ref_path))
        ps.destroy_model_parallel()
    return out


def _run(tmp_path, tp: int, ep: int, case_overrides: list[dict]) -> list[list[dict]]:
    cases = []
    for i, overrides in enumerate(case_overrides):
        path = tmp_path / f"ref{i}.pt"  # a file: tensors passed as arguments would cost one fd each
        torch.save(_reference(overrides), path)
        cases.append((overrides, str(path)))
    return run_distributed(_ep_cases, WORLD, tp, ep, cases, tmp_dir=tmp_path)


LAYOUTS = [(1, 2), (1, 4), (2, 2)]  # (TP, EP) on 4 ranks: EP=2 has 2 expert-DP replicas
DISPATCHERS = ["alltoall", "allgather"]


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_expert_parallel_matches_single_process(tmp_path, tp, ep):
    results = _run(tmp_path, tp, ep, [{"moe_token_dispatcher_type": d} for d in DISPATCHERS])
    for rank, per_case in enumerate(results):
        for dispatcher, r in zip(DISPATCHERS, per_case, strict=True):
            assert r["weights"] == 0.0, (rank, dispatcher, r)  # EP- and TP-invariant initialisation
            assert r["expert_params"] == 2 * 2 * (8 // ep), (rank, r)  # 2 layers x (fc1, fc2) x local experts
            assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5 and r["grads"] <= 1e-5, (rank, dispatcher, r)


@pytest.mark.slow
def test_expert_parallel_with_capacity_and_grouped_gemm(tmp_path):
    """Dropping is per rank, on its own tokens: EP=4 with a capacity factor still equals one process."""
    cases = [{"moe_token_dispatcher_type": d, "moe_expert_capacity_factor": 0.75, "moe_grouped_gemm": True,
              "moe_token_drop_policy": policy} for d, policy in zip(DISPATCHERS, ["probs", "position"], strict=True)]
    results = _run(tmp_path, 1, 4, cases)
    for rank, per_case in enumerate(results):
        for r in per_case:
            assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5 and r["grads"] <= 1e-5, (rank, r)


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_sequence_parallel_moe_matches_single_process(tmp_path, ep):
    """TP=2 with sequence parallelism (the MoE layer's input is [s/tp, b, h]) at EP=1 and EP=2, both
    dispatchers, shared expert with gate, aux and z losses: logits, loss and every gradient as one process."""
    cases = [{"moe_token_dispatcher_type": d, "sequence_parallel": True} for d in DISPATCHERS]
    # grouped experts wider than h per TP rank (64 > 32): the combine weights scale fc2's output
    cases.append({"moe_token_dispatcher_type": "alltoall", "sequence_parallel": True, "moe_grouped_gemm": True,
                  "moe_ffn_hidden_size": 128})
    # biases: each expert's fc2 bias is counted once in the TP sum of the experts' partial outputs
    cases.append({"moe_token_dispatcher_type": "allgather", "sequence_parallel": True, "add_bias_linear": True})
    results = _run(tmp_path, 2, ep, cases)
    for rank, per_case in enumerate(results):
        for case, r in zip(cases, per_case, strict=True):
            assert r["weights"] == 0.0, (rank, case, r)
            assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5 and r["grads"] <= 1e-5, (rank, case, r)
