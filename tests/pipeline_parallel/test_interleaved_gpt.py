"""A GPT trained with interleaved 1F1B (PP=2 and PP=4, VPP=2) and the distributed optimizer equals one
process; its checkpoint, keyed by global layer index, loads into an unpipelined model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_core import dist_checkpointing
from megatron_core import parallel_state as ps
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.testing import run_distributed
from tests.models.gpt_harness import (
    LR,
    SEQ,
    build_gpt,
    full_weights,
    gpt_forward_step,
    load_full,
    make_config,
    make_steps,
    micro_batches,
    setup,
    train_steps,
)

STEPS = make_steps(4, seed=3)


def _vpp(path: str, p: int, m: int, layers: int, full: dict[str, torch.Tensor]) -> dict[str, Any]:
    ps.initialize_model_parallel(1, p, virtual_pipeline_model_parallel_size=2)
    chunks = []
    for c in range(2):
        ps.set_virtual_pipeline_model_parallel_rank(c)
        chunk = build_gpt(make_config(1, p, num_layers=layers))
        load_full(chunk, full)
        chunks.append(DistributedDataParallel(chunk, bucket_size=5000, ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_grad_reduce=True)))
    ps.set_virtual_pipeline_model_parallel_rank(0)
    optimizer = DistributedOptimizer(chunks, lr=LR)
    losses = []
    for step in STEPS:
        optimizer.zero_grad()
        batches = micro_batches(step, m)
        dicts = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=[iter(batches) for _ in chunks], model=chunks,
            num_microbatches=m, seq_length=SEQ, micro_batch_size=batches[0]["tokens"].shape[0])
        optimizer.step()
        total = torch.tensor([sum(d["loss"].item() for d in dicts), float(len(dicts))], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        losses.append((total[0] / total[1]).item())
    layers = sorted(chunk.module.decoder.layer_offset for chunk in chunks)
    sharded = {f"chunk{c}.{k}": v for c, chunk in enumerate(chunks)
               for k, v in chunk.module.sharded_state_dict().items()}
    dist_checkpointing.save(sharded, path)
    return {"losses": losses, "layers": layers}


@pytest.mark.parametrize("p, m, layers", [(2, 4, 4), (4, 4, 8)], ids=["pp2-vpp2", "pp4-vpp2"])
def test_interleaved_gpt_matches_one_process_and_checkpoint_loads_unpipelined(tmp_path, p, m, layers):
    path = str(tmp_path / "vpp")
    full = full_weights(seed=0, num_layers=layers)
    per_rank = run_distributed(_vpp, p, path, p, m, layers, full, tmp_dir=tmp_path)
    # chunk c of rank r holds the layers of piece c * p + r (one layer per piece here)
    assert [r["layers"] for r in per_rank] == [[r, p + r] for r in range(p)]
    # The same run in one process (plain AdamW): its losses, and the weights the checkpoint must hold.
    model, optimizer = setup(1, 1, full, num_layers=layers)
    # Same micro-batches: gradients summed in the same order (Adam turns rounding noise on near-zero gradients
    # into visible weight differences: 3e-5 on one element of 4096 at PP=4 against one whole-batch pass).
    ref_losses, _ = train_steps(model, optimizer, STEPS, m)
    for rank in per_rank:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    loaded = build_gpt(make_config(num_layers=layers))
    state = loaded.sharded_state_dict()
    values = dist_checkpointing.load(state, path)
    with torch.no_grad():
        for key, entry in state.items():
            entry.data.copy_(values[key])
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        if isinstance(want, torch.Tensor) and not name.endswith("_extra_state"):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
