"""TP parity and checkpoint resharding for the model zoo (BERT, T5, GPT-J): one harness, a case per family.

A *case* (``CASES``) builds a tiny model at the current TP size from the global RNG (TP-invariant
init: the same full weights at any TP) and runs it on fixed inputs (with padding), returning full
(TP-gathered) outputs and a scalar to backpropagate.

Three spawns per case (``check_case``):

1. TP=2: outputs and full gradients; then every weight is overwritten with values drawn from its
   checkpoint key (``truth``), saved with ``dist_checkpointing`` (ckpt2), outputs recomputed.
2. TP=1: the same (the parity reference, ckpt1); then a model built from another seed loads ckpt2
   (TP=2 -> TP=1): every tensor must equal ``truth`` bit for bit, outputs as at TP=2.
3. TP=2: a model built from another seed loads ckpt1 (TP=1 -> TP=2): every shard equals ``truth``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing
from megatron_core import parallel_state as ps
from megatron_core.dist_checkpointing.dict_utils import build_factories, sharded_leaves
from megatron_core.dist_checkpointing.mapping import ShardedTensor
from megatron_core.tensor_parallel.random import model_parallel_manual_seed

B, S_ENC, S_DEC, VOCAB = 2, 12, 10, 64
SEED, OTHER_SEED = 1234, 99
COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
              init_method_std=0.1)


# ----------------------------------------------------------------------------- gathering
def gather_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate this tensor over the TP group along ``dim`` (a copy when TP=1)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim)


def full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The gradient of the whole parameter: TP-split ones gathered, undoing the stride of a gated fc1."""
    assert param.grad is not None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.grad.clone()
    dim, stride = param.partition_dim, param.partition_stride  # type: ignore[attr-defined]
    parts = gather_dim(param.grad, dim).chunk(tp, dim)
    chunks = [p.chunk(stride, dim) for p in parts]
    return torch.cat([torch.cat([c[j] for c in chunks], dim) for j in range(stride)], dim)


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    enc_mask = torch.ones(B, S_ENC, dtype=torch.long)
    enc_mask[1, 8:] = 0  # the second sequence is padded
    dec_mask = torch.ones(B, S_DEC, dtype=torch.long)
    dec_mask[0, 7:] = 0
    return {
        "enc": torch.randint(0, VOCAB, (B, S_ENC), generator=g),
        "dec": torch.randint(0, VOCAB, (B, S_DEC), generator=g),
        "types": torch.randint(0, 2, (B, S_ENC), generator=g),
        "enc_mask": enc_mask,
        "dec_mask": dec_mask,
        "labels_enc": torch.randint(0, VOCAB, (B, S_ENC), generator=g),
        "labels_dec": torch.randint(0, VOCAB, (B, S_DEC), generator=g),
        "w_enc": torch.rand(B, S_ENC, generator=g),
        "w_dec": torch.rand(B, S_DEC, generator=g),
        "g_binary": torch.randn(B, 2, generator=g),
    }


# ----------------------------------------------------------------------------- cases
def _bert(tp: int, prenorm: bool = False, tied: bool = True) -> torch.nn.Module:
    from megatron_core.models.bert import BertModel
    from specs.bert import bert_config, get_bert_layer_local_spec

    position = "pre" if prenorm else "post"
    cfg = bert_config(**{**COMMON, "tensor_model_parallel_size": tp, "layernorm_position": position})
    return BertModel(cfg, get_bert_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=S_ENC,
                     share_embeddings_and_output_weights=tied)


