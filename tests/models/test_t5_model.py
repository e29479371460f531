"""T5Model: causality, padding, encoder reuse, loss, head scaling, stacks of different depth, learned positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_core.models.t5 import T5Model
from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec, t5_config

VOCAB, B, S_ENC, S_DEC = 40, 2, 9, 6


def build(version: str = "1.0", encoder_layers: int = 2, **model_kwargs) -> T5Model:
    cfg = t5_config(version, num_layers=2, hidden_size=32, num_attention_heads=4, kv_channels=8, ffn_hidden_size=48,
                    hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.2)
    encoder_cfg = cfg.model_copy(update={"num_layers": encoder_layers})
    model = T5Model(cfg, get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=16, encoder_config=encoder_cfg, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16, **model_kwargs)
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    enc_mask = torch.ones(B, S_ENC, dtype=torch.long)
    enc_mask[1, 5:] = 0
    return {"enc": torch.randint(0, VOCAB, (B, S_ENC)), "dec": torch.randint(0, VOCAB, (B, S_DEC)), "mask": enc_mask}


def test_structure_follows_the_specs():
    model = build("1.1", encoder_layers=3)
    keys = set(model.state_dict())
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 2
    assert "decoder.layers.1.cross_attention.linear_kv.weight" in keys
    assert not any("cross_attention" in k for k in keys if k.startswith("encoder."))
    assert {"encoder_relative_pos_emb.relative_attention_bias.weight", "decoder.final_layernorm.weight"} <= keys
    assert not any(k.endswith(".bias") for k in keys)  # RMSNorm and linears without biases
    assert model.decoder.layers[0].mlp.linear_fc1.weight.shape == (2 * 48, 32)  # [gate; up]
    assert model.share_embeddings_and_output_weights and model.scale_decoder_outputs


def test_decoder_is_causal_and_encoder_padding_is_ignored():
    model = build()
    x = batch()
    with torch.no_grad():
        logits = model(x["enc"], x["dec"], x["mask"])
        future = x["dec"].clone()
        future[:, 4:] = (future[:, 4:] + 1) % VOCAB
        assert torch.equal(model(x["enc"], future, x["mask"])[:, :4], logits[:, :4])
        padded = x["enc"].masked_fill(x["mask"] == 0, 3)
        torch.testing.assert_close(model(padded, x["dec"], x["mask"]), logits, atol=1e-6, rtol=0)


def test_reused_encoder_output_and_loss():
    model = build("1.1")
    x = batch()
    with torch.no_grad():
        logits = model(x["enc"], x["dec"], x["mask"])
        encoded = model.encode(x["enc"], x["mask"])
        assert torch.equal(model(None, x["dec"], x["mask"], encoder_hidden_states=encoded), logits)
        labels = torch.randint(0, VOCAB, (B, S_DEC))
        loss = model(x["enc"], x["dec"], x["mask"], lm_labels=labels)
    want = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").reshape(B, S_DEC)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_tied_head_is_scaled_by_inverse_sqrt_hidden():
    model = build()
    x = batch()
    with torch.no_grad():
        scaled = model(x["enc"], x["dec"], x["mask"])
        model.scale_decoder_outputs = False
        torch.testing.assert_close(scaled, model(x["enc"], x["dec"], x["mask"]) * 32 ** -0.5, atol=1e-6, rtol=1e-5)
    assert not build(share_embeddings_and_output_weights=False).scale_decoder_outputs


def test_learned_absolute_positions_against_hugging_face_fed_embeddings():
    """Learned positions: word + position embedding into both stacks, no relative bias anywhere.

    Reference: Hugging Face's T5 holding the same weights with a zero relative bias, fed
    ``inputs_embeds = word[ids] + pos[0..s)`` for the encoder and the decoder.
    """
    from megatron_core.interop import to_hf

    learned = build(position_embedding_type="learned_absolute")
    keys = set(learned.state_dict())
    assert "embedding.position_embeddings.weight" in keys and not any("relative" in k for k in keys)
    with torch.no_grad():  # norms start at 1: make them matter; positions large enough to move the logits
        for p in learned.parameters():
            if p.ndim < 2:
                p.add_(0.2 * torch.randn_like(p))
        learned.embedding.position_embeddings.weight.normal_(0, 0.5)
    relative = build()
    state = {k: v for k, v in learned.state_dict().items() if "position_embeddings" not in k}
    state.update({k: torch.zeros_like(v) for k, v in relative.state_dict().items() if "relative" in k})
    relative.load_state_dict(state, strict=True)
    hf = to_hf(relative).eval()
    x = batch()
    table, word = learned.embedding.position_embeddings.weight, hf.shared.weight
    with torch.no_grad():
        got = learned(x["enc"], x["dec"], x["mask"])
        want = hf(inputs_embeds=word[x["enc"]] + table[:S_ENC], attention_mask=x["mask"],
                  decoder_inputs_embeds=word[x["dec"]] + table[:S_DEC]).logits
        without_positions = hf(input_ids=x["enc"], attention_mask=x["mask"], decoder_input_ids=x["dec"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - without_positions).abs().max() > 0.1  # the positions do change the logits


def test_refused_settings():
    cfg = t5_config(num_layers=1, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=2,
                    sequence_parallel=True)
    with pytest.raises(NotImplementedError, match="sequence_parallel"):
        T5Model(cfg, get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec(), VOCAB, 16)
    with pytest.raises(ValueError, match="position_embedding_type='rope'"):
        build(position_embedding_type="rope")
    with pytest.raises(ValueError, match="needs encoder_input_ids or encoder_hidden_states"):
        build()(None, batch()["dec"], None)
