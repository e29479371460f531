"""Two "nodes" of two processes each, joined through torchrun's c10d rendezvous, train like one process.

The launch is the README's multi-node command: one ``torchrun --nnodes 2 --nproc-per-node 2
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` per node (here both on this machine, with
127.0.0.1 as the rendezvous host). Each agent gets consecutive global ranks, so TP=2 groups the
two processes of one node and the data-parallel pair spans the nodes. The losses equal one process
with the same global batch (not bit-exact: TP=2 sums some products in another order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "alphabet_gpt.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(tmp: Path, name: str, micro_batch_size: int) -> list[str]:
    sets = {"training.train_iters": 4, "training.lr_decay_iters": 4, "training.warmup_iters": 1,
            "training.eval_iters": 1, "training.micro_batch_size": micro_batch_size, "training.save_dir": "null",
            "training.metrics_file": str(tmp / f"{name}.jsonl"), "training.progress_bar": "false",
            "training.distributed_optimizer": "true", "training.overlap_grad_reduce": "true",
            "data.seq_length": 16}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "multinode-test", "-m", "megatron_core.train", "--config", str(CONFIG),
             "--set", "parallel.tensor_model_parallel_size=2", *_settings(tmp_path, "two_nodes", 4)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    single = subprocess.run(
        [sys.executable, "-m", "megatron_core.train", "--config", str(CONFIG), *_settings(tmp_path, "single", 8)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    two_nodes, reference = _losses(tmp_path / "two_nodes.jsonl"), _losses(tmp_path / "single.jsonl")
    assert len(reference) == 4
    assert two_nodes == pytest.approx(reference, abs=1e-5)
