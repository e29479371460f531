"""BERT: a bidirectional encoder with masked-LM and next-sentence heads."""

from megatron_core.models.bert.bert_model import BertModel

__all__ = ["BertModel"]
