"""megatron_core: a spec-driven, Megatron-Core-style transformer toolkit."""

from megatron_core.config import TransformerConfig

__all__ = ["TransformerConfig"]
__version__ = "0.1.0"
