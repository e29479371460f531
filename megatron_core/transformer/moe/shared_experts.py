"""The shared expert: a dense MLP every token goes through, next to the routed experts.

With ``moe_shared_expert_gate`` (Qwen2-MoE's ``shared_expert_gate``) its output is scaled per token
by ``sigmoid(x @ gate_weight.T)``; ``gate_weight`` is ``[1, h]``, no bias, replicated over TP (with
sequence parallelism tagged ``sequence_parallel``: each TP rank's gradient covers its own tokens).
"""

from __future__ import annotations

import torch

from megatron_core.config import TransformerConfig
from megatron_core.transformer.mlp import MLP, MLPSubmodules


class SharedExpertMLP(MLP):
    """``MLP`` of width ``moe_shared_expert_intermediate_size``, optionally sigmoid-gated.

    Args:
        config: the TransformerConfig.
        submodules: the MLP's linears.
        gate: add ``gate_weight``; None follows ``config.moe_shared_expert_gate``.
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, gate: bool | None = None) -> None:
        size = config.moe_shared_expert_intermediate_size
        if size is None:
            raise ValueError("SharedExpertMLP: config.moe_shared_expert_intermediate_size is None; set it to the "
                             "shared expert's inner width, or leave the spec's shared_experts slot empty")
        super().__init__(config, submodules, ffn_hidden_size=size)
        self.use_shared_expert_gate = config.moe_shared_expert_gate if gate is None else gate
        self.gate_weight: torch.nn.Parameter | None = None
        if self.use_shared_expert_gate:
            self.gate_weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.torch_dtype))
            if config.perform_initialization:
                with torch.no_grad():
                    master = torch.empty(self.gate_weight.shape, dtype=torch.float32)
                    config.init_method(master)
                    self.gate_weight.copy_(master)
            # With sequence parallelism the gate sees this rank's tokens: its gradient is summed over TP.
            self.gate_weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[..., h]`` -> ``(output [..., h], None)`` (any bias already added)."""
        out, bias = super().forward(hidden_states)
        if bias is not None:
            out = out + bias
        if self.gate_weight is not None:
            gate = torch.sigmoid(torch.nn.functional.linear(hidden_states, self.gate_weight))  # [..., 1]
            out = out * gate
        return out, None
