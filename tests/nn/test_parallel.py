"""megatron_core.nn at TP=2 and TP=4 equals TP=1: outputs and gathered gradients.

One spawn per TP size runs every check on every rank (``_compute``); each rank returns its local
results tagged with the dim they are split along; the parent concatenates them and compares with
``_compute`` run in-process at TP=1 (whose parity with torch.nn is tested in the other files).
"""

from __future__ import annotations

import math

import pytest
import torch

import megatron_core.nn as mnn
from megatron_core import dist_checkpointing
from megatron_core import parallel_state as ps
from megatron_core.module import default_sharded_state_dict
from megatron_core.tensor_parallel import TensorParallelError
from megatron_core.testing import run_distributed
from tests.nn.helpers import local_grads, max_diff, merge_ranks

B, S, IN, OUT, VOCAB, D, HEADS, FF = 2, 5, 8, 12, 16, 32, 4, 64
ATOL = 1e-5  # split matmuls sum in a different order than the TP=1 ones

Results = dict[str, tuple[torch.Tensor, int | None]]


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    ids[0, 0] = 3  # the padding id
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[1, :2] = -100
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -2:] = True
    return {"x": torch.randn(B, S, IN, generator=g), "gy": torch.randn(B, S, OUT, generator=g), "ids": ids,
            "labels": labels, "hidden": torch.randn(B, S, D, generator=g), "gemb": torch.randn(B, S, D, generator=g),
            "class_weight": torch.rand(VOCAB, generator=g), "padding": padding,
            "head_mask": torch.randn(B * HEADS, S, S, generator=g)}


def _backward(out: torch.Tensor, upstream: torch.Tensor | None = None) -> None:
    (out * (upstream if upstream is not None else torch.ones_like(out))).sum().backward()


def _linears(data: dict[str, torch.Tensor]) -> Results:
    res: Results = {}
    for dim in (1, 0):
        torch.manual_seed(10)
        layer = mnn.ParallelLinear(IN, OUT, dim=dim)
        x = data["x"].clone().requires_grad_()
        y = layer(x)
        _backward(y, data["gy"])
        res.update({f"linear{dim}.y": (y.detach(), None), f"linear{dim}.dx": (x.grad, None),
                    **local_grads(layer, f"linear{dim}.")})
    # Megatron pairing: column output kept split feeds the row layer with no gather in between.
    torch.manual_seed(11)
    first, second = mnn.ParallelLinear(IN, OUT, dim=1, gather_output=False), mnn.ParallelLinear(OUT, IN, dim=0)
    x = data["x"].clone().requires_grad_()
    y = second(torch.relu(first(x)))
    _backward(y)
    res.update({"pair.y": (y.detach(), None), "pair.dx": (x.grad, None), **local_grads(first, "pair.first."),
                **local_grads(second, "pair.second.")})
    return res


def _embeddings(data: dict[str, torch.Tensor]) -> Results:
    res: Results = {}
    for dim in (0, 1):
        torch.manual_seed(12)
        table = mnn.ParallelEmbedding(VOCAB, D, padding_idx=3, dim=dim)
        y = table(data["ids"])
        _backward(y, data["gemb"])
        res.update({f"emb{dim}.y": (y.detach(), None), **local_grads(table, f"emb{dim}.")})
    return res


def _cross_entropy(data: dict[str, torch.Tensor]) -> Results:
    res: Results = {}
    for name, kwargs in {"smooth": {"label_smoothing": 0.1}, "weighted": {"weight": data["class_weight"]},
                         "sum": {"reduction": "sum", "ignore_index": 5}}.items():
        torch.manual_seed(13)
        head = mnn.ParallelLinear(D, VOCAB, dim=1, gather_output=False)
        hidden = data["hidden"].clone().requires_grad_()
        logits = head(hidden)  # [b, s, V/tp], tagged -1
        labels = data["labels"].masked_fill(data["labels"] < 0, kwargs.get("ignore_index", -100))
        loss = mnn.ParallelCrossEntropyLoss(**kwargs)(logits, labels)
        loss.backward()
        res.update({f"ce.{name}.loss": (loss.detach(), None), f"ce.{name}.dhidden": (hidden.grad, None),
                    **local_grads(head, f"ce.{name}.")})
    return res


