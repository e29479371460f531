"""GPT-J: ``GPTModel`` with a parallel attention + MLP layer, partial interleaved rotary and a biased head.

What makes a GPT a GPT-J, and where each choice lives:

* the layer ``x + attn(ln(x)) + mlp(ln(x))``: ``ParallelAttentionMLPLayer`` in the spec (one
  ``input_layernorm`` shared by both branches; ``pre_mlp_layernorm`` left empty);
* no biases on q/k/v and the output projection, biases on the MLP: ``add_bias_linear=True`` in the
  config, and bias-free linears in the attention slots of the spec;
* rotary on the first ``rotary_dim`` channels of each head, pairs ``(2i, 2i+1)``:
  ``rotary_interleaved=True`` in the config, ``rotary_percent = rotary_dim / head_dim`` in the model;
* untied head with a bias: ``share_embeddings_and_output_weights=False, output_layer_bias=True``.

Example:
    >>> from megatron_core.models.gpt import GPTModel
    >>> from specs.gptj import GPTJ_MODEL_KWARGS, get_gptj_layer_local_spec, gptj_config
    >>> config = gptj_config(num_layers=2, hidden_size=64, num_attention_heads=4)
    >>> model = GPTModel(config, get_gptj_layer_local_spec(), vocab_size=128, max_sequence_length=32,
    ...                  rotary_percent=0.5, **GPTJ_MODEL_KWARGS)
"""

from __future__ import annotations

from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.norms import WrappedNorm
from megatron_core.transformer.parallel_attention_mlp_layer import ParallelAttentionMLPLayer
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayerSubmodules
from specs.gpt import get_mlp_local_spec

# GPTModel arguments that make a GPT a GPT-J (rotary_percent depends on the sizes: rotary_dim / head_dim).
GPTJ_MODEL_KWARGS: dict[str, Any] = {
    "position_embedding_type": "rope",
    "share_embeddings_and_output_weights": False,
    "output_layer_bias": True,
    "rotary_base": 10000,
}


class BiasFreeColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` that never has a bias, whatever ``config.add_bias_linear`` asks.

    A slot filler for models whose attention has no biases while their MLP does (GPT-J).
    """

    def __init__(self, input_size: int, output_size: int, /, *, bias: bool = False, **kwargs: Any) -> None:
        del bias  # the point of this class
        super().__init__(input_size, output_size, bias=False, **kwargs)


class BiasFreeRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` that never has a bias (see ``BiasFreeColumnParallelLinear``)."""

    def __init__(self, input_size: int, output_size: int, /, *, bias: bool = False, **kwargs: Any) -> None:
        del bias
        super().__init__(input_size, output_size, bias=False, **kwargs)


def get_gptj_layer_local_spec() -> ModuleSpec:
    """The GPT-J layer from local kernels: causal bias-free attention and a biased MLP, in parallel.

    Returns:
        A ``ModuleSpec`` of ``ParallelAttentionMLPLayer`` for ``GPTModel(config, spec, ...)``.
    """
    return ModuleSpec(
        module=ParallelAttentionMLPLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=BiasFreeColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=BiasFreeRowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,  # the MLP reads input_layernorm's output
            mlp=get_mlp_local_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def gptj_config(**overrides: Any) -> TransformerConfig:
    """A TransformerConfig with GPT-J's defaults; any field can be overridden.

    Defaults: LayerNorm (eps 1e-5), tanh-GELU (``gelu_new``), MLP biases, interleaved rotary, no
    dropout, unscaled output-layer init.
    """
    fields: dict[str, Any] = dict(
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        activation_func="gelu_tanh",
        add_bias_linear=True,
        rotary_interleaved=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_scaled_init_method=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
