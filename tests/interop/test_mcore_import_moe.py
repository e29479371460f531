"""``import-mcore`` of a mixture-of-experts checkpoint written by the real Megatron-Core 0.19.2 the way Megatron-LM
saves (its parsed ``args`` in the common state, ``iter_0000001`` + tracker file): no ``--config``, the description
comes from the stored args; router, experts (stored with an expert axis after the layer axis) and the gated shared
expert are mapped; logits equal Megatron-Core's at TP=1 and TP=2. See tests/fixtures/mcore_torch_dist_moe/README.md.
"""

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.interop.__main__ import main
from megatron_core.interop.description import describe_checkpoint, load_checkpoint
from megatron_core.interop.mcore_import import our_names, read_common_state
from megatron_core.interop.torch_dist import OpaqueObject, TorchDistCheckpoint
from megatron_core.testing import run_distributed
from tests.paths import MCORE_TORCH_DIST_MOE_FIXTURE

REFERENCE = torch.load(MCORE_TORCH_DIST_MOE_FIXTURE / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    target = tmp_path_factory.mktemp("mcore_moe") / "ckpt"
    assert main(["import-mcore", str(MCORE_TORCH_DIST_MOE_FIXTURE / "checkpoint"), str(target)]) == 0
    return target


def _logits(tp: int, checkpoint: str) -> torch.Tensor:
    parallel_state.initialize_model_parallel(tp)
    model = load_checkpoint(checkpoint)[0]
    with torch.no_grad():
        out = model(REFERENCE["tokens"], REFERENCE["position_ids"], None)
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        torch.distributed.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def test_megatron_lm_args_are_read_without_megatron(imported):
    common = read_common_state(TorchDistCheckpoint(MCORE_TORCH_DIST_MOE_FIXTURE / "checkpoint" / "iter_0000001"))
    assert common["iteration"] == 1 and common["checkpoint_version"] == 3.0
    args = vars(common["args"])
    assert isinstance(args["attention_backend"], OpaqueObject)  # a Megatron-Core enum, never imported
    config = describe_checkpoint(imported).transformer_config()
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 16)
    assert (config.moe_shared_expert_intermediate_size, config.moe_shared_expert_gate) == (24, True)
    assert (config.num_query_groups, config.normalization, config.gated_linear_unit) == (2, "RMSNorm", True)


def test_moe_logits_equal_megatron_core_at_tp1(imported):
    torch.testing.assert_close(_logits(1, str(imported)), REFERENCE["logits"], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_moe_logits_equal_megatron_core_at_tp2(imported, tmp_path):
    got = run_distributed(_logits, 2, 2, str(imported), tmp_dir=tmp_path)[0]
    torch.testing.assert_close(got, REFERENCE["logits"], rtol=0, atol=2e-5)


def test_expert_key_names():
    stacked = our_names("decoder.layers.mlp.experts.experts.linear_fc2.weight", (2, 3, 8, 4))
    assert stacked[4] == ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", (1, 1))
    assert len(stacked) == 6
    # saved with singleton_local_shards: one key per expert, SequentialMLP or TEGroupedMLP naming
    for key in ("decoder.layers.mlp.experts.experts.3.linear_fc1.weight",
                "decoder.layers.mlp.experts.experts.linear_fc1.weight3"):
        assert our_names(key, (2, 8, 4))[1] == ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", (1,))
