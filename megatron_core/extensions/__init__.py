"""Optional kernel backends. Nothing here imports Transformer Engine at package import time.

* ``te_usability``: is TE usable here (TE imports and a CUDA GPU is present), and the clear error when not;
* ``te_key_map``: ``state_dict()`` names of a TE spec model <-> the local spec's (pure functions);
* ``transformer_engine``: the TE wrappers (importable only where TE is usable).
"""
