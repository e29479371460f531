"""Converters between Hugging Face ``transformers`` models and ours (see ``hf.py``).

``transformers`` is imported only when a conversion runs (it is an optional dependency).

Adding a family (e.g. BERT): write ``interop/hf_bert.py`` with a subclass of
:class:`HFFamily` (or of ``gpt_family.GPTModelFamily`` when the model of ours is a ``GPTModel``)
that maps the config both ways (:class:`Blueprint`), the state dict both ways (use
``layouts.fuse_qkv`` / ``split_qkv`` for the per-group QKV rows and ``registry.KeyTaker`` so that
missing or left-over keys fail loudly), and builds both models; then add one line to
``hf.FAMILY_MODULES``: ``"bert": "megatron_core.interop.hf_bert:BertFamily"``.
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
