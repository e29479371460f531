"""Drop-in ``torch.nn`` transformer layers built from specs on the toolkit's ``TransformerLayer``.

``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` *are* ``TransformerLayer``s (built from
``layer_specs.encoder_layer_spec`` / ``decoder_layer_spec``) with torch.nn's constructor and forward.
``TransformerEncoder`` / ``TransformerDecoder`` / ``Transformer`` stack them as torch does. Under
tensor parallelism (``parallel_state.initialize_model_parallel(tp)`` before building) attention heads
and the feed-forward width are split across ranks; inputs and outputs stay whole on every rank.

* Initialisation: the same values as the torch.nn layer built from the same seed (the layer draws a
  torch.nn twin on the CPU and loads it), so swapping the import keeps a seeded run's weights.
* ``load_state_dict(torch_layer.state_dict())`` works as is; ``state_dict()`` has the toolkit's keys
  (``self_attention.linear_qkv.weight``...), which is what sharded checkpoints use.
* Masks: as torch.nn (bool True = masked, or float additive; ``[L, S]`` or ``[N*heads, L, S]``;
  key-padding ``[N, S]``). ``is_causal=True`` without a mask builds the causal mask (torch raises).
* torch.nn's inference fast path (nested tensors) does not exist here: ``enable_nested_tensor`` and
  ``mask_check`` are accepted and ignored, so padded positions get ordinary outputs, not zeros.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F

from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.nn._base import TorchLoadMixin
from megatron_core.nn.activation import Activation, resolve_activation
from megatron_core.nn.layer_specs import (
    LayerNormWithoutBias,
    decoder_layer_spec,
    encoder_layer_spec,
    torch_layer_config,
)
from megatron_core.nn.masks import AttentionMasks, build_attention_masks, from_seq_first, to_seq_first
from megatron_core.nn.torch_keys import convert_decoder_layer, convert_encoder_layer, convert_stack
from megatron_core.transformer.norms import LayerNorm
from megatron_core.transformer.transformer_layer import TransformerLayer

__all__ = ["TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer"]


def _torch_layer_args(layer: Any) -> dict[str, Any]:
    """Constructor arguments of a torch.nn encoder/decoder layer, read back from its modules."""
    return dict(
        d_model=layer.self_attn.embed_dim, nhead=layer.self_attn.num_heads,
        dim_feedforward=layer.linear1.out_features, dropout=layer.dropout.p, activation=layer.activation,
        layer_norm_eps=layer.norm1.eps, batch_first=layer.self_attn.batch_first, norm_first=layer.norm_first,
        bias=layer.linear1.bias is not None, dtype=layer.linear1.weight.dtype,
    )


class _DropInLayer(TorchLoadMixin, TransformerLayer):
    """What the encoder and decoder layers share: config/spec from torch.nn arguments, masks, layouts."""

    _torch_cls: type[torch.nn.Module]

    def _setup(self, spec_fn: Any, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
               activation: Activation, layer_norm_eps: float, batch_first: bool, norm_first: bool, bias: bool,
               device: Any, dtype: torch.dtype | None) -> None:
        fn, name = resolve_activation(activation)
        config = torch_layer_config(d_model, nhead, dim_feedforward, dropout, name, layer_norm_eps, norm_first,
                                    bias, dtype)
        TransformerLayer.__init__(self, config, spec_fn(fn, dropout, bias).submodules, layer_number=1)
        self.d_model, self.nhead, self.batch_first, self.norm_first = d_model, nhead, batch_first, norm_first
        self.activation = fn
        # torch.nn's own initialisation: build the torch.nn twin (same RNG draws) and load it.
        twin = self._torch_cls(d_model, nhead, dim_feedforward, dropout, F.relu, layer_norm_eps, batch_first,
                               norm_first, bias=bias)
        self.load_state_dict(twin.state_dict())
        if device is not None:
            self.to(device)

    @classmethod
    def from_torch(cls, layer: Any) -> Any:
        """The drop-in twin of a ``torch.nn`` encoder/decoder layer, holding the same weights."""
        if not isinstance(layer, cls._torch_cls):
            raise TypeError(f"{cls.__name__}.from_torch expects a {cls._torch_cls.__name__}; got {type(layer).__name__}")
        with torch.random.fork_rng(devices=[]):  # building the twin must not move the caller's RNG
            new = cls(**_torch_layer_args(layer))
        new.load_state_dict(layer.state_dict())
        new.train(layer.training)
        return new.to(cast(Any, layer).linear1.weight.device)

    def masks(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool | None,
              sq: int, sk: int, like: torch.Tensor, unbatched: bool) -> AttentionMasks:
        """torch.nn masks for ``[L, N, E]`` activations ``like`` -> ``AttentionMasks``."""
        return build_attention_masks(attn_mask, key_padding_mask, is_causal, batch=like.shape[1], heads=self.nhead,
                                     sq=sq, sk=sk, dtype=like.dtype, device=like.device, unbatched=unbatched)


class TransformerEncoderLayer(_DropInLayer):
    """Drop-in ``torch.nn.TransformerEncoderLayer``: self-attention + feed-forward, pre- or post-norm."""

    _torch_cls = torch.nn.TransformerEncoderLayer

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        activation: Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
        norm_first: bool = False, bias: bool = True, device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(encoder_layer_spec, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                    batch_first, norm_first, bias, device, dtype)

    def _convert_torch_keys(self, state_dict: dict[str, Any], prefix: str) -> None:
        convert_encoder_layer(state_dict, prefix, self.nhead)

    def forward_seq_first(self, x: torch.Tensor, masks: AttentionMasks) -> torch.Tensor:
        """``[L, N, E]`` -> ``[L, N, E]`` with prepared masks (what ``TransformerEncoder`` calls)."""
        out, _ = TransformerLayer.forward(self, x, attention_mask=masks.mask, attention_bias=masks.bias)
        return out

    def forward(  # type: ignore[override]
        self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.TransformerEncoderLayer.forward``: ``[N, L, E]`` / ``[L, N, E]`` / ``[L, E]`` in and out."""
        x, unbatched = to_seq_first(src, self.batch_first)  # [L, N, E]
        masks = self.masks(src_mask, src_key_padding_mask, is_causal, x.shape[0], x.shape[0], x, unbatched)
        return from_seq_first(self.forward_seq_first(x, masks), self.batch_first, unbatched)


