"""``import-mcore`` of a mixture-of-experts checkpoint written by the real Megatron-Core 0.19.2 the way Megatron-LM
saves (its parsed ``args`` in the common state, ``iter_0000001`` + tracker file): no ``--config``, the description
comes from the stored args; router, experts (stored with an expert axis after the layer axis) and the gated shared
expert are mapped; logits equal Megatron-Core's at TP=1 and TP=2. A second checkpoint mixes a dense and an MoE layer
(``--moe-layer-freq [0,1]``: Megatron-Core then stores one key per layer, unstacked). See the fixtures' READMEs.
"""

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.interop.__main__ import main
from megatron_core.interop.description import describe_checkpoint, load_checkpoint
from megatron_core.interop.mcore_import import our_names, read_common_state
from megatron_core.interop.torch_dist import OpaqueObject, TorchDistCheckpoint
from megatron_core.testing import run_distributed
from tests.paths import MCORE_TORCH_DIST_MOE_FIXTURE, MCORE_TORCH_DIST_MOE_MIXED_FIXTURE

FIXTURES = {"stacked": MCORE_TORCH_DIST_MOE_FIXTURE, "mixed": MCORE_TORCH_DIST_MOE_MIXED_FIXTURE}


@pytest.fixture(scope="module", params=list(FIXTURES))
def imported(request, tmp_path_factory):
    """(our checkpoint imported with no --config, Megatron-Core's reference) per fixture."""
    target = tmp_path_factory.mktemp(f"mcore_moe_{request.param}") / "ckpt"
    assert main(["import-mcore", str(FIXTURES[request.param] / "checkpoint"), str(target)]) == 0
    return target, torch.load(FIXTURES[request.param] / "reference.pt", weights_only=True)


def _logits(tp: int, checkpoint: str, reference: dict) -> torch.Tensor:
    parallel_state.initialize_model_parallel(tp)
    model = load_checkpoint(checkpoint)[0]
    with torch.no_grad():
        out = model(reference["tokens"], reference["position_ids"], None)
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        torch.distributed.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def test_megatron_lm_args_are_read_without_megatron(imported):
    checkpoint, _ = imported
    source = describe_checkpoint(checkpoint)
    mixed = source.spec == "specs.gpt.get_gpt_decoder_block_spec"
    common = read_common_state(TorchDistCheckpoint(FIXTURES["mixed" if mixed else "stacked"] / "checkpoint" /
                                                   "iter_0000001"))
    assert common["iteration"] == 1 and common["checkpoint_version"] == 3.0
    assert isinstance(vars(common["args"])["attention_backend"], OpaqueObject)  # a Megatron-Core enum, never imported
    config = source.transformer_config()
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 16)
    assert (config.moe_shared_expert_intermediate_size, config.moe_shared_expert_gate) == (24, True)
    assert (config.num_query_groups, config.normalization, config.gated_linear_unit) == (2, "RMSNorm", True)
    assert config.moe_layer_freq == ([0, 1] if mixed else 1)


def test_moe_logits_equal_megatron_core_at_tp1(imported):
    checkpoint, reference = imported
    torch.testing.assert_close(_logits(1, str(checkpoint), reference), reference["logits"], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_moe_logits_equal_megatron_core_at_tp2(imported, tmp_path):
    checkpoint, reference = imported
    got = run_distributed(_logits, 2, 2, str(checkpoint), reference, tmp_dir=tmp_path)[0]
    torch.testing.assert_close(got, reference["logits"], rtol=0, atol=2e-5)


def test_expert_key_names():
    stacked = our_names("decoder.layers.mlp.experts.experts.linear_fc2.weight", (2, 3, 8, 4))
    assert stacked[4] == ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", (1, 1))
    assert len(stacked) == 6
    # one layer's key (dense and MoE layers mixed): the expert axis comes first
    per_layer = our_names("decoder.layers.1.mlp.experts.experts.linear_fc1.weight", (4, 32, 32))
    assert per_layer[3] == ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", (3,))
    assert our_names("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", (32,)) == [
        ("decoder.layers.0.pre_mlp_layernorm.weight", ())]
    # saved with singleton_local_shards: one key per expert, SequentialMLP or TEGroupedMLP naming
    for key in ("decoder.layers.mlp.experts.experts.3.linear_fc1.weight",
                "decoder.layers.mlp.experts.experts.linear_fc1.weight3"):
        assert our_names(key, (2, 8, 4))[1] == ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", (1,))
