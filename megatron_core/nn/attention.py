"""``MultiheadAttention``: ``torch.nn.MultiheadAttention``'s interface on the toolkit's ``SelfAttention``.

It *is* a ``SelfAttention`` built from ``layer_specs.self_attention_spec()`` (fused per-head QKV,
column/row-parallel linears, SDPA core), so under tensor parallelism each rank holds
``num_heads / tp`` heads. When query, key and value are the same tensor the fused projection runs
as is; otherwise the q, k and v rows of the fused weight project their own inputs.

``need_weights=True`` (torch's default) also returns the attention probabilities, computed
separately from the output (they are not needed for it); they are averaged over, or gathered
across, all heads of all ranks. They are the probabilities before attention dropout (torch returns
them after it; the two agree whenever dropout is off, e.g. in eval). Not supported (``UnsupportedArgumentError``): ``add_bias_kv``,
``add_zero_attn``, and ``kdim`` / ``vdim`` different from ``embed_dim``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_core.nn._base import TorchLoadMixin, UnsupportedArgumentError
from megatron_core.nn.layer_specs import self_attention_spec, torch_layer_config
from megatron_core.nn.masks import AttentionMasks, build_attention_masks, from_seq_first, to_seq_first
from megatron_core.nn.torch_keys import convert_self_attention
from megatron_core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron_core.transformer.attention import SelfAttention

__all__ = ["MultiheadAttention"]


class MultiheadAttention(TorchLoadMixin, SelfAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` (same constructor and forward), tensor-parallel over heads.

    ``state_dict()`` has the toolkit's keys (``linear_qkv.*``, ``linear_proj.*``);
    ``load_state_dict`` also takes a ``torch.nn.MultiheadAttention`` state dict.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, add_bias_kv: bool = False,
        add_zero_attn: bool = False, kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
        device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        for name, value, ok in (("add_bias_kv", add_bias_kv, not add_bias_kv),
                                ("add_zero_attn", add_zero_attn, not add_zero_attn),
                                ("kdim", kdim, kdim in (None, embed_dim)), ("vdim", vdim, vdim in (None, embed_dim))):
            if not ok:
                raise UnsupportedArgumentError(
                    f"MultiheadAttention: {name}={value!r} is not supported (the fused QKV projection needs "
                    f"key/value width = embed_dim = {embed_dim}, no extra bias rows); leave {name} at its default "
                    "or use torch.nn.MultiheadAttention for this layer"
                )
        config = torch_layer_config(embed_dim, num_heads, dropout=dropout, activation_name=None, bias=bias,
                                    dtype=dtype, hidden_dropout=0.0)
        spec = self_attention_spec()
        SelfAttention.__init__(self, config, spec.submodules, layer_number=1, **spec.params)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        reference = torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias)  # torch's init
        self.load_state_dict(reference.state_dict())
        if device is not None:
            self.to(device)

    def _convert_torch_keys(self, state_dict: dict[str, Any], prefix: str) -> None:
        convert_self_attention(state_dict, prefix, prefix, self.num_heads)

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """q (0), k (1) or v (2) of ``x`` ``[s, b, e]`` with this rank's rows of the fused weight -> ``[s, b, np, hn]``."""
        np_, hn = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        weight = self.linear_qkv.weight.view(np_, 3, hn, -1)[:, which].reshape(np_ * hn, -1)  # [np*hn, e]
        bias = self.linear_qkv.bias
        bias = None if bias is None else bias.view(np_, 3, hn)[:, which].reshape(np_ * hn)
        out = F.linear(copy_to_tensor_model_parallel_region(x, self.tp_group), weight, bias)  # [s, b, np*hn]
        return out.view(x.shape[0], x.shape[1], np_, hn)

    def _attention_weights(self, query: torch.Tensor, key: torch.Tensor, masks: AttentionMasks,
                           average: bool) -> torch.Tensor:
        """Softmax probabilities ``[b, heads, sq, sk]`` of every head (or their mean ``[b, sq, sk]``)."""
        scores = torch.einsum("qbnd,kbnd->bnqk", query.float(), key.float()) * self.core_attention.softmax_scale
        if masks.bias is not None:
            scores = scores + masks.bias.float()
        if masks.mask is not None:
            scores = scores.masked_fill(masks.mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(query.dtype)  # [b, np/tp, sq, sk]
        if average:
            return reduce_from_tensor_model_parallel_region(probs.sum(dim=1), self.tp_group) / self.num_heads
        # heads last for the all-gather: [b, np/tp, sq, sk] -> [b, sq, sk, np/tp] -> [b, sq, sk, np]
        gathered = gather_from_tensor_model_parallel_region(probs.movedim(1, -1).contiguous(), self.tp_group)
        return gathered.movedim(-1, 1)

    def forward(  # type: ignore[override]
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``torch.nn.MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        q_in, unbatched = to_seq_first(query, self.batch_first)  # [L, N, E]
        if query is key and key is value:
            q, k, v = self.get_query_key_value_tensors(q_in)  # fused QKV
        else:
            k_in, _ = to_seq_first(key, self.batch_first)
            v_in = k_in if value is key else to_seq_first(value, self.batch_first)[0]
            q, k, v = self._project(q_in, 0), self._project(k_in, 1), self._project(v_in, 2)
        masks = build_attention_masks(
            attn_mask, key_padding_mask, is_causal, batch=q.shape[1], heads=self.num_heads, sq=q.shape[0],
            sk=k.shape[0], dtype=q.dtype, device=q.device, unbatched=unbatched,
        )
        out, out_bias = self._attend(q, k, v, masks.mask, None, None, masks.bias)  # [L, N, E]
        if out_bias is not None:
            out = out + out_bias
        out = from_seq_first(out, self.batch_first, unbatched)
        if not need_weights:
            return out, None
        weights = self._attention_weights(q, k, masks, average_attn_weights)
        return out, (weights.squeeze(0) if unbatched else weights)

    def _get_name(self) -> str:
        return "MultiheadAttention"
