"""T5: an encoder-decoder language model with relative position bias."""

from megatron_core.models.t5.t5_model import T5Model

__all__ = ["T5Model"]
