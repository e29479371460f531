"""Text generation: the key/value cache (``InferenceParams``), sampling, and the decoding loop."""

from megatron_core.inference.generation import GenerationOutput, gather_vocab_logits, generate
from megatron_core.inference.inference_params import InferenceParams
from megatron_core.inference.sampling import SamplingParams, filter_logits, sample

__all__ = [
    "GenerationOutput",
    "InferenceParams",
    "SamplingParams",
    "filter_logits",
    "gather_vocab_logits",
    "generate",
    "sample",
]
