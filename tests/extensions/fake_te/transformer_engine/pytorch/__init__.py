"""CPU reference of ``transformer_engine.pytorch``: Linear, LayerNormLinear, LayerNorm, RMSNorm,
DotProductAttention and ``ops`` activations (see the package docstring: not TE, a test stand-in).

Tensor-parallel communication follows TE's documented behaviour: a column-parallel linear takes
the full input (all-gathered along the sequence under sequence parallelism) and returns its
output slice; a row-parallel linear all-reduces (reduce-scatters) the partial products and adds
the bias afterwards.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from typing import Any

import torch
import torch.nn.functional as F

from megatron_core import parallel_state
from megatron_core.tensor_parallel import mappings

from . import fp8, ops  # noqa: F401  (te.pytorch.ops.*, te.pytorch.fp8.*)
from .fp8 import fp8_autocast

__all__ = ["DotProductAttention", "LayerNorm", "LayerNormLinear", "Linear", "RMSNorm", "fp8_autocast", "ops"]


class _Module(torch.nn.Module):
    """TE modules carry ``_extra_state`` (FP8 metadata): empty until a forward ran under ``fp8_autocast``.

    The stand-in's "FP8 metadata" is a record of the recipe, the number of FP8 forwards and the input
    amax history (nothing is quantised), serialised like TE 2.x does: pickled into a uint8 tensor.
    """

    fp8_meta: dict[str, Any] | None = None

    def _record_fp8(self, inp: torch.Tensor) -> None:
        if not fp8.FP8GlobalStateManager.is_fp8_enabled():
            return
        meta = self.fp8_meta or {"forwards": 0, "amax_history": []}
        meta["recipe"] = type(fp8.FP8GlobalStateManager.get_fp8_recipe()).__name__
        meta["forwards"] += 1
        meta["amax_history"].append(float(inp.detach().abs().max()))
        self.fp8_meta = meta

    def get_extra_state(self) -> torch.Tensor:
        if self.fp8_meta is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(self.fp8_meta)), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            self.fp8_meta = None
            return
        self.fp8_meta = pickle.loads(state.detach().cpu().numpy().tobytes())


def _tp_size(tp_group: Any, tp_size: int) -> int:
    return parallel_state.group_world_size(tp_group) if tp_group is not None else tp_size


class Linear(_Module):
    """``y = x W^T + b`` with TE's arguments; ``parallel_mode`` None, "column" or "row"."""

    def __init__(
        self, in_features: int, out_features: int, sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False, tp_group: Any = None, tp_size: int = 1,
        get_rng_state_tracker: Any = None, init_method: Any = None, bias: bool = True, return_bias: bool = False,
        params_dtype: torch.dtype | None = None, parallel_mode: str | None = None, device: Any = "cuda",
        **unused: Any,
    ) -> None:
        super().__init__()
        self._init_linear(in_features, out_features, sequence_parallel, tp_group, tp_size, init_method, bias,
                          return_bias, params_dtype, parallel_mode)

    def _init_linear(
        self, in_features: int, out_features: int, sequence_parallel: bool, tp_group: Any, tp_size: int,
        init_method: Any, bias: bool, return_bias: bool, params_dtype: torch.dtype | None, parallel_mode: str | None,
    ) -> None:
        assert parallel_mode in (None, "column", "row"), parallel_mode
        dtype = params_dtype or torch.get_default_dtype()
        self.tp_group, self.tp_size = tp_group, _tp_size(tp_group, tp_size)
        self.parallel_mode = parallel_mode
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        if parallel_mode == "column":
            out_features //= self.tp_size
        elif parallel_mode == "row":
            in_features //= self.tp_size
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        (init_method or (lambda w: torch.nn.init.normal_(w, 0.0, 0.023)))(self.weight)
        if bias:
            size = out_features
            self.bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype))
        else:
            self.bias = torch.Tensor().to(dtype=dtype)  # TE keeps a plain empty tensor, not a parameter

    def _linear(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        bias = self.bias if self.apply_bias else None
        if self.parallel_mode == "column":
            if self.sequence_parallel:
                x = mappings.gather_from_sequence_parallel_region(x, True, self.tp_group)  # [s/tp,b,h]->[s,b,h]
            elif self.tp_size > 1:
                x = mappings.copy_to_tensor_model_parallel_region(x, self.tp_group)
            out = F.linear(x, self.weight, bias)
        elif self.parallel_mode == "row":
            out = F.linear(x, self.weight)
            if self.sequence_parallel:
                out = mappings.reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
            elif self.tp_size > 1:
                out = mappings.reduce_from_tensor_model_parallel_region(out, self.tp_group)
            if bias is not None:
                out = out + bias
        else:
            out = F.linear(x, self.weight, bias)
        return (out, self.bias) if self.return_bias else out

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None) -> Any:
        self._record_fp8(inp)
        return self._linear(inp)


