"""Converters between Hugging Face ``transformers`` models and ours (see ``hf.py``).

``transformers`` is imported only when a conversion runs (it is an optional dependency).

Adding a family (e.g. BERT): write ``interop/hf_bert.py`` with a subclass of
:class:`HFFamily` (or of ``gpt_family.GPTModelFamily`` when the model of ours is a ``GPTModel``)
that maps the config both ways (:class:`Blueprint`), builds both models, and returns its state-dict
mapping from ``key_table(blueprint)``: one :class:`KeyTable` of :class:`KeyRule` (our key pattern,
Hugging Face key pattern, forward transform, inverse transform) and :class:`Alias` (tied keys)
entries, from which both ``state_dict_from_hf`` and ``state_dict_to_hf`` are derived (see
``keymap.py``; ``layouts.py`` has the transform pairs: q/k/v fusion, gate/up, transpose, stacked
experts). Then add one line to ``hf.FAMILY_MODULES``: ``"bert": "megatron_core.interop.hf_bert:BertFamily"``.

Converting without models, tensor by tensor (e.g. a safetensors file)::

    blueprint, table = key_table_from_hf_config(hf_config)      # or family.key_table(family.blueprint_of(model))
    for key, tensor in table.stream(read_tensors(path), "from_hf"):   # ("to_hf" for the other way)
        write(key, tensor)
    table.group("model.layers.0.self_attn.q_proj.weight", "from_hf").hf   # the keys converted together
    table.convert("model.norm.weight", tensor, "from_hf")       # one tensor -> {our key: tensor}
"""

from megatron_core.interop.description import ModelDescription, describe_checkpoint, load_checkpoint
from megatron_core.interop.hf import (
    FAMILY_MODULES,
    blueprint_from_hf_config,
    from_hf,
    get_family,
    key_table_from_hf_config,
    state_dict_from_hf,
    to_hf,
)
from megatron_core.interop.hf_dir import import_hf, load_hf_dir
from megatron_core.interop.hf_export import export_hf
from megatron_core.interop.keymap import Alias, KeyGroup, KeyRule, KeyTable
from megatron_core.interop.registry import (
    Blueprint,
    HFFamily,
    HFInteropError,
    UnsupportedHFConfigError,
    register_family,
)

__all__ = [
    "FAMILY_MODULES",
    "Alias",
    "KeyGroup",
    "KeyRule",
    "KeyTable",
    "Blueprint",
    "HFFamily",
    "HFInteropError",
    "ModelDescription",
    "UnsupportedHFConfigError",
    "blueprint_from_hf_config",
    "describe_checkpoint",
    "export_hf",
    "import_hf",
    "load_checkpoint",
    "load_hf_dir",
    "from_hf",
    "get_family",
    "key_table_from_hf_config",
    "register_family",
    "state_dict_from_hf",
    "to_hf",
]
