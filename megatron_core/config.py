"""TransformerConfig: the validated description of *how big* a transformer is and *how it behaves*.

Field names follow Megatron-Core where one exists. Derived values (``ffn_hidden_size``,
``kv_channels``, ``num_query_groups``) are filled in at construction, never required twice.
Every invalid combination fails at construction with a message naming the field, the value
and the fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from megatron_core.activations import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    activation_by_name,
    name_of_activation,
)
from megatron_core.config_fp8 import validate_fp8
from megatron_core.config_moe import validate_moe

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _fail(field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {why}. Fix: {fix}")


class TransformerConfig(BaseModel):
    """Sizes, behaviour and parallel layout of a transformer.

    Example:
        >>> cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
        >>> cfg.ffn_hidden_size, cfg.kv_channels, cfg.num_query_groups
        (256, 16, 4)
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=False, arbitrary_types_allowed=True)

    # ---- model size
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    # Derived when left unset (None): after construction they always hold an int, which is what
    # the type checker is told; pydantic reads the runtime annotations, which accept None.
    if TYPE_CHECKING:
        num_query_groups: int = 0
        ffn_hidden_size: int = 0
        kv_channels: int = 0
    else:
        num_query_groups: int | None = None
        ffn_hidden_size: int | None = None
        kv_channels: int | None = None

    # ---- behaviour
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_position: Literal["pre", "post"] = "pre"
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    gated_linear_unit: bool = False
    activation_func: str = "gelu"
    qk_layernorm: bool = False
    softmax_scale: float | None = None
    attention_softmax_in_fp32: bool = True  # Megatron-Core name; only True (SDPA softmax is fp32), False raises
    rotary_interleaved: bool = False
    init_method_std: float = 0.02
    use_scaled_init_method: bool = True
    perform_initialization: bool = True
    # Megatron-Core's name (default off there); on here: the residual path's bias + dropout + add as one
    # function whose CPU dropout masks come from 16 random bits per element (transformer.bias_dropout_add).
    bias_dropout_fusion: bool = True
    # Megatron-Core's name; on by default here: with labels, the output layer and the loss run in
    # chunks of tokens (tensor_parallel.linear_cross_entropy), never holding the [tokens, vocab] logits.
    cross_entropy_loss_fusion: bool = True
    apply_residual_connection_post_layernorm: bool = False
    use_te_activation_func: bool = False
    # fp32 matmuls of the local linear layers and the fused loss on CPU: "onednn" (oneDNN's matmul,
    # faster than MKL's sgemm on the AVX-512 machines measured) or "torch" (F.linear, bit-equal to torch.nn).
    # Not a CPU fp32 tensor (CUDA, bf16, autocast): F.linear either way.
    cpu_matmul: Literal["onednn", "torch"] = "onednn"

    # ---- parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Context parallelism: the sequence is split over this many ranks (ring attention); each rank
    # holds 2 of 2*CP load-balanced chunks, so the sequence length must be divisible by 2*CP.
    context_parallel_size: int = 1
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    sequence_parallel: bool = False

    # ---- mixture of experts (Megatron-Core names; validated in megatron_core.config_moe)
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_layer_freq: int | list[int] = 1
    moe_router_topk: int = 2
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_expert_capacity_factor: float | None = None
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "allgather"
    moe_grouped_gemm: bool = False
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    expert_model_parallel_size: int = 1

    # ---- precision and memory
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bf16: bool = False
    fp16: bool = False
    # "selective": checkpoint each layer's core attention (scores/probabilities are recomputed);
    # "full": checkpoint whole layers, chosen by recompute_method / recompute_num_layers.
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    # FP8 through Transformer Engine (Megatron-Core names and defaults; validated in megatron_core.config_fp8).
    # Needs the TE spec on a GPU; the training step enters extensions.te_fp8.fp8_context around each forward.
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"

    # ------------------------------------------------------------------ field-level coercion
    @field_validator("activation_func", mode="before")
    @classmethod
    def _activation_to_name(cls, value: Any) -> Any:
        if callable(value):
            name = name_of_activation(value)
            if name is None:
                raise _fail(
                    "activation_func",
                    getattr(value, "__name__", value),
                    "only registered activations can be stored in a config",
                    f"use one of {sorted(ACTIVATIONS) + sorted(GATED_ACTIVATIONS)}, or plug a custom "
                    "activation in through the MLP spec's activation_func slot",
                )
            return name
        return value

    @field_validator("params_dtype", mode="before")
    @classmethod
    def _dtype_to_name(cls, value: Any) -> Any:
        if isinstance(value, torch.dtype):
            for name, dtype in _DTYPES.items():
                if dtype == value:
                    return name
        return value

    # ------------------------------------------------------------------ cross-field validation
    @model_validator(mode="after")
    def _validate_and_derive(self) -> TransformerConfig:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size", "context_parallel_size"):
            value = getattr(self, name)
            if value <= 0:
                raise _fail(name, value, "must be a positive integer", f"set {name} >= 1")
        for name in ("num_query_groups", "ffn_hidden_size", "kv_channels", "recompute_num_layers",
                     "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise _fail(name, value, "must be a positive integer when given", f"set {name} >= 1 or leave it unset")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise _fail(name, value, "a dropout probability must lie in [0, 1)", f"set {name} to e.g. 0.0 or 0.1")
        if self.layernorm_epsilon <= 0:
            raise _fail("layernorm_epsilon", self.layernorm_epsilon, "must be > 0", "use e.g. 1e-5")
        if self.init_method_std <= 0:
            raise _fail("init_method_std", self.init_method_std, "must be > 0", "use e.g. 0.02")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise _fail("softmax_scale", self.softmax_scale, "must be > 0", "leave it unset for 1/sqrt(kv_channels)")

        self._validate_activation()
        self._derive_sizes()
        self._validate_parallel()
        validate_moe(self)
        self._validate_precision()
        validate_fp8(self)
        return self

    def _validate_activation(self) -> None:
        name = self.activation_func
        if name in GATED_ACTIVATIONS:
            # "swiglu" is shorthand: a silu activation with a gated linear unit.
            self.gated_linear_unit = True
        elif name not in ACTIVATIONS:
            raise _fail(
                "activation_func", name, "unknown activation",
                f"use one of {sorted(ACTIVATIONS) + sorted(GATED_ACTIVATIONS)}",
            )

    def _derive_sizes(self) -> None:
        heads = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % heads != 0:
                raise _fail(
                    "hidden_size", self.hidden_size,
                    f"not divisible by num_attention_heads={heads}",
                    "pick hidden_size divisible by num_attention_heads, or set kv_channels explicitly",
                )
            self.kv_channels = self.hidden_size // heads
        if self.num_query_groups is None:
            self.num_query_groups = heads
        if heads % self.num_query_groups != 0:
            raise _fail(
                "num_query_groups", self.num_query_groups,
                f"must divide num_attention_heads={heads}",
                "choose num_query_groups among the divisors of num_attention_heads",
            )
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    def _validate_parallel(self) -> None:
        tp = self.tensor_model_parallel_size
        assert self.num_query_groups is not None and self.ffn_hidden_size is not None
        if self.num_attention_heads % tp != 0:
            raise _fail(
                "num_attention_heads", self.num_attention_heads,
                f"not divisible by tensor_model_parallel_size={tp}",
                "use a tensor_model_parallel_size that divides num_attention_heads",
            )
        if self.num_query_groups % tp != 0:
            raise _fail(
                "num_query_groups", self.num_query_groups,
                f"not divisible by tensor_model_parallel_size={tp}: each TP rank must hold whole query groups",
                "use a tensor_model_parallel_size that divides num_query_groups",
            )
        if self.ffn_hidden_size % tp != 0:
            raise _fail(
                "ffn_hidden_size", self.ffn_hidden_size,
                f"not divisible by tensor_model_parallel_size={tp}",
                "use an ffn_hidden_size that is a multiple of tensor_model_parallel_size",
            )
        if self.sequence_parallel and tp == 1:
            raise _fail(
                "sequence_parallel", True, "sequence parallelism splits along tensor-parallel ranks",
                "set tensor_model_parallel_size > 1 or sequence_parallel=False",
            )
        self._validate_pipeline_split()
        self._validate_recompute()

    def _validate_recompute(self) -> None:
        """Megatron-Core's rules: ``full`` needs a method and a layer count, ``selective`` takes neither."""
        granularity, method, count = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is None:
            if method is not None or count is not None:
                raise _fail(
                    "recompute_method" if method is not None else "recompute_num_layers", method or count,
                    "recompute settings given without recompute_granularity",
                    "set recompute_granularity='full' (or remove the setting)",
                )
        elif granularity == "selective":
            if method is not None or count is not None:
                raise _fail(
                    "recompute_method" if method is not None else "recompute_num_layers", method or count,
                    "recompute_granularity='selective' recomputes the core attention of every layer; it takes "
                    "no recompute_method / recompute_num_layers",
                    "unset them, or use recompute_granularity='full'",
                )
        else:
            if method is None:
                raise _fail(
                    "recompute_method", None, "recompute_granularity='full' needs to know which layers to recompute",
                    "set recompute_method='uniform' (chunks of recompute_num_layers layers) or 'block' (the first "
                    "recompute_num_layers layers of each pipeline stage)",
                )
            if count is None or count > self.num_layers:
                raise _fail(
                    "recompute_num_layers", count,
                    f"recompute_granularity='full' needs 1 <= recompute_num_layers <= num_layers={self.num_layers}",
                    "set recompute_num_layers (uniform: layers per recomputed chunk; block: recomputed layers per "
                    "pipeline stage)",
                )

    def _validate_pipeline_split(self) -> None:
        pp = self.pipeline_model_parallel_size
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if pp == 1:
            if first is not None or last is not None:
                raise _fail(
                    "num_layers_in_first_pipeline_stage", first if first is not None else last,
                    "stage overrides need pipeline_model_parallel_size > 1",
                    "unset the override or raise pipeline_model_parallel_size",
                )
            return
        remaining_layers = self.num_layers - (first or 0) - (last or 0)
        remaining_stages = pp - (first is not None) - (last is not None)
        if remaining_layers < 0 or (remaining_stages == 0 and remaining_layers != 0):
            raise _fail(
                "num_layers_in_first_pipeline_stage", (first, last),
                f"first/last stage layers do not add up to num_layers={self.num_layers} over {pp} stages",
                "make the overrides sum with the middle stages to num_layers",
            )
        if remaining_stages > 0 and remaining_layers % remaining_stages != 0:
            field = "num_layers" if first is None and last is None else "num_layers_in_first_pipeline_stage"
            raise _fail(
                field, self.num_layers,
                f"{remaining_layers} layers cannot be split evenly over {remaining_stages} pipeline stages "
                f"(pipeline_model_parallel_size={pp})",
                "make num_layers divisible by pipeline_model_parallel_size, or set "
                "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage",
            )

    def _validate_precision(self) -> None:
        if self.bf16 and self.fp16:
            raise _fail("bf16", True, "bf16 and fp16 are both set", "choose one of bf16=True or fp16=True")
        if not self.attention_softmax_in_fp32:
            # Megatron-Core's name, kept so its configs load; SDPA computes the softmax of bf16/fp16 inputs in
            # fp32 (tests/transformer/test_attention.py measures it), so there is no half-precision softmax to select.
            raise _fail("attention_softmax_in_fp32", False, "the attention core always computes the softmax in fp32",
                        "leave attention_softmax_in_fp32=True")

    # ------------------------------------------------------------------ derived, read-only views
    @property
    def torch_dtype(self) -> torch.dtype:
        """``params_dtype`` as a ``torch.dtype``."""
        return _DTYPES[self.params_dtype]

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The elementwise activation callable (for gated names, the gate's function)."""
        return activation_by_name(self.activation_func)

    @property
    def init_method(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Normal(0, init_method_std) initialiser for every weight but the output projections."""
        std = self.init_method_std
        return lambda tensor: torch.nn.init.normal_(tensor, mean=0.0, std=std)

    @property
    def output_layer_init_method(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Initialiser of the projections that write into the residual stream (linear_proj, fc2).

        Scaled by 1/sqrt(2 * num_layers) when ``use_scaled_init_method`` (GPT-2's recipe).
        """
        std = self.init_method_std
        if self.use_scaled_init_method:
            std = std / math.sqrt(2.0 * self.num_layers)
        return lambda tensor: torch.nn.init.normal_(tensor, mean=0.0, std=std)

    @property
    def query_projection_size(self) -> int:
        """Width of all query heads together (num_attention_heads * kv_channels)."""
        assert self.kv_channels is not None
        return self.num_attention_heads * self.kv_channels

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        """JSON text of every field (derived ones included); ``from_json`` reads it back."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> TransformerConfig:
        return cls.model_validate(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> TransformerConfig:
        """Read YAML text, or a path to a YAML file."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or (len(text) < 4096 and "\n" not in text and Path(text).is_file()):
            text = Path(text_or_path).read_text()
        return cls.model_validate(yaml.safe_load(text))