def _normalize(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               zero_centered_gamma: bool) -> torch.Tensor:
    gamma = weight + 1 if zero_centered_gamma else weight
    if kind == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), gamma, eps)
    return F.layer_norm(x, (x.shape[-1],), gamma, bias, eps)


class LayerNormLinear(Linear):
    """Norm (LayerNorm or RMSNorm) fused before a linear; norm parameters ``layer_norm_weight/bias``."""

    def __init__(
        self, in_features: int, out_features: int, eps: float = 1e-5, sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False, tp_group: Any = None, tp_size: int = 1,
        get_rng_state_tracker: Any = None, init_method: Any = None, bias: bool = True,
        normalization: str = "LayerNorm", return_bias: bool = False, params_dtype: torch.dtype | None = None,
        parallel_mode: str | None = None, return_layernorm_output: bool = False,
        zero_centered_gamma: bool = False, device: Any = "cuda", **unused: Any,
    ) -> None:
        _Module.__init__(self)
        assert normalization in ("LayerNorm", "RMSNorm"), normalization
        dtype = params_dtype or torch.get_default_dtype()
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered_gamma
        init = torch.zeros if zero_centered_gamma else torch.ones
        self.layer_norm_weight = torch.nn.Parameter(init(in_features, dtype=dtype))
        self.layer_norm_bias = (torch.nn.Parameter(torch.zeros(in_features, dtype=dtype))
                                if normalization == "LayerNorm" else None)
        self._init_linear(in_features, out_features, sequence_parallel, tp_group, tp_size, init_method, bias,
                          return_bias, params_dtype, parallel_mode)
        for p in (self.layer_norm_weight, self.layer_norm_bias):
            if p is not None:
                p.sequence_parallel = self.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None) -> Any:
        self._record_fp8(inp)
        normed = _normalize(inp, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps,
                            self.zero_centered_gamma)
        return self._linear(normed)


class _Norm(_Module):
    kind = "LayerNorm"

    def __init__(
        self, normalized_shape: int, eps: float = 1e-5, sequence_parallel: bool | None = None,
        params_dtype: torch.dtype | None = None, zero_centered_gamma: bool = False, device: Any = None,
        dtype: torch.dtype | None = None, **unused: Any,
    ) -> None:
        super().__init__()
        dtype = dtype or params_dtype or torch.get_default_dtype()
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        init = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(normalized_shape, dtype=dtype))
        if self.kind == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(normalized_shape, dtype=dtype))
        if sequence_parallel is not None:
            for p in self.parameters():
                p.sequence_parallel = sequence_parallel  # type: ignore[attr-defined]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return _normalize(inp, self.kind, self.weight, getattr(self, "bias", None), self.eps, self.zero_centered_gamma)


class LayerNorm(_Norm):
    kind = "LayerNorm"


class RMSNorm(_Norm):
    kind = "RMSNorm"