def _run_bert(model: torch.nn.Module, d: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        logits, binary = model(d["enc"], d["enc_mask"], d["types"])
    loss, binary_logits = model(d["enc"], d["enc_mask"], d["types"], lm_labels=d["labels_enc"])
    scalar = (loss * d["w_enc"]).sum() + (binary_logits * d["g_binary"]).sum()
    return {"logits": gather_dim(logits, -1), "binary": binary.clone(), "loss": loss.detach()}, scalar


def _t5(tp: int, version: str, tied: bool) -> torch.nn.Module:
    from megatron_core.models.t5 import T5Model
    from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec, t5_config

    cfg = t5_config(version, **{**COMMON, "kv_channels": 8, "ffn_hidden_size": 48, "tensor_model_parallel_size": tp})
    encoder_cfg = cfg.model_copy(update={"num_layers": 3})  # stacks of different depth, as T5 allows
    return T5Model(cfg, get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec(), vocab_size=VOCAB,
                   max_sequence_length=32, encoder_config=encoder_cfg, share_embeddings_and_output_weights=tied,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _run_t5(model: torch.nn.Module, d: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        logits = model(d["enc"], d["dec"], d["enc_mask"], d["dec_mask"])
    loss = model(d["enc"], d["dec"], d["enc_mask"], d["dec_mask"], lm_labels=d["labels_dec"])
    return {"logits": gather_dim(logits, -1), "loss": loss.detach()}, (loss * d["w_dec"]).sum()


def _gptj(tp: int) -> torch.nn.Module:
    from megatron_core.models.gpt import GPTModel
    from specs.gptj import GPTJ_MODEL_KWARGS, get_gptj_layer_local_spec, gptj_config

    cfg = gptj_config(**{**COMMON, "tensor_model_parallel_size": tp})
    return GPTModel(cfg, get_gptj_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=S_ENC,
                    rotary_percent=0.5, **GPTJ_MODEL_KWARGS)


def _run_gpt(model: torch.nn.Module, d: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    positions = torch.arange(S_ENC).expand(B, S_ENC)
    with torch.no_grad():
        logits = model(d["enc"], positions, None)
    loss = model(d["enc"], positions, None, labels=d["labels_enc"])
    return {"logits": gather_dim(logits, -1), "loss": loss.detach()}, (loss * d["w_enc"]).sum()


Builder = Callable[[int], torch.nn.Module]
Runner = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], torch.Tensor]]
CASES: dict[str, tuple[Builder, Runner]] = {
    "bert": (_bert, _run_bert),
    "bert_prenorm_untied": (lambda tp: _bert(tp, prenorm=True, tied=False), _run_bert),
    "t5_v1.0_tied": (lambda tp: _t5(tp, "1.0", tied=True), _run_t5),
    "t5_v1.1_untied": (lambda tp: _t5(tp, "1.1", tied=False), _run_t5),
    "gptj": (_gptj, _run_gpt),
}


def build(case: str, tp: int, seed: int) -> torch.nn.Module:
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp)
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)
    return CASES[case][0](tp)


