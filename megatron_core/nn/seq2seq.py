"""Drop-in ``torch.nn.Transformer``: a ``TransformerEncoder`` and a ``TransformerDecoder`` of the drop-in layers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from megatron_core.module import MegatronModule
from megatron_core.nn._base import TorchLoadMixin
from megatron_core.nn.activation import Activation
from megatron_core.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = ["Transformer"]


class Transformer(TorchLoadMixin, MegatronModule):
    """Drop-in ``torch.nn.Transformer`` (same constructor, forward and state-dict loading).

    Initialised as ``torch.nn.Transformer`` from the same seed (Xavier-uniform matrices). A
    ``custom_encoder`` / ``custom_decoder`` is used as given and keeps its own weights (torch
    re-initialises it).
    """

    def __init__(
        self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
        dim_feedforward: int = 2048, dropout: float = 0.1, activation: Activation = F.relu,
        custom_encoder: torch.nn.Module | None = None, custom_decoder: torch.nn.Module | None = None,
        layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False, bias: bool = True,
        device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(None)
        layer_args: dict[str, Any] = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                          activation=activation, layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                          norm_first=norm_first, bias=bias, dtype=dtype)
        with torch.random.fork_rng(devices=[]):  # our layers' own draws are replaced below
            self.encoder = custom_encoder if custom_encoder is not None else TransformerEncoder(
                TransformerEncoderLayer(**layer_args), num_encoder_layers,
                torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias))
            self.decoder = custom_decoder if custom_decoder is not None else TransformerDecoder(
                TransformerDecoderLayer(**layer_args), num_decoder_layers,
                torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias))
        # torch.nn's initialisation, drawn as torch draws it: build the twin and load its parts.
        with warnings.catch_warnings():  # torch's nested-tensor notes concern its layers, not ours
            warnings.simplefilter("ignore")
            twin = torch.nn.Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                        dropout, F.relu, layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                                        norm_first=norm_first, bias=bias)
        if custom_encoder is None:
            self.encoder.load_state_dict(twin.encoder.state_dict())
        if custom_decoder is None:
            self.decoder.load_state_dict(twin.decoder.state_dict())
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        if device is not None:
            self.to(device)

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None, src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None, memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.Transformer.forward``: encode ``src``, decode ``tgt`` against it."""
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float causal mask ``[sz, sz]`` (``-inf`` above the diagonal), as torch.nn.Transformer's."""
        return torch.nn.Transformer.generate_square_subsequent_mask(sz, device=device, dtype=dtype)