class DotProductAttention(_Module):
    """softmax(q k^T * scale [+ bias], masked) v in ``sbhd``; TE's mask types (True = masked out)."""

    def __init__(
        self, num_attention_heads: int, kv_channels: int, num_gqa_groups: int | None = None,
        attention_dropout: float = 0.0, qkv_format: str = "sbhd", attn_mask_type: str = "causal",
        sequence_parallel: bool = False, tp_size: int = 1, get_rng_state_tracker: Any = None,
        tp_group: Any = None, layer_number: int | None = None, attention_type: str = "self",
        softmax_scale: float | None = None, cp_group: Any = None, cp_global_ranks: list[int] | None = None,
        cp_stream: Any = None, cp_comm_type: str = "p2p", **unused: Any,
    ) -> None:
        super().__init__()
        assert qkv_format == "sbhd", qkv_format
        # Context parallelism (TE's contract): the inputs are this rank's chunks r and 2cp-1-r of the sequence.
        self.cp_group = cp_group if parallel_state.group_world_size(cp_group) > 1 else None
        if self.cp_group is not None:
            assert cp_global_ranks == torch.distributed.get_process_group_ranks(cp_group), cp_global_ranks
            assert cp_comm_type in ("p2p", "all_gather", "a2a"), cp_comm_type
        self.tp_size = _tp_size(tp_group, tp_size)
        self.heads_per_partition = num_attention_heads // self.tp_size
        self.groups_per_partition = (num_gqa_groups or num_attention_heads) // self.tp_size
        self.dropout_p, self.attn_mask_type = attention_dropout, attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv_channels)
        self.dropout_ctx = (get_rng_state_tracker().fork if get_rng_state_tracker and not sequence_parallel
                            else contextlib.nullcontext)

    def forward(
        self, query_layer: torch.Tensor, key_layer: torch.Tensor, value_layer: torch.Tensor,
        attention_mask: torch.Tensor | None = None, qkv_format: str | None = None,
        attn_mask_type: str | None = None, core_attention_bias_type: str = "no_bias",
        core_attention_bias: torch.Tensor | None = None, **unused: Any,
    ) -> torch.Tensor:
        sq, b, np_, hn = query_layer.shape
        sk, ng = key_layer.shape[0], key_layer.shape[2]
        assert (np_, ng) == (self.heads_per_partition, self.groups_per_partition), (np_, ng)
        mask_type = attn_mask_type or self.attn_mask_type
        rows = torch.arange(sq)[:, None]
        if self.cp_group is not None:  # every key of the sequence, in order; queries at their true positions
            assert mask_type in ("causal", "no_mask") and attention_mask is None, mask_type
            key_layer, value_layer = _CPGather.apply(key_layer, self.cp_group), _CPGather.apply(value_layer, self.cp_group)
            rows = _cp_positions(sq, self.cp_group)[:, None]
            sk = key_layer.shape[0]
        q = query_layer.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key_layer.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)  # [b, np, sk, hn]
        v = value_layer.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale  # [b, np, sq, sk]
        if core_attention_bias_type == "post_scale_bias":
            scores = scores + core_attention_bias
        cols = torch.arange(sk)[None, :]
        if mask_type == "causal":
            scores = scores.masked_fill(cols > rows, float("-inf"))  # TE's "causal" is top-left aligned
        elif mask_type == "causal_bottom_right":
            scores = scores.masked_fill(cols > rows + (sk - sq), float("-inf"))
        elif mask_type in ("arbitrary", "padding"):
            scores = scores.masked_fill(attention_mask, float("-inf"))
        else:
            assert mask_type == "no_mask", mask_type
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if self.training and self.dropout_p > 0:
            with self.dropout_ctx():
                probs = F.dropout(probs, self.dropout_p)
        out = torch.matmul(probs, v)  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def _cp_chunks(cp_group: Any) -> tuple[int, int]:
    """The two sequence chunks (of 2 x CP) this context-parallel rank holds: r and 2 CP - 1 - r."""
    rank, size = torch.distributed.get_rank(cp_group), torch.distributed.get_world_size(cp_group)
    return rank, 2 * size - 1 - rank


def _cp_positions(local_len: int, cp_group: Any) -> torch.Tensor:
    half = local_len // 2
    return torch.cat([torch.arange(c * half, (c + 1) * half) for c in _cp_chunks(cp_group)])


class _CPGather(torch.autograd.Function):
    """``[s/cp, ...]`` chunks of every CP rank -> the whole ``[s, ...]`` in sequence order; backward: the
    gradient summed over ranks (each used every key), this rank's chunks kept."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        size = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        half = local.shape[0] // 2
        chunks: list[torch.Tensor | None] = [None] * (2 * size)
        for r, part in enumerate(parts):
            chunks[r], chunks[2 * size - 1 - r] = part[:half], part[half:]
        return torch.cat(chunks, dim=0)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        half = grad.shape[0] // (2 * torch.distributed.get_world_size(ctx.group))
        return torch.cat([grad[c * half:(c + 1) * half] for c in _cp_chunks(ctx.group)], dim=0), None