class TransformerDecoderLayer(_DropInLayer):
    """Drop-in ``torch.nn.TransformerDecoderLayer``: self-attention, cross-attention to memory, feed-forward."""

    _torch_cls = torch.nn.TransformerDecoderLayer

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        activation: Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
        norm_first: bool = False, bias: bool = True, device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(decoder_layer_spec, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                    batch_first, norm_first, bias, device, dtype)

    def _convert_torch_keys(self, state_dict: dict[str, Any], prefix: str) -> None:
        convert_decoder_layer(state_dict, prefix, self.nhead)

    def forward_seq_first(self, x: torch.Tensor, memory: torch.Tensor, self_masks: AttentionMasks,
                          memory_masks: AttentionMasks) -> torch.Tensor:
        """``[T, N, E]`` and memory ``[S, N, E]`` -> ``[T, N, E]`` with prepared masks."""
        out, _ = TransformerLayer.forward(self, x, attention_mask=self_masks.mask, attention_bias=self_masks.bias,
                                          context=memory, context_mask=cast(Any, memory_masks))
        return out

    def decoder_masks(self, x: torch.Tensor, memory: torch.Tensor, unbatched: bool, tgt_mask: Any, memory_mask: Any,
                      tgt_key_padding_mask: Any, memory_key_padding_mask: Any, tgt_is_causal: bool | None,
                      memory_is_causal: bool) -> tuple[AttentionMasks, AttentionMasks]:
        """Self- and cross-attention masks for ``[T, N, E]`` targets and ``[S, N, E]`` memory."""
        t, s = x.shape[0], memory.shape[0]
        return (self.masks(tgt_mask, tgt_key_padding_mask, tgt_is_causal, t, t, x, unbatched),
                self.masks(memory_mask, memory_key_padding_mask, memory_is_causal, t, s, x, unbatched))

    def forward(  # type: ignore[override]
        self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.TransformerDecoderLayer.forward``."""
        x, unbatched = to_seq_first(tgt, self.batch_first)  # [T, N, E]
        mem, _ = to_seq_first(memory, self.batch_first)  # [S, N, E]
        masks = self.decoder_masks(x, mem, unbatched, tgt_mask, memory_mask, tgt_key_padding_mask,
                                   memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        return from_seq_first(self.forward_seq_first(x, mem, *masks), self.batch_first, unbatched)


# ----------------------------------------------------------------------------- stacks
def _our_norm(norm: torch.nn.Module | None, config: TransformerConfig) -> torch.nn.Module | None:
    """torch's ``nn.LayerNorm`` -> the toolkit's (same values); anything else is kept as given."""
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return norm
    cls = LayerNorm if norm.bias is not None else LayerNormWithoutBias
    ours = cls(config, norm.normalized_shape[0], eps=norm.eps)
    ours.load_state_dict(norm.state_dict())
    return ours.to(norm.weight.device)


class _Stack(TorchLoadMixin, MegatronModule):
    """``num_layers`` copies of a layer and an optional final norm (torch.nn's ``norm``)."""

    _layer_cls: Any

    def __init__(self, layer: torch.nn.Module, num_layers: int, norm: torch.nn.Module | None) -> None:
        if isinstance(layer, self._layer_cls._torch_cls):
            layer = self._layer_cls.from_torch(layer)
        if not isinstance(layer, self._layer_cls):
            raise TypeError(f"{type(self).__name__} takes a {self._layer_cls.__name__} (ours or torch.nn's); "
                            f"got {type(layer).__name__}")
        super().__init__(layer.config)
        self.layers = torch.nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        for i, copied in enumerate(cast(list[Any], self.layers)):  # 1-based, as TransformerBlock numbers them
            copied.layer_number = copied.self_attention.layer_number = i + 1
        self.num_layers = num_layers
        self.final_layernorm = _our_norm(norm, layer.config)

    @property
    def norm(self) -> torch.nn.Module | None:
        """torch.nn's name for the final norm."""
        return self.final_layernorm

    def _convert_torch_keys(self, state_dict: dict[str, Any], prefix: str) -> None:
        convert_stack(state_dict, prefix)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.final_layernorm is None else self.final_layernorm(x)


class TransformerEncoder(_Stack):
    """Drop-in ``torch.nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer`` (+ ``norm``)."""

    _layer_cls = TransformerEncoderLayer

    def __init__(self, encoder_layer: torch.nn.Module, num_layers: int, norm: torch.nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__(encoder_layer, num_layers, norm)
        self.enable_nested_tensor, self.mask_check = enable_nested_tensor, mask_check  # no fast path here

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        """``torch.nn.TransformerEncoder.forward``."""
        first: Any = self.layers[0]
        x, unbatched = to_seq_first(src, first.batch_first)  # [L, N, E]
        masks = first.masks(mask, src_key_padding_mask, is_causal, x.shape[0], x.shape[0], x, unbatched)
        for layer in cast(list[Any], self.layers):
            x = layer.forward_seq_first(x, masks)
        return from_seq_first(self._final(x), first.batch_first, unbatched)


class TransformerDecoder(_Stack):
    """Drop-in ``torch.nn.TransformerDecoder``: ``num_layers`` copies of ``decoder_layer`` (+ ``norm``)."""

    _layer_cls = TransformerDecoderLayer

    def __init__(self, decoder_layer: torch.nn.Module, num_layers: int, norm: torch.nn.Module | None = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.TransformerDecoder.forward``."""
        first: Any = self.layers[0]
        x, unbatched = to_seq_first(tgt, first.batch_first)  # [T, N, E]
        mem, _ = to_seq_first(memory, first.batch_first)  # [S, N, E]
        masks = first.decoder_masks(x, mem, unbatched, tgt_mask, memory_mask, tgt_key_padding_mask,
                                    memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        for layer in cast(list[Any], self.layers):
            x = layer.forward_seq_first(x, mem, *masks)
        return from_seq_first(self._final(x), first.batch_first, unbatched)
