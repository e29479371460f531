"""Normalisation layers: LayerNorm and RMSNorm, and ``WrappedNorm`` that picks one by config.

Parameter names are ``weight`` (and ``bias`` for LayerNorm), as in Megatron-Core's local spec, so
checkpoints map one to one. With ``config.layernorm_zero_centered_gamma`` the stored weight is
``gamma - 1`` (initialised to zero), which keeps weight decay from pulling the scale to zero.

Under sequence parallelism every TP rank normalises a different slice of the sequence, so the
gradients of these (replicated) parameters are partial sums: they are tagged
``param.sequence_parallel = True`` and must be all-reduced over the TP group before the optimizer
step (``megatron_core.transformer.utils.allreduce_tp_partial_grads``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule


def _tag_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters(recurse=False):
        param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


class LayerNorm(MegatronModule):
    """LayerNorm over the last dimension, with an optional zero-centred gamma.

    Args:
        config: the TransformerConfig (reads ``layernorm_zero_centered_gamma``, ``sequence_parallel``,
            ``params_dtype``).
        hidden_size: width of the normalised (last) dimension.
        eps: added to the variance.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config)
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.torch_dtype
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        _tag_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"


class RMSNorm(MegatronModule):
    """Root-mean-square norm over the last dimension (no bias), optional zero-centred gamma.

    Args:
        config: the TransformerConfig.
        hidden_size: width of the normalised (last) dimension.
        eps: added to the mean square.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config)
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.torch_dtype
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        _tag_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.rms_norm(x, (self.hidden_size,), weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"


NORMS: dict[str, type[LayerNorm] | type[RMSNorm]] = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}


def build_norm(config: TransformerConfig, hidden_size: int, eps: float | None = None) -> MegatronModule:
    """The norm named by ``config.normalization`` ("LayerNorm" or "RMSNorm").

    Raises:
        ValueError: ``config.normalization`` is not a known norm.
    """
    name = config.normalization
    if name not in NORMS:
        raise ValueError(f"config.normalization={name!r} is not a known norm; use one of {sorted(NORMS)}")
    return NORMS[name](config, hidden_size, eps=config.layernorm_epsilon if eps is None else eps)


class WrappedNorm:
    """Spec placeholder: building it returns the ``LayerNorm`` or ``RMSNorm`` that the config names.

    Lets one local spec serve GPT (LayerNorm) and Llama (RMSNorm): the choice stays in the config.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> MegatronModule:  # type: ignore[misc]
        return build_norm(config, hidden_size, eps)
