"""ParallelLinear, ParallelEmbedding, ParallelCrossEntropyLoss, tags and init at TP=1: torch.nn exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import megatron_core.nn as mnn
from megatron_core.nn import functional as mF
from megatron_core.nn import init as minit
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _same_rng_after(make_a, make_b, seed: int = 3):
    torch.manual_seed(seed)
    a = make_a()
    next_a = torch.rand(4)
    torch.manual_seed(seed)
    b = make_b()
    next_b = torch.rand(4)
    assert torch.equal(next_a, next_b), "construction consumed a different amount of RNG than torch.nn"
    return a, b


# ----------------------------------------------------------------------------- ParallelLinear
@pytest.mark.parametrize("dim,base", [(None, None), (1, ColumnParallelLinear), (-1, ColumnParallelLinear),
                                      (0, RowParallelLinear)])
def test_parallel_linear_is_nn_linear(dim, base):
    theirs, ours = _same_rng_after(lambda: torch.nn.Linear(6, 10), lambda: mnn.ParallelLinear(6, 10, dim=dim))
    assert isinstance(ours, mnn.ParallelLinear) and (base is None or isinstance(ours, base))
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(ours(x), theirs(x))
    assert repr(ours).startswith(f"ParallelLinear(in_features=6, out_features=10, bias=True, dim={ours.dim}")
    assert set(ours.state_dict()) == {"weight", "bias"} == set(ours.sharded_state_dict())
    twin = copy.deepcopy(ours)
    assert type(twin) is type(ours) and torch.equal(twin.weight, ours.weight)
    assert getattr(twin.weight, "partition_dim", None) == getattr(ours.weight, "partition_dim", None)


def test_parallel_linear_options():
    no_bias = mnn.ParallelLinear(4, 6, bias=False, dim=1)
    assert no_bias.bias is None and no_bias(torch.randn(3, 4)).shape == (3, 6)
    split = mnn.ParallelLinear(4, 6, dim=1, gather_output=False)
    assert mnn.get_parallel_dim(split(torch.randn(3, 4))) == -1
    loaded = mnn.ParallelLinear(4, 6, dim=0)
    source = torch.nn.Linear(4, 6)
    loaded.load_state_dict(source.state_dict())
    assert torch.equal(loaded.weight, source.weight)
    assert mnn.ParallelLinear(4, 6, dtype=torch.bfloat16, dim=1).weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dim=2"):
        mnn.ParallelLinear(4, 6, dim=2)
    with pytest.raises(mnn.UnsupportedArgumentError, match="float64"):
        mnn.ParallelLinear(4, 6, dim=1, dtype=torch.float64)


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_convert_parallel_linear_keeps_outputs(dim):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(5, 8)
    before = mlp(x)
    state = torch.get_rng_state()
    converted = mnn.ParallelLinear.convert_parallel_linear(mlp, dim=dim)
    assert torch.equal(torch.get_rng_state(), state), "conversion drew random numbers"
    assert converted is mlp and all(isinstance(mlp[i], mnn.ParallelLinear) for i in (0, 2))
    assert torch.equal(mlp(x), before)
    bare = torch.nn.Linear(3, 4)
    new = mnn.ParallelLinear.convert_parallel_linear(bare, dim=dim)
    assert isinstance(new, mnn.ParallelLinear) and new.dim == (None if dim is None else dim)
    assert torch.equal(new.weight, bare.weight)
    attention = torch.nn.MultiheadAttention(8, 2)
    assert mnn.ParallelLinear.convert_parallel_linear(attention, dim=dim).out_proj is attention.out_proj


# ----------------------------------------------------------------------------- ParallelEmbedding
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_parallel_embedding_is_nn_embedding(dim):
    theirs, ours = _same_rng_after(lambda: torch.nn.Embedding(12, 6, padding_idx=-2),
                                   lambda: mnn.ParallelEmbedding(12, 6, padding_idx=-2, dim=dim))
    assert isinstance(ours, mnn.ParallelEmbedding) and (dim != 0 or isinstance(ours, VocabParallelEmbedding))
    assert torch.equal(ours.weight, theirs.weight) and ours.padding_idx == theirs.padding_idx == 10
    ids = torch.tensor([[1, 10, 3], [10, 11, 0]])
    out_o, out_t = ours(ids), theirs(ids)
    assert torch.equal(out_o, out_t)
    (out_o * out_o).sum().backward()
    (out_t * out_t).sum().backward()
    assert torch.equal(ours.weight.grad, theirs.weight.grad) and not ours.weight.grad[10].any()
    assert set(ours.sharded_state_dict()) == {"weight"}


def test_parallel_embedding_arguments():
    table = torch.randn(5, 4)
    given = mnn.ParallelEmbedding(5, 4, padding_idx=0, _weight=table, _freeze=True, dim=1)
    assert torch.equal(given.weight, table) and not given.weight.requires_grad  # a given table keeps its rows
    plain = mnn.ParallelEmbedding(5, 4, max_norm=1.0, scale_grad_by_freq=True)
    reference = torch.nn.Embedding(5, 4, max_norm=1.0, scale_grad_by_freq=True, _weight=plain.weight.detach().clone())
    ids = torch.tensor([0, 2, 2])
    assert torch.equal(plain(ids), reference(ids))
    for kwargs in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}):
        with pytest.raises(mnn.UnsupportedArgumentError, match=next(iter(kwargs))):
            mnn.ParallelEmbedding(5, 4, dim=0, **kwargs)
    assert mnn.get_parallel_dim(mnn.ParallelEmbedding(5, 4, dim=1, gather_output=False)(ids)) == -1


# ----------------------------------------------------------------------------- cross entropy
@pytest.mark.parametrize("kwargs", [{}, {"ignore_index": 1}, {"reduction": "sum"}, {"reduction": "none"},
                                    {"label_smoothing": 0.2, "ignore_index": 2}, {"weight": "rand"},
                                    {"weight": "rand", "label_smoothing": 0.1, "reduction": "sum"}])
def test_cross_entropy_is_torch(kwargs):
    kwargs = {**kwargs, "weight": torch.rand(7)} if kwargs.get("weight") == "rand" else kwargs
    logits, target = torch.randn(4, 7, 3), torch.randint(0, 7, (4, 3))
    expected = torch.nn.CrossEntropyLoss(**kwargs)(logits, target)
    assert torch.equal(mnn.ParallelCrossEntropyLoss(**kwargs)(logits, target), expected)
    # tagged logits, classes last ([b, s, V] with [b, s] targets): same loss at TP=1
    tagged = mnn.RegisterParallelDim(-1)(logits.transpose(1, 2).contiguous())
    assert torch.allclose(mnn.ParallelCrossEntropyLoss(**kwargs)(tagged, target), expected, atol=1e-6)
    probs = torch.softmax(torch.randn(4, 7), -1)
    assert torch.equal(mF.parallel_cross_entropy(logits[..., 0], probs), F.cross_entropy(logits[..., 0], probs))


def test_cross_entropy_checks_tagged_shapes():
    tagged = mnn.RegisterParallelDim(-1)(torch.randn(4, 3, 7))
    with pytest.raises(ValueError, match="target must have shape"):
        mnn.ParallelCrossEntropyLoss()(tagged, torch.randint(0, 7, (4, 7)))
    legacy = mnn.ParallelCrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


# ----------------------------------------------------------------------------- tags, init, namespace
def test_parallel_dim_tags():
    x = torch.randn(3, 4)
    assert mnn.get_parallel_dim(x) is None
    assert mnn.get_parallel_dim(mnn.RegisterParallelDim(dim=0)(x)) == 0
    assert mnn.get_parallel_dim(mnn.RegisterParallelDim()(x)) is None
    assert mnn.get_parallel_dim(mnn.ParallelLinear(4, 6, dim=0).weight) == 1
    assert mnn.get_parallel_dim(mnn.ParallelLinear(4, 6, dim=None).weight) is None
    with pytest.raises(ValueError, match="out of range"):
        mnn.set_parallel_dim(x, 2)


def test_shard_init_helper_and_namespaces():
    torch.manual_seed(1)
    full = torch.nn.init.kaiming_normal_(torch.empty(6, 4), a=0.1)
    torch.manual_seed(1)
    shard = minit.shard_init_helper_(torch.nn.init.kaiming_normal_, torch.empty(6, 4), dim=0, a=0.1)
    assert torch.equal(shard, full)  # TP=1: the shard is the full tensor
    assert minit.normal_ is torch.nn.init.normal_ and mF.relu is F.relu
    assert mnn.Module is torch.nn.Module and mnn.Linear is torch.nn.Linear and mnn.Dropout is torch.nn.Dropout
    assert mnn.TransformerEncoderLayer is not torch.nn.TransformerEncoderLayer
    with pytest.raises(AttributeError, match="NoSuchLayer"):
        mnn.NoSuchLayer  # noqa: B018
    layer = mnn.ParallelLinear(4, 6, dim=1)
    minit.shard_init_helper_(torch.nn.init.constant_, layer.bias, val=0.5)
    assert torch.equal(layer.bias, torch.full((6,), 0.5))
    bound = 1 / math.sqrt(4)
    assert layer.weight.abs().max() <= bound
