"""Bias-dropout-add: ``residual + dropout(x + bias)``, the residual update after attention and MLP.

Linear layers built with ``skip_bias_add`` hand their bias back unadded so that bias, dropout and
residual add happen in one place (one fused kernel where a fusing backend exists). A spec slot
(``self_attn_bda``, ``mlp_bda``...) holds ``get_bias_dropout_add``; the layer calls it with
``(training, fused)`` to get the function for this step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BiasDropoutAddFn = Callable[[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor, float], torch.Tensor]


def bias_dropout_add(
    x_with_bias: tuple[torch.Tensor, torch.Tensor | None], residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """``residual + dropout(x + bias, prob)``; dropout only when ``training``.

    Args:
        x_with_bias: a layer's ``(output, bias)``; bias may be None.
        residual: the tensor to add to, same shape as ``output``.
        prob: dropout probability.
        training: apply dropout when True.
    """
    x, bias = x_with_bias
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def get_bias_dropout_add(training: bool, fused: bool = False) -> BiasDropoutAddFn:
    """The bias-dropout-add function for this mode.

    ``fused`` asks for a fused kernel; none exists for the local path, and the unfused function
    computes the same numbers, so it is returned either way.
    """
    del fused  # same maths; a TE/JIT backend can supply a fused function through the spec instead

    def _bda(x_with_bias: tuple[torch.Tensor, torch.Tensor | None], residual: torch.Tensor,
             prob: float) -> torch.Tensor:
        return bias_dropout_add(x_with_bias, residual, prob, training)

    return _bda
