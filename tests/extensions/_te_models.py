"""Tiny GPT / Llama models built from the local or the TE spec, shared by the CPU and GPU TE tests."""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron_core.models.gpt import GPTModel
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec, llama_config

VOCAB = 64
SEQ = 16
FAMILIES = ("gpt", "llama")


def make_config(family: str, tp: int = 1, **overrides: Any) -> TransformerConfig:
    """GPT: LayerNorm, gelu, biases, MHA. Llama: RMSNorm, SwiGLU, no biases, GQA (4 heads, 2 groups).

    Head dim 16: a multiple of 8, so that on a GPU TE may pick its flash / cuDNN kernels in bf16.
    """
    sizes: dict[str, Any] = dict(num_layers=2, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=tp)
    if family == "gpt":
        fields = dict(sizes, hidden_dropout=0.0, attention_dropout=0.0)
        fields.update(overrides)
        return TransformerConfig(**fields)
    fields = dict(sizes, num_query_groups=2, ffn_hidden_size=64)
    fields.update(overrides)
    return llama_config(**fields)


def layer_spec(family: str, backend: str) -> Any:
    if backend == "local":
        return get_gpt_layer_local_spec() if family == "gpt" else get_llama_layer_local_spec()
    from specs.backends import get_gpt_layer_te_spec, get_llama_layer_te_spec

    return get_gpt_layer_te_spec() if family == "gpt" else get_llama_layer_te_spec()


def build(family: str, backend: str, seed: int, tp: int = 1, device: str = "cpu", **overrides: Any) -> GPTModel:
    """A 2-layer model; the same seed gives the same weights for both backends and any TP."""
    torch.manual_seed(seed)
    kwargs = LLAMA_MODEL_KWARGS if family == "llama" else {}
    model = GPTModel(make_config(family, tp, **overrides), layer_spec(family, backend), vocab_size=VOCAB,
                     max_sequence_length=SEQ, **kwargs)
    return model.to(device)


def batch(seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and position ids ``[2, SEQ]``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(2, SEQ)
    return ids.to(device), positions.to(device)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (norms and biases included) with seeded noise (a TP=1 model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def describe_sharded(sharded: dict[str, Any]) -> dict[tuple[str, int], tuple[Any, ...]]:
    """Checkpoint view of a sharded state dict: per stored key and fragment, where it lies and its data."""
    out: dict[tuple[str, int], tuple[Any, ...]] = {}
    for leaf in sharded.values():
        tensors = leaf.build() if isinstance(leaf, ShardedTensorFactory) else [leaf]
        for i, st in enumerate(tensors):
            assert isinstance(st, ShardedTensor)
            assert st.data is not None
            out[(st.key, i)] = (st.global_shape, st.global_offset, st.axis_fragmentations, st.replica_id,
                                st.dtype, st.data.detach().cpu().clone())
    return out


def same_description(a: dict[tuple[str, int], tuple[Any, ...]], b: dict[tuple[str, int], tuple[Any, ...]]) -> bool:
    """Same keys, placement and bit-identical data."""
    if a.keys() != b.keys():
        return False
    return all(a[k][:-1] == b[k][:-1] and torch.equal(a[k][-1], b[k][-1]) for k in a)
