"""Enumerations shared by the transformer modules and specs."""

from __future__ import annotations

import enum


class AttnMaskType(enum.Enum):
    """How attention is masked: the mask kind a spec asks an attention core for."""

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4
    arbitrary = 5


class LayerType(enum.Enum):
    encoder = 1
    decoder = 2


class ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2
