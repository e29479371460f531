"""A toy pipeline model (a stack of Linear+tanh layers) and its single-process reference.

Small enough that every stage split and schedule can be checked against plain autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megatron_core import parallel_state


@dataclass
class ToyConfig:
    hidden_size: int
    sequence_parallel: bool = False
    bf16: bool = False
    fp16: bool = False
    torch_dtype: torch.dtype = torch.float32


class ToyStage(torch.nn.Module):
    """Layers ``[start, end)`` of the toy stack; reads its input from ``set_input_tensor`` unless first."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int, pre_process: bool,
                 post_process: bool, out_hidden: int | None = None) -> None:
        super().__init__()
        hidden = weights[0][0].shape[0]
        self.config = ToyConfig(hidden)
        self.pre_process, self.post_process = pre_process, post_process
        self.layers = torch.nn.ModuleList()
        for w, b in weights[start:end]:
            layer = torch.nn.Linear(hidden, hidden)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            self.layers.append(layer)
        # A deliberately wrong stage: widen the output so the next stage's shape check fires.
        self.widen = out_hidden
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1) if self.pre_process else self.input_tensor  # [b, s, h] -> [s, b, h]
        assert h is not None
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if self.widen is not None:
            h = torch.cat([h, h[..., : self.widen - h.shape[-1]]], dim=-1)
        return h


def make_weights(num_layers: int, hidden: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(hidden, hidden, generator=g) / hidden**0.5, torch.randn(hidden, generator=g) * 0.1)
            for _ in range(num_layers)]


def make_batches(num: int, micro_batch_size: int, seq: int, hidden: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(micro_batch_size, seq, hidden, generator=g),
             "y": torch.randn(micro_batch_size, seq, hidden, generator=g)} for _ in range(num)]


def _mse(y: torch.Tensor, output: torch.Tensor, non_loss_data: bool = False) -> Any:
    if non_loss_data:
        return output.detach().transpose(0, 1).clone()
    loss = ((output.transpose(0, 1) - y) ** 2).mean()
    return loss, {"loss": loss.detach().clone()}


def toy_forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """Megatron-style forward step: every stage reads the micro-batch; the last one uses the target."""
    batch = next(data_iterator)
    return model(batch["x"]), partial(_mse, batch["y"])


def build_stage(weights: list[tuple[torch.Tensor, torch.Tensor]], **kwargs: Any) -> ToyStage:
    """This rank's stage of an even split of ``weights`` over the pipeline."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    per = len(weights) // pp
    return ToyStage(weights, rank * per, (rank + 1) * per, parallel_state.is_pipeline_first_stage(),
                    parallel_state.is_pipeline_last_stage(), **kwargs)


def stage_grads(stage: ToyStage) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Gradients by GLOBAL layer index."""
    per = len(stage.layers)
    offset = parallel_state.get_pipeline_model_parallel_rank() * per
    return {offset + i: (layer.weight.grad.clone(), layer.bias.grad.clone())  # type: ignore[union-attr]
            for i, layer in enumerate(stage.layers)}


def reference(weights: list[tuple[torch.Tensor, torch.Tensor]], batches: list[dict[str, torch.Tensor]],
              ) -> tuple[list[float], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-micro-batch losses and the gradient of their mean, in one process."""
    full = ToyStage(weights, 0, len(weights), True, True)
    losses = []
    for batch in batches:
        loss, _ = _mse(batch["y"], full(batch["x"]))
        (loss / len(batches)).backward()
        losses.append(loss.item())
    grads = {i: (layer.weight.grad.clone(), layer.bias.grad.clone())  # type: ignore[union-attr]
             for i, layer in enumerate(full.layers)}
    return losses, grads


def reference_outputs(weights: list[tuple[torch.Tensor, torch.Tensor]], batches: list[dict[str, torch.Tensor]],
                      ) -> list[torch.Tensor]:
    """The whole stack's output ``[b, s, h]`` for each micro-batch, in one process."""
    full = ToyStage(weights, 0, len(weights), True, True)
    with torch.no_grad():
        return [full(batch["x"]).transpose(0, 1) for batch in batches]
