"""``import-mcore``: Megatron-Core 0.19.2's torch_dist checkpoint (saved at TP=2) -> ours -> its logits."""

import argparse
import pickle
import shutil

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.interop.__main__ import main
from megatron_core.interop.description import load_checkpoint
from megatron_core.interop.mcore_import import description_from_args
from megatron_core.interop.torch_dist import TorchDistCheckpoint, TorchDistError
from megatron_core.testing import run_distributed
from tests.paths import MCORE_TORCH_DIST_FIXTURE

REFERENCE = torch.load(MCORE_TORCH_DIST_FIXTURE / "reference.pt", weights_only=True)
RUN_YAML = """\
transformer: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, ffn_hidden_size: 128,
              hidden_dropout: 0.0, attention_dropout: 0.0, layernorm_epsilon: 1.0e-5}
spec: specs.gpt.get_gpt_layer_local_spec
model: {position_embedding_type: learned_absolute, share_embeddings_and_output_weights: true}
data: {seq_length: 16}
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcore")
    (tmp / "run.yaml").write_text(RUN_YAML)
    assert main(["import-mcore", str(MCORE_TORCH_DIST_FIXTURE / "checkpoint"), str(tmp / "ckpt"),
                 "--config", str(tmp / "run.yaml")]) == 0
    return tmp / "ckpt"


def _logits(model):
    with torch.no_grad():
        return model(REFERENCE["tokens"], REFERENCE["position_ids"], None)


def test_imported_weights_are_megatrons_bit_for_bit_and_give_its_logits(imported):
    model, description = load_checkpoint(imported)  # no arguments: the checkpoint describes its model
    assert description.model_kwargs["vocab_size"] == 128 and description.config["num_layers"] == 2
    state = model.state_dict()
    for key, tensor in REFERENCE["state_dict"].items():
        assert torch.equal(state[key], tensor), key
    torch.testing.assert_close(_logits(model), REFERENCE["logits"], rtol=0, atol=2e-6)


def _tp2_logits(checkpoint):
    parallel_state.initialize_model_parallel(2)
    model, _ = load_checkpoint(checkpoint)
    local = _logits(model)  # [b, s, vocab / 2]
    parts = [torch.empty_like(local) for _ in range(2)]
    torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def test_imported_checkpoint_loads_at_tp2(imported, tmp_path):
    logits = run_distributed(_tp2_logits, 2, imported, tmp_dir=tmp_path)
    torch.testing.assert_close(logits[0], REFERENCE["logits"], rtol=0, atol=2e-6)


def test_metadata_pickle_naming_other_classes_is_refused(tmp_path):
    shutil.copytree(MCORE_TORCH_DIST_FIXTURE / "checkpoint", tmp_path / "ckpt")

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from the checkpoint",))

    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TorchDistError, match=r"builtins.print, which is not a checkpoint-description class"):
        TorchDistCheckpoint(tmp_path / "ckpt")


def test_unmappable_keys_are_listed(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN_YAML.replace("num_layers: 2", "num_layers: 2, add_bias_linear: false"))
    with pytest.raises(TorchDistError, match=r"linear_proj.bias -> decoder.layers.0.self_attention.linear_proj.bias"):
        main(["import-mcore", str(MCORE_TORCH_DIST_FIXTURE / "checkpoint"), str(tmp_path / "ckpt"),
              "--config", str(tmp_path / "run.yaml")])


def test_without_args_or_config_the_error_says_what_to_pass(tmp_path):
    with pytest.raises(TorchDistError, match="pass --config RUN.yaml"):
        main(["import-mcore", str(MCORE_TORCH_DIST_FIXTURE / "checkpoint"), str(tmp_path / "ckpt")])
    with pytest.raises(TorchDistError, match="no .metadata file"):
        main(["import-mcore", str(tmp_path), str(tmp_path / "ckpt")])


def test_megatron_lm_args_describe_the_model():
    args = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                              kv_channels=16, group_query_attention=True, num_query_groups=2,
                              normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, add_bias_linear=False,
                              add_qkv_bias=False, max_position_embeddings=4096, seq_length=2048,
                              position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                              rotary_base=500000, rotary_percent=1.0)
    description = description_from_args(vars(args), vocab_size=256)
    config = description.transformer_config()
    assert (config.num_query_groups, config.normalization, config.gated_linear_unit) == (2, "RMSNorm", True)
    assert description.model_kwargs == {"vocab_size": 256, "max_sequence_length": 4096,
                                        "position_embedding_type": "rope",
                                        "share_embeddings_and_output_weights": False,
                                        "rotary_base": 500000, "rotary_percent": 1.0}
