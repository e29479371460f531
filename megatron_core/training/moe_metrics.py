"""Mixture-of-experts bookkeeping for the training loop: the aux-loss gradient scale and the metrics.

The routers attach their aux / z losses to the activations (``MoEAuxLossAutoScaler``), so they reach
``backward`` on every pipeline stage without travelling with the loss. The schedule divides each
micro-batch's loss by the number of micro-batches and the data-parallel gradient reduction averages
(scales by 1 / DP), so each attached loss is scaled by ``1 / micro-batches`` (Megatron-Core's
choice): the gradient is that of ``lm_loss + mean over (micro-batches, replicas) of the summed
per-layer aux losses``. The scale is set on the routers of the trained model only, for the step
only (:func:`aux_loss_scale`); a dense model or another model in the process is never touched.

Metrics (one record per log interval, written by rank 0, collectives on every rank):
``moe_aux_loss`` / ``moe_z_loss`` (that mean, summed over layers, as added to the objective) and
``moe_tokens_per_expert`` (per MoE layer by global layer number: the tokens each expert processed
over the step, all data- and context-parallel replicas, after capacity drops), from which load balance reads directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.transformer.moe.moe_layer import MoELayer, moe_layers


@contextmanager
def aux_loss_scale(model: torch.nn.Module, num_micro_batches: int) -> Iterator[None]:
    """Within the block, the routers of ``model`` weight their attached losses by ``1 / num_micro_batches``.

    The previous values are restored on exit (also on an exception). Routers without an
    ``aux_loss_scale`` attribute (a custom router attaching no loss) are left alone.
    """
    routers = [layer.router for layer in moe_layers(model) if hasattr(layer.router, "aux_loss_scale")]
    saved = [router.aux_loss_scale for router in routers]
    for router in routers:
        router.aux_loss_scale = 1.0 / max(num_micro_batches, 1)
    try:
        yield
    finally:
        for router, value in zip(routers, saved, strict=True):
            router.aux_loss_scale = value


def reset_moe_stats(model: torch.nn.Module) -> None:
    """Forget the routers' accumulated statistics (call at the start of a step)."""
    for layer in moe_layers(model):
        layer.router.stats.reset()


def _layer_number(layer: MoELayer, index: int) -> int:
    return int(layer.layer_number) if layer.layer_number is not None else index + 1


def moe_metrics(model: torch.nn.Module) -> dict[str, Any]:
    """The step's MoE metrics over all replicas and pipeline stages (a collective: call on every rank).

    Returns an empty dict for a model without MoE layers.
    """
    layers = moe_layers(model)
    has_moe = torch.tensor([len(layers)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(has_moe)
    if has_moe.item() == 0:
        return {}
    per_layer: dict[int, list[int]] = {}
    losses = torch.zeros(2, dtype=torch.float64)  # aux, z: mean over micro-batches, summed over layers
    for i, layer in enumerate(layers):
        stats = layer.router.stats
        counts = stats.tokens_per_expert.clone()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if parallel_state.group_world_size(dp_group) > 1:
            dist.all_reduce(counts, group=dp_group)
        per_layer[_layer_number(layer, i)] = [int(c) for c in counts.tolist()]
        if stats.calls:
            losses += torch.tensor([stats.aux_loss, stats.z_loss], dtype=torch.float64) / stats.calls
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if parallel_state.group_world_size(dp_group) > 1:
        dist.all_reduce(losses, group=dp_group)
        losses /= parallel_state.group_world_size(dp_group)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.group_world_size(pp_group) > 1:  # each stage holds its own layers
        gathered: list[Any] = [None] * parallel_state.group_world_size(pp_group)
        dist.all_gather_object(gathered, (per_layer, losses.tolist()), group=pp_group)
        per_layer, total = {}, [0.0, 0.0]
        for stage_layers, stage_losses in gathered:
            per_layer.update(stage_layers)
            total = [a + b for a, b in zip(total, stage_losses, strict=True)]
        losses = torch.tensor(total, dtype=torch.float64)
    return {"moe_aux_loss": float(losses[0]), "moe_z_loss": float(losses[1]),
            "moe_tokens_per_expert": {str(k): v for k, v in sorted(per_layer.items())}}