# ----------------------------------------------------------------------------- checkpoint truth
def truth(key: str, shape: tuple[int, ...], salt: int = 0) -> torch.Tensor:
    """The value every test checkpoint holds under ``key``: drawn from the key alone (and ``salt``)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + salt)
    return torch.randn(shape, generator=g) * 0.2


def _local_shards(model: torch.nn.Module) -> list[ShardedTensor]:
    leaves = sharded_leaves(build_factories(model.sharded_state_dict()))  # type: ignore[operator]
    return [leaf for _, leaf in leaves if isinstance(leaf, ShardedTensor)]


def fill_with_truth(model: torch.nn.Module, salt: int = 0) -> None:
    """Overwrite every tensor (norms and biases included) with its slice of ``truth(key, shape, salt)``."""
    with torch.no_grad():
        for sh in _local_shards(model):
            assert sh.data is not None
            sh.data.copy_(truth(sh.key, sh.global_shape, salt)[sh.global_slice()].reshape(sh.local_shape))


def mismatches_with_truth(model: torch.nn.Module) -> list[str]:
    """Checkpoint keys whose local shard is not bit-identical to ``truth``."""
    bad = []
    for sh in _local_shards(model):
        assert sh.data is not None
        want = truth(sh.key, sh.global_shape)[sh.global_slice()].reshape(sh.local_shape)
        if not torch.equal(sh.data, want):
            bad.append(sh.key)
    return bad


def load_into(model: torch.nn.Module, path: str) -> None:
    sharded = model.sharded_state_dict()  # type: ignore[operator]
    loaded = dist_checkpointing.load(sharded, path)
    model.load_state_dict(loaded, strict=True)


# ----------------------------------------------------------------------------- spawned workers
def _parity_and_save(case: str, tp: int, path: str) -> dict[str, Any]:
    """Full outputs and grads at this TP; then truth weights, saved to ``path``, and their outputs."""
    d = _data()
    model = build(case, tp, SEED)
    outputs, scalar = CASES[case][1](model, d)
    scalar.backward()
    grads = {name: full_grad(p) for name, p in model.named_parameters()}
    fill_with_truth(model)
    dist_checkpointing.save(model.sharded_state_dict(), path)
    truth_outputs, _ = CASES[case][1](model, d)
    return {"outputs": outputs, "grads": grads, "truth_outputs": truth_outputs}


def _load_and_check(case: str, tp: int, path: str) -> dict[str, Any]:
    """Build from another seed, load ``path`` (saved at another TP), compare every shard with truth."""
    model = build(case, tp, OTHER_SEED)
    fill_with_truth(model, salt=1)  # norms start at 1 and biases at 0 whatever the seed: randomise them too
    before = mismatches_with_truth(model)
    load_into(model, path)
    outputs, _ = CASES[case][1](model, _data())
    return {"mismatches": mismatches_with_truth(model), "mismatches_before": before, "outputs": outputs,
            "keys": [sh.key for sh in _local_shards(model)]}


def tp2_first(case: str, ckpt2: str) -> dict[str, Any]:
    torch.use_deterministic_algorithms(True)
    return _parity_and_save(case, 2, ckpt2)


def tp1_reference_and_load(case: str, ckpt1: str, ckpt2: str) -> dict[str, Any]:
    torch.use_deterministic_algorithms(True)
    result = _parity_and_save(case, 1, ckpt1)
    result["loaded"] = _load_and_check(case, 1, ckpt2)
    return result


def tp2_load(case: str, ckpt1: str) -> dict[str, Any]:
    return _load_and_check(case, 2, ckpt1)


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, relative: bool = False) -> float:
    """Max |got - want| over all entries; ``relative`` divides each by max(1, max |want|) of its tensor.

    Gradients are sums over every token and reach ~10 for the embedding table: float rounding then
    moves them by ~1e-6 of their size, so they are compared relative to their scale.
    """
    assert got.keys() == want.keys(), f"{what}: {sorted(set(got) ^ set(want))}"
    worst = 0.0
    for key, value in got.items():
        assert value.shape == want[key].shape, f"{what}/{key}: {tuple(value.shape)} vs {tuple(want[key].shape)}"
        scale = max(1.0, want[key].abs().max().item()) if relative else 1.0
        worst = max(worst, (value - want[key]).abs().max().item() / scale)
    return worst


def check_case(case: str, tmp_path: Any, atol: float = 1e-5) -> dict[str, float]:
    """Run the three spawns of ``case``; assert parity and bit-exact resharding; return the max diffs."""
    from megatron_core.testing import run_distributed

    ckpt1, ckpt2 = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    tp2 = run_distributed(tp2_first, 2, case, ckpt2, tmp_dir=tmp_path)
    ref = run_distributed(tp1_reference_and_load, 1, case, ckpt1, ckpt2, tmp_dir=tmp_path)[0]
    back = run_distributed(tp2_load, 2, case, ckpt1, tmp_dir=tmp_path)
    diffs = {"outputs": 0.0, "grads": 0.0, "resharded outputs": 0.0}
    for rank, got in enumerate(tp2):
        diffs["outputs"] = max(diffs["outputs"], _max_diff(got["outputs"], ref["outputs"], f"{case} rank{rank}"))
        diffs["grads"] = max(diffs["grads"], _max_diff(got["grads"], ref["grads"], f"{case} grads rank{rank}",
                                                         relative=True))
        diffs["resharded outputs"] = max(diffs["resharded outputs"], _max_diff(
            got["truth_outputs"], ref["loaded"]["outputs"], f"{case} TP2->TP1 outputs"))
    for what, value in diffs.items():
        assert value <= atol, f"{case}: TP=2 vs TP=1 {what} differ by {value:.3g} > {atol}"
    loaded = ref["loaded"]
    assert loaded["mismatches_before"] == loaded["keys"], "every tensor of the reloaded model must start elsewhere"
    assert ref["loaded"]["mismatches"] == [], f"{case} TP=2 -> TP=1: not bit-exact: {ref['loaded']['mismatches']}"
    for rank, got in enumerate(back):
        assert got["mismatches_before"] == got["keys"] and got["mismatches"] == [], f"{case} TP=1 -> TP=2 rank {rank}: {got['mismatches']}"
        diffs["resharded outputs"] = max(diffs["resharded outputs"], _max_diff(
            got["outputs"], ref["truth_outputs"], f"{case} TP1->TP2 outputs"))
    assert diffs["resharded outputs"] <= atol
    print(f"[zoo] {case}: TP=2 vs TP=1 max |diff| outputs {diffs['outputs']:.3g}, grads {diffs['grads']:.3g}; "
          f"resharded outputs {diffs['resharded outputs']:.3g}; weights bit-exact")
    return diffs
