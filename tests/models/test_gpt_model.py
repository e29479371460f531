"""GPTModel: outputs, variants, spec errors, KV-cache decoding, sharded keys, and a training run."""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron_core.inference.inference_params import InferenceParams
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import RowParallelLinear
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.spec_utils import ModuleSpec, SpecError
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec, llama_config

S, B, VOCAB = 12, 2, 64


def _gpt_config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _llama(**model_kwargs) -> GPTModel:
    cfg = llama_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48)
    return GPTModel(cfg, get_llama_layer_local_spec(), VOCAB, 32, **{**LLAMA_MODEL_KWARGS, **model_kwargs})


def _batch(s: int = S):
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (B, s), generator=g), torch.arange(s).expand(B, s)


def test_logits_loss_and_variants():
    ids, pos = _batch()
    model = GPTModel(_gpt_config(), get_gpt_layer_local_spec(), VOCAB, S)
    logits = model(ids, pos, None)
    assert logits.shape == (B, S, VOCAB)
    loss = model(ids, pos, None, labels=ids)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, expected.view(B, S))
    # Tied: the output layer has no weight of its own and reads the embedding table.
    assert model.output_layer.weight is None and "output_layer.weight" not in model.state_dict()
    assert model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight
    # Precomputed embeddings give the same logits.
    torch.testing.assert_close(model(None, None, None, decoder_input=model.embedding(ids, pos)), logits)

    partial = GPTModel(_gpt_config(), get_gpt_layer_local_spec(), VOCAB, S, position_embedding_type="rope",
                       rotary_percent=0.5, rotary_base=500)
    assert partial.rotary_pos_emb(S).shape == (S, 1, 1, 4)
    assert partial(ids, None, None).shape == (B, S, VOCAB)


def test_no_position_embedding_against_hugging_face_gpt2_without_positions():
    """``position_embedding_type="none"``, untied: Hugging Face's GPT-2 with the same weights and a zero
    position table is the reference (norms and biases perturbed so that every tensor matters)."""
    transformers = pytest.importorskip("transformers")
    from megatron_core.interop import from_hf

    hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=S, n_embd=32, n_layer=2, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                        activation_function="gelu_new", initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim < 2:
                p.add_(0.2 * torch.randn_like(p))
        hf.transformer.wpe.weight.zero_()
    learned = from_hf(hf)
    ours = GPTModel(learned.config, get_gpt_layer_local_spec(), VOCAB, S, share_embeddings_and_output_weights=False,
                    position_embedding_type="none").eval()
    keys = ours.state_dict().keys()
    assert "output_layer.weight" in keys and "embedding.position_embeddings.weight" not in keys
    state = {k: v for k, v in learned.state_dict().items() if k != "embedding.position_embeddings.weight"}
    ours.load_state_dict(state, strict=True)
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, None, None), hf(ids).logits, atol=1e-5, rtol=0)


def test_wrong_fc1_constructor_fails_at_build_naming_the_slot():
    class MyFc1(torch.nn.Module):  # lacks the keyword arguments of LinearFc1Builder
        def __init__(self, input_size, output_size, /, *, config, init_method):
            super().__init__()

    spec = get_gpt_layer_local_spec()
    spec.submodules.mlp = ModuleSpec(MLP, submodules=MLPSubmodules(linear_fc1=MyFc1, linear_fc2=RowParallelLinear))
    with pytest.raises(SpecError, match=r"'decoder\.layers\.mlp\.linear_fc1'.*MyFc1"):
        GPTModel(_gpt_config(), spec, VOCAB, S)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_kv_cache_decoding_matches_full_forward(family):
    model = (GPTModel(_gpt_config(), get_gpt_layer_local_spec(), VOCAB, 32) if family == "gpt" else _llama()).eval()
    ids, pos = _batch()
    with torch.no_grad():
        full = model(ids, pos, None)
        params = InferenceParams(max_batch_size=B, max_sequence_length=32)
        steps = [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, S)]  # two prompt chunks, then one token at a time
        pieces = []
        for start, end in steps:
            pieces.append(model(ids[:, start:end], pos[:, start:end], None, inference_params=params))
            params.advance(end - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    key_cache, _ = params.key_value_memory_dict[1]
    assert key_cache.shape == (32, B, 2 if family == "llama" else 4, 8)


def test_sharded_state_dict_keys_and_swiglu_factories():
    model = _llama()
    sharded = model.sharded_state_dict()
    assert sharded.keys() == model.state_dict().keys()
    assert isinstance(sharded["decoder.layers.1.mlp.linear_fc1.weight"], ShardedTensorFactory)
    assert isinstance(sharded["output_layer.weight"], ShardedTensor)
    assert all(v.key == k for k, v in sharded.items())


def _parallel_output_worker() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ps.initialize_model_parallel(2)
    ids, pos = _batch()
    out = []
    for parallel_output in (True, False):
        model_parallel_manual_seed(8)
        cfg = _gpt_config(tensor_model_parallel_size=2)
        model = GPTModel(cfg, get_gpt_layer_local_spec(), VOCAB, S, parallel_output=parallel_output)
        with torch.no_grad():
            out += [model(ids, pos, None), model(ids, pos, None, labels=ids)]
    return tuple(out)


def test_parallel_output_false_gathers_logits_and_keeps_the_loss(tmp_path):
    for rank, (split, loss_split, full, loss_full) in enumerate(run_distributed(_parallel_output_worker, 2,
                                                                                 tmp_dir=tmp_path)):
        assert split.shape == (B, S, VOCAB // 2) and full.shape == (B, S, VOCAB)
        torch.testing.assert_close(full[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2], split)
        torch.testing.assert_close(loss_full, loss_split)


def test_a_few_adamw_steps_reduce_the_loss():
    model_parallel_manual_seed(0)
    model = GPTModel(_gpt_config(hidden_dropout=0.1, attention_dropout=0.1), get_gpt_layer_local_spec(), VOCAB, S)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ids, pos = _batch()
    labels = torch.roll(ids, -1, dims=1)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(ids, pos, None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_same_seed_gives_the_same_weights_in_every_params_dtype(dtype):
    # Every weight is drawn in fp32 and cast, so a bf16 model is the fp32 one rounded (on GPU, torch
    # 2.11 drew a bf16 position table from a different stream before this was enforced).
    torch.manual_seed(3)
    full = GPTModel(_gpt_config(), get_gpt_layer_local_spec(), VOCAB, 32)
    torch.manual_seed(3)
    low = GPTModel(_gpt_config(params_dtype=dtype), get_gpt_layer_local_spec(), VOCAB, 32)
    expected = full.state_dict()
    for name, tensor in low.state_dict().items():
        assert tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name
