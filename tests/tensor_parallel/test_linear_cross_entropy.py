"""Fused output layer + cross entropy (chunks of tokens) against F.linear + vocab_parallel_cross_entropy.

Loss and gradients (input, weight, bias) within 1e-6 in fp32, for uniform, masked and arbitrary
incoming gradients, label smoothing, ignored targets, at TP 1 and 2; and the loss's peak memory at
GPT-2 small's token count and vocabulary stays under a quarter of the full logits.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_core import parallel_state as ps
from megatron_core.tensor_parallel import linear_cross_entropy, vocab_parallel_cross_entropy
from megatron_core.tensor_parallel.linear_cross_entropy import TRANSPOSED_MIN_VOCAB
from megatron_core.testing import run_distributed

N, H, V = 37, 16, 48
ATOL = 1e-6


def _data(ignore_index: int = -100, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    target = torch.randint(0, V, (N,), generator=g)
    target[[0, 5, 30]] = ignore_index
    return hidden, weight, bias, target


def _upstreams(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(n, generator=g) > 0.3).float()
    return {"mean": torch.full((n,), 1.0 / n), "masked": mask / mask.sum(), "arbitrary": torch.rand(n, generator=g)}


def _grads(fn, hidden, weight, bias, upstream):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fn(*leaves)
    loss.backward(upstream)
    return [loss.detach()] + [t.grad for t in leaves]


def _reference(eps, ignore):
    return lambda h, w, b, t: vocab_parallel_cross_entropy(F.linear(h, w, b).float(), t, eps, ignore)


@pytest.mark.parametrize("upstream", ["mean", "masked", "arbitrary"])
@pytest.mark.parametrize("eps,ignore,chunk", [(0.0, -100, 8), (0.1, -100, 5), (0.0, 3, None), (0.2, 7, 100)])
def test_matches_unfused_loss_and_grads(upstream, eps, ignore, chunk):
    hidden, weight, bias, target = _data(ignore)
    up = _upstreams(N)[upstream]
    want = _grads(lambda h, w, b: _reference(eps, ignore)(h, w, b, target), hidden, weight, bias, up)
    got = _grads(lambda h, w, b: linear_cross_entropy(h, w, target, b, label_smoothing=eps, ignore_index=ignore,
                                                      chunk_tokens=chunk), hidden, weight, bias, up)
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert got[0].dtype == torch.float32


def test_no_grad_and_shape_errors():
    hidden, weight, bias, target = _data()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.view(1, N, H), weight, target.view(1, N), bias)
    assert loss.shape == (1, N)
    torch.testing.assert_close(loss[0], _reference(0.0, -100)(hidden, weight, bias, target), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="hidden shape .* does not match target shape"):
        linear_cross_entropy(hidden, weight, target[:-1])
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, target)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.sum().backward()


def _on_rank(tp: int) -> list[list[torch.Tensor]]:
    ps.initialize_model_parallel(tp)
    rank = ps.get_tensor_model_parallel_rank()
    hidden, weight, bias, target = _data(ignore_index=4)
    w_local, b_local = weight.chunk(tp)[rank], bias.chunk(tp)[rank]
    out = []
    for up in _upstreams(N).values():
        out.append(_grads(lambda h, w, b, up=up: linear_cross_entropy(h, w, target, b, label_smoothing=0.1,
                                                                      ignore_index=4, chunk_tokens=6),
                          hidden, w_local, b_local, up))
    return out


def test_vocab_parallel_tp2_matches_single_process(tmp_path):
    hidden, weight, bias, target = _data(ignore_index=4)
    ranks = run_distributed(_on_rank, 2, 2, tmp_dir=tmp_path)
    for i, up in enumerate(_upstreams(N).values()):
        want = _grads(lambda h, w, b, up=up: _reference(0.1, 4)(h, w, b, target), hidden, weight, bias, up)
        for rank, per_rank in enumerate(ranks):
            loss, g_hidden, g_weight, g_bias = per_rank[i]
            torch.testing.assert_close(loss, want[0], atol=ATOL, rtol=0)
            # Each rank's input gradient is its vocab slice's part; the TP mapping sums them.
            assert g_weight.shape == (V // 2, H)
            torch.testing.assert_close(g_weight, want[2].chunk(2)[rank], atol=ATOL, rtol=0)
            torch.testing.assert_close(g_bias, want[3].chunk(2)[rank], atol=ATOL, rtol=0)
        torch.testing.assert_close(ranks[0][i][1] + ranks[1][i][1], want[1], atol=ATOL, rtol=0)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (freed when their storage dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _loss_peak(fn, hidden, weight, target) -> int:
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LiveBytes() as meter:
        fn(hidden, weight, target).mean().backward()
    return meter.peak


def test_peak_memory_is_under_a_quarter_of_the_logits_at_gpt2_small_shapes():
    tokens, vocab, hidden_size = 2 * 512, 50257, 32  # GPT-2 small's tokens (b2 x s512) and vocabulary
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.02
    target = torch.randint(0, vocab, (tokens,), generator=g)
    logits_bytes = tokens * vocab * 4
    weight_grad_bytes = vocab * hidden_size * 4  # produced by any method: not the loss's working memory

    unfused = _loss_peak(lambda h, w, t: vocab_parallel_cross_entropy(F.linear(h, w).float(), t), hidden, weight, target)
    fused = _loss_peak(lambda h, w, t: linear_cross_entropy(h, w, t), hidden, weight, target)
    print(f"[loss-memory] logits {logits_bytes / 2**20:.1f} MiB; peak unfused {unfused / 2**20:.1f} MiB, "
          f"fused {fused / 2**20:.1f} MiB (weight grad {weight_grad_bytes / 2**20:.1f} MiB included in both)")
    assert unfused - weight_grad_bytes >= 2 * logits_bytes  # the meter sees the full logits path
    assert fused - weight_grad_bytes <= logits_bytes / 4


@pytest.mark.parametrize("upstream", ["mean", "masked", "arbitrary"])
@pytest.mark.parametrize("eps,chunk", [(0.0, 32), (0.1, 7), (0.0, None)])
@pytest.mark.parametrize("cpu_matmul", ["torch", "onednn"])
def test_transposed_logits_path_matches_unfused(upstream, eps, chunk, cpu_matmul):
    """A vocabulary of >= TRANSPOSED_MIN_VOCAB rows: with cpu_matmul="torch" the logits come from
    ``weight @ hidden^T`` (transposed view); with "onednn" from oneDNN's ``hidden @ weight^T``."""
    n, vocab = 40, TRANSPOSED_MIN_VOCAB + 4
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(n, H, generator=g), torch.randn(vocab, H, generator=g) * 0.5
    bias, target = torch.randn(vocab, generator=g) * 0.1, torch.randint(0, vocab, (n,), generator=g)
    target[[1, 17]] = -100
    up = _upstreams(n)[upstream]
    want = _grads(lambda h, w, b: _reference(eps, -100)(h, w, b, target), hidden, weight, bias, up)
    got = _grads(lambda h, w, b: linear_cross_entropy(h, w, target, b, label_smoothing=eps, chunk_tokens=chunk,
                                                      cpu_matmul=cpu_matmul), hidden, weight, bias, up)
    # The sums over the 4100-row vocabulary (the loss's log-partition, the input gradient G @ W) run in
    # another order than the reference's, and MKL's order depends on the thread count: at 2 threads the
    # input gradient (values ~0.5) differs by up to ~4 ulps relative. A real error is orders larger.
    for name, a, b, rtol in zip(("loss", "hidden", "weight", "bias"), got, want, (1e-6, 1e-5, 0, 0), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _large_vocab_data():
    n, vocab = 24, 2 * (TRANSPOSED_MIN_VOCAB + 4)  # each of 2 ranks holds >= TRANSPOSED_MIN_VOCAB rows
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(n, H, generator=g), torch.randn(vocab, H, generator=g) * 0.5
    bias, target = torch.randn(vocab, generator=g) * 0.1, torch.randint(0, vocab, (n,), generator=g)
    target[3] = -100
    return hidden, weight, bias, target, _upstreams(n)["masked"]


def _on_rank_large_vocab() -> list[torch.Tensor]:
    ps.initialize_model_parallel(2)
    rank = ps.get_tensor_model_parallel_rank()
    hidden, weight, bias, target, up = _large_vocab_data()
    return _grads(lambda h, w, b: linear_cross_entropy(h, w, target, b, label_smoothing=0.1, chunk_tokens=16,
                                                       cpu_matmul="torch"),
                  hidden, weight.chunk(2)[rank], bias.chunk(2)[rank], up)


def test_transposed_logits_path_at_tp2_matches_single_process(tmp_path):
    hidden, weight, bias, target, up = _large_vocab_data()
    want = _grads(lambda h, w, b: _reference(0.1, -100)(h, w, b, target), hidden, weight, bias, up)
    ranks = run_distributed(_on_rank_large_vocab, 2, tmp_dir=tmp_path)
    for rank, (loss, _, g_weight, g_bias) in enumerate(ranks):
        torch.testing.assert_close(loss, want[0], atol=ATOL, rtol=1e-6)
        torch.testing.assert_close(g_weight, want[2].chunk(2)[rank], atol=ATOL, rtol=0)
        torch.testing.assert_close(g_bias, want[3].chunk(2)[rank], atol=ATOL, rtol=0)
    torch.testing.assert_close(ranks[0][1] + ranks[1][1], want[1], atol=ATOL, rtol=0)