def _encoder(data: dict[str, torch.Tensor]) -> Results:
    torch.manual_seed(14)
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=True)
    theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(D, HEADS, **kw), 2, torch.nn.LayerNorm(D),
                                         enable_nested_tensor=False)
    ours = mnn.TransformerEncoder(mnn.TransformerEncoderLayer(D, HEADS, **kw), 2, torch.nn.LayerNorm(D))
    ours.load_state_dict(theirs.state_dict())
    x = data["hidden"].clone().requires_grad_()
    y = ours(x, mask=data["head_mask"], src_key_padding_mask=data["padding"])
    _backward(y, data["gemb"])
    return {"enc.y": (y.detach(), None), "enc.dx": (x.grad, None), **local_grads(ours, "enc.")}


class _TutorialLM(torch.nn.Module):
    """The PyTorch tutorial's language model, small."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, D)
        layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.linear = torch.nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.encoder(self.embedding(ids) * math.sqrt(D)))


def _convert(data: dict[str, torch.Tensor]) -> Results:
    res: Results = {}
    for dim in (1, 0):
        torch.manual_seed(15)
        model = _TutorialLM()
        before = model(data["ids"]).detach()
        mnn.ParallelLinear.convert_parallel_linear(model, dim=dim)
        after = model(data["ids"])
        res[f"convert{dim}.diff"] = ((after.detach() - before).abs().max(), None)
    return res


def _errors() -> list[str]:
    messages = []
    for make in (lambda: mnn.ParallelLinear(IN, 7, dim=1), lambda: mnn.ParallelLinear(7, OUT, dim=0),
                 lambda: mnn.ParallelEmbedding(7, D, dim=0), lambda: mnn.ParallelEmbedding(VOCAB, 7, dim=1),
                 lambda: mnn.TransformerEncoderLayer(12, 3, 24)):
        try:
            make()
            messages.append("no error")
        except (TensorParallelError, ValueError) as err:
            messages.append(str(err))
    return messages


def _compute() -> tuple[Results, list[str]]:
    data = _data()
    res: Results = {}
    for part in (_linears, _embeddings, _cross_entropy, _encoder, _convert):
        res.update(part(data))
    return res, _errors()


def _on_rank(tp: int) -> tuple[Results, list[str]]:
    ps.initialize_model_parallel(tp)
    torch.set_num_threads(1)
    return _compute()


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_equals_tp1(tp, tmp_path):
    reference, _ = _compute()
    per_rank = run_distributed(_on_rank, tp, tp, tmp_dir=tmp_path)
    merged = merge_ranks([r for r, _ in per_rank])
    ref = {name: value for name, (value, _) in reference.items()}
    assert set(merged) == set(ref)
    diffs = {name: max_diff(merged[name], ref[name]) for name in ref if not name.startswith("convert")}
    worst = max(diffs, key=diffs.__getitem__)
    print(f"TP={tp}: {len(diffs)} tensors, max diff {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= ATOL, f"{worst}: {diffs[worst]:.3g}"
    for dim in (1, 0):
        assert float(merged[f"convert{dim}.diff"]) <= ATOL
    errors = per_rank[0][1]
    for message, name in zip(errors, ["output_size", "input_size", "num_embeddings", "embedding_dim",
                                      "num_attention_heads"], strict=True):
        assert name in message and "divisible" in message, message



def _checkpointed_model() -> torch.nn.Module:
    torch.manual_seed(21)
    return torch.nn.ModuleDict({
        "words": mnn.ParallelEmbedding(VOCAB, D, dim=0), "channels": mnn.ParallelEmbedding(VOCAB, D, dim=1),
        "column": mnn.ParallelLinear(D, OUT, dim=1), "row": mnn.ParallelLinear(OUT, D, dim=0),
        "attention": mnn.MultiheadAttention(D, HEADS), "plain": torch.nn.Linear(D, 4),
    })


def _save_on_rank(tp: int, path: str) -> Results:
    ps.initialize_model_parallel(tp)
    model = _checkpointed_model()
    dist_checkpointing.save(default_sharded_state_dict(model), path)
    return {name: (p.detach(), p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for name, p in model.named_parameters()}


def test_sharded_checkpoint_tp2_loads_at_tp1(tmp_path):
    """Drop-in layers get sharded checkpoints: saved at TP=2, loaded at TP=1, same full tensors."""
    path = tmp_path / "ckpt"
    saved = merge_ranks(run_distributed(_save_on_rank, 2, 2, str(path), tmp_dir=tmp_path))
    model = _checkpointed_model()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    model.load_state_dict(dist_checkpointing.load(default_sharded_state_dict(model), path))
    fresh = _checkpointed_model()  # TP-invariant init: TP=1 from the same seed holds the same tensors
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name
        assert torch.equal(p, dict(fresh.named_parameters())[name]), name
