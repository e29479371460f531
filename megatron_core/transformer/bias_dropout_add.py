"""Bias-dropout-add: ``residual + dropout(x + bias)``, the residual update after attention and MLP.

Linear layers built with ``skip_bias_add`` hand their bias back unadded so that bias, dropout and
residual add happen in one place. A spec slot (``self_attn_bda``, ``mlp_bda``...) holds
``get_bias_dropout_add``; the layer calls it with ``(training, config.bias_dropout_fusion)`` to get
the function for this step. The fused function draws CPU dropout masks from 16 random bits per
element (``tensor_parallel.cpu_dropout``: ~3.5x cheaper than ``F.dropout``, drop probability rounded
to a multiple of 2^-16) and adds the residual in two passes over the activations; the unfused one is plain torch
(``F.dropout``'s masks). On other devices both call ``F.dropout``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_core.tensor_parallel.cpu_dropout import dropout_add

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
    return residual + F.dropout(_biased(x_with_bias), p=prob, training=training)


def fused_bias_dropout_add(
    x_with_bias: tuple[torch.Tensor, torch.Tensor | None], residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """:func:`bias_dropout_add` with the CPU dropout of ``tensor_parallel.cpu_dropout`` (other masks, same law)."""
    return dropout_add(_biased(x_with_bias), residual, prob, training)


def _biased(x_with_bias: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    x, bias = x_with_bias
    return x if bias is None else x + bias


def get_bias_dropout_add(training: bool, fused: bool = False) -> BiasDropoutAddFn:
    """The bias-dropout-add function for this mode: :func:`fused_bias_dropout_add` when ``fused``."""
    function = fused_bias_dropout_add if fused else bias_dropout_add

    def _bda(x_with_bias: tuple[torch.Tensor, torch.Tensor | None], residual: torch.Tensor,
             prob: float) -> torch.Tensor:
        return function(x_with_bias, residual, prob, training)

    return _bda
