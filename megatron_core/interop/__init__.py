"""Converters between Hugging Face ``transformers`` models and ours (see ``hf.py``).

``transformers`` is imported only when a conversion runs (it is an optional dependency).
"""

from megatron_core.interop.hf import (
    FAMILY_MODULES,
    blueprint_from_hf_config,
    from_hf,
    get_family,
    state_dict_from_hf,
    to_hf,
)
from megatron_core.interop.registry import (
    Blueprint,
    HFFamily,
    HFInteropError,
    UnsupportedHFConfigError,
    register_family,
)

__all__ = [
    "FAMILY_MODULES",
    "Blueprint",
    "HFFamily",
    "HFInteropError",
    "UnsupportedHFConfigError",
    "blueprint_from_hf_config",
    "from_hf",
    "get_family",
    "register_family",
    "state_dict_from_hf",
    "to_hf",
]
