"""load_hf_dir at TP=2: each rank reads only its part of every TP-split tensor, also of those that are fused
or reshaped on the way (q/k/v, gate/up, GPT-2's transposed Conv1D weights, T5's k/v), and gets HF's logits;
at expert-parallel size 2 each rank reads only its experts (and load_checkpoint works there too).

What a rank reads is recorded under safetensors itself: ``safe_open`` is wrapped so that every
``get_slice(key)[box]`` and ``get_tensor(key)`` adds the bytes it returns.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedTensor
from megatron_core.interop.__main__ import main
from megatron_core.interop.description import build_model, describe, load_checkpoint
from megatron_core.interop.hf_dir import HFDirectory, _blueprint_and_table, _local_box, load_hf_dir
from megatron_core.testing import run_distributed
from tests.interop.test_hf_dir import _hf_model, hf_logits, ours_logits

safetensors = pytest.importorskip("safetensors")

TP = 2


class _Recorded:
    """A safe_open handle that adds the bytes of every tensor it returns to ``reads[key]``."""

    def __init__(self, handle, reads: dict[str, int], whole: list[str]) -> None:
        self._handle, self._reads, self._whole = handle, reads, whole

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(key)
        self._whole.append(key)
        self._reads[key] += tensor.numel() * tensor.element_size()
        return tensor

    def get_slice(self, key: str):
        recorded = self

        class _Slice:
            def __init__(self, inner) -> None:
                self._inner = inner

            def __getattr__(self, name):  # get_shape, get_dtype
                return getattr(self._inner, name)

            def __getitem__(self, box) -> torch.Tensor:
                tensor = self._inner[box]
                recorded._reads[key] += tensor.numel() * tensor.element_size()
                return tensor

        return _Slice(self._handle.get_slice(key))


def _split_hf_keys(hf_dir: str) -> set[str]:
    """The Hugging Face keys feeding a tensor of ours that is TP-split (built on meta at the current TP)."""
    blueprint, table = _blueprint_and_table(HFDirectory(hf_dir), None)
    with torch.device("meta"):
        model = build_model(describe(blueprint))
    split = set()
    for key, leaf in model.sharded_state_dict().items():
        if key.endswith("_extra_state"):
            continue
        if not isinstance(leaf, ShardedTensor) or tuple(leaf.local_shape) != tuple(
                leaf.global_shape[leaf.prepend_axis_num:]):
            split.update(table.group(key, "to_hf").hf)
    return split


def _load_recording(family: str, hf_dir: str) -> tuple[torch.Tensor, dict[str, int], list[str], set[str], dict]:
    parallel_state.initialize_model_parallel(TP)
    reads: dict[str, int] = defaultdict(int)
    whole: list[str] = []
    real = safetensors.safe_open
    safetensors.safe_open = lambda *a, **k: _Recorded(real(*a, **k), reads, whole)
    try:
        model = load_hf_dir(hf_dir)
    finally:
        safetensors.safe_open = real
    sizes = {}
    hf = HFDirectory(hf_dir)
    for key in hf.weight_map:
        shape = hf.shape(key)
        sizes[key] = shape.numel() * torch.tensor([], dtype=hf.dtype).element_size()
    return ours_logits(family, model), dict(reads), whole, _split_hf_keys(hf_dir), sizes


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "qwen2_moe"])
def test_load_hf_dir_reads_only_its_slices(family, tmp_path):
    hf = _hf_model(family)
    want = hf_logits(family, hf)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    results = run_distributed(_load_recording, TP, family, str(tmp_path / "hf"), tmp_dir=tmp_path)
    split, sizes = results[0][3], results[0][4]
    assert split, "no TP-split tensor: the test would prove nothing"
    for rank, (logits, reads, whole, _, _) in enumerate(results):
        torch.testing.assert_close(logits, want, rtol=0, atol=2e-5, msg=f"{family} load_hf_dir TP={TP} rank {rank}")
        assert not [k for k in whole if k in split], f"rank {rank} read TP-split tensors whole: {whole}"
        wrong = {k: (reads.get(k, 0), sizes[k]) for k in split if reads.get(k, 0) != sizes[k] // TP}
        assert not wrong, f"rank {rank}: bytes read != 1/{TP} of the tensor (read, size): {wrong}"
        split_read = sum(reads.get(k, 0) for k in split)
        split_total = sum(sizes[k] for k in split)
        print(f"[load_hf_dir reads] {family} rank {rank}: {split_read} of {split_total} bytes of TP-split tensors "
              f"({split_read / split_total:.3f}); whole model read {sum(reads.values())} of {sum(sizes.values())}")


def _load_expert_parallel(family: str, hf_dir: str, checkpoint: str) -> tuple[torch.Tensor, dict[str, int],
                                                                              torch.Tensor]:
    parallel_state.initialize_model_parallel(1, expert_model_parallel_size=2)
    from_checkpoint = ours_logits(family, load_checkpoint(checkpoint)[0])
    reads: dict[str, int] = defaultdict(int)
    real = safetensors.safe_open
    safetensors.safe_open = lambda *a, **k: _Recorded(real(*a, **k), reads, [])
    try:
        model = load_hf_dir(hf_dir)
    finally:
        safetensors.safe_open = real
    return ours_logits(family, model), dict(reads), from_checkpoint


@pytest.mark.slow
def test_load_hf_dir_at_expert_parallel_2_reads_only_its_experts(tmp_path):
    hf = _hf_model("qwen2_moe")  # 4 experts, a gated shared expert
    want = hf_logits("qwen2_moe", hf)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    results = run_distributed(_load_expert_parallel, 2, "qwen2_moe", str(tmp_path / "hf"), str(tmp_path / "ckpt"),
                              tmp_dir=tmp_path)
    for rank, (logits, reads, from_checkpoint) in enumerate(results):
        torch.testing.assert_close(logits, want, rtol=0, atol=2e-5, msg=f"qwen2_moe load_hf_dir EP=2 rank {rank}")
        torch.testing.assert_close(from_checkpoint, want, rtol=0, atol=2e-5, msg=f"load_checkpoint EP=2 rank {rank}")
        experts = sorted({int(k.split(".experts.")[1].split(".")[0]) for k in reads if ".mlp.experts." in k})
        assert experts == [2 * rank, 2 * rank + 1], (rank, experts)  # only this rank's two experts were read


def _stage_weights(hf_dir: str, pp: int) -> dict[str, tuple[str, tuple[slice, ...], torch.Tensor]]:
    """checkpoint key -> (state-dict name, box, this rank's tensor) of every TP/PP-sharded tensor loaded."""
    parallel_state.initialize_model_parallel(1, pp)
    model = load_hf_dir(hf_dir)
    return {leaf.key: (name, _local_box(leaf), leaf.data.clone()) for name, leaf in model.sharded_state_dict().items()
            if isinstance(leaf, ShardedTensor)}


@pytest.mark.slow
def test_load_hf_dir_at_pipeline_parallel_2_gives_each_stage_its_layers(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    whole = run_distributed(_stage_weights, 1, str(tmp_path / "hf"), 1, tmp_dir=tmp_path)[0]  # logits-checked elsewhere
    stages = run_distributed(_stage_weights, 2, str(tmp_path / "hf"), 2, tmp_dir=tmp_path)
    # stage 1 names its first layer decoder.layers.0 (local numbering); it must hold the model's layer 1
    assert stages[1]["decoder.layers.1.input_layernorm.weight"][0] == "decoder.layers.0.input_layernorm.weight"
    for rank, got in enumerate(stages):
        for key, (_, box, tensor) in got.items():
            assert torch.equal(tensor, whole[key][2][box]), (rank, key)
    assert {k for stage in stages for k in stage} == set(whole)
