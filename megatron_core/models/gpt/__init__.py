"""GPT: a decoder-only language model built from a layer spec."""

from megatron_core.models.gpt.gpt_model import GPTModel

__all__ = ["GPTModel"]
