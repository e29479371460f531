"""Every position scheme in one place, used by the transformer, the models and the ``nn`` facade.

==========================  =================================================================
module                      what it holds
==========================  =================================================================
``learned``                 ``LearnedPositionEmbedding``: a trained table added to the tokens
                            (GPT-2/BERT ``learned_absolute``; the ``nn`` facade's ``"learned"``)
``sinusoidal``              ``SinusoidalPositionEmbedding``: fixed sin/cos vectors added to the tokens
``rotary``                  ``RotaryEmbedding`` angles and ``apply_rotary_pos_emb`` on q and k (RoPE)
``relative``                ``relative_position_bucket`` (the one bucket function),
                            ``RelativePositionBias`` / ``RelativePositionEmbedding``: T5's bias on
                            the attention scores
``causal``                  ``causal_mask``: which keys a query may see, with its alignment
                            (bottom-right / top-left when ``sq != sk``) documented
==========================  =================================================================
"""

from megatron_core.transformer.positions.causal import CausalAlignment, causal_mask
from megatron_core.transformer.positions.learned import LearnedPositionEmbedding, replicated_table
from megatron_core.transformer.positions.relative import (
    RelativePositionBias,
    RelativePositionEmbedding,
    relative_position_bucket,
)
from megatron_core.transformer.positions.rotary import RotaryEmbedding, apply_rotary_pos_emb
from megatron_core.transformer.positions.sinusoidal import SinusoidalPositionEmbedding, sinusoidal_table

__all__ = [
    "CausalAlignment",
    "LearnedPositionEmbedding",
    "RelativePositionBias",
    "RelativePositionEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionEmbedding",
    "apply_rotary_pos_emb",
    "causal_mask",
    "relative_position_bucket",
    "replicated_table",
    "sinusoidal_table",
]
