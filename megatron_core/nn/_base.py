"""Shared plumbing of the drop-in layers: TP sizes, ``dim`` parsing, per-layer configs, state-dict slicing.

Every drop-in layer keeps *full* ``torch.nn`` semantics at the edges (shapes, arguments, state-dict
loading) and the toolkit's split layout inside. Two helpers make that work:

* ``shard_full_tensors_`` lets ``load_state_dict`` take full (unsplit) tensors: any tensor whose
  shape is the global shape of a TP-split parameter is cut to this rank's slice on the way in;
* ``TorchCompatMixin.__deepcopy__`` shares process groups instead of copying them (they cannot be
  pickled), so ``copy.deepcopy`` works on split layers as it does on ``torch.nn`` ones.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel.utils import TensorParallelError

DtypeName = Literal["float32", "bfloat16", "float16"]
_DTYPE_NAMES: dict[torch.dtype, DtypeName] = {
    torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class UnsupportedArgumentError(ValueError):
    """A ``torch.nn`` argument that the drop-in layer does not implement (in this configuration)."""


def tp_group() -> ProcessGroup | None:
    """The tensor-parallel group (None without torch.distributed)."""
    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    """Number of tensor-parallel ranks (1 without torch.distributed)."""
    return parallel_state.group_world_size(tp_group())


def tp_rank() -> int:
    """This rank's index in its tensor-parallel group."""
    return parallel_state.group_rank(tp_group())


def normalize_dim(dim: int | None, what: str) -> int | None:
    """``None`` (replicated), ``0`` (row / vocabulary split) or ``1`` (column; ``-1`` is accepted).

    Raises:
        ValueError: any other value.
    """
    if dim is None or dim == 0:
        return dim
    if dim in (1, -1):
        return 1
    raise ValueError(f"{what}: dim={dim!r}; use None (not split), 0 (split rows) or 1 / -1 (split columns)")


def check_divisible(size: int, what: str) -> None:
    """Raise ``TensorParallelError`` unless the TP size divides ``size``."""
    world = tp_size()
    if size % world != 0:
        raise TensorParallelError(
            f"{what}={size} is not divisible by the tensor-parallel size {world}; choose a size that is a "
            f"multiple of {world} or run with a tensor-parallel size that divides {size}"
        )


def dtype_name(dtype: torch.dtype | None) -> DtypeName:
    """The config name of ``dtype`` (None -> the default dtype)."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in _DTYPE_NAMES:
        raise UnsupportedArgumentError(
            f"dtype={dtype}: tensor-parallel layers hold float32, bfloat16 or float16 parameters; "
            "pass one of those (or build the layer with dim=None)"
        )
    return _DTYPE_NAMES[dtype]


def linear_layer_config(dtype: torch.dtype | None, perform_initialization: bool = True) -> TransformerConfig:
    """The config a bare parallel linear/embedding needs: only its dtype and init switch matter.

    Matmuls through ``F.linear`` (``cpu_matmul="torch"``): a drop-in layer gives torch.nn's bits.
    """
    world = tp_size()  # the sizes only have to be divisible by it
    return TransformerConfig(
        num_layers=1, hidden_size=world, num_attention_heads=world, ffn_hidden_size=world,
        params_dtype=dtype_name(dtype), perform_initialization=perform_initialization,
        tensor_model_parallel_size=world, cpu_matmul="torch",
    )


# ----------------------------------------------------------------------------- loading full tensors
def local_slice(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Contiguous chunk ``rank`` of ``world`` along ``dim``."""
    size = full.shape[dim] // world
    return full.narrow(dim, rank * size, size)


def shard_full_tensors_(state_dict: dict[str, Any], prefix: str, module: torch.nn.Module) -> None:
    """Replace, in place, every full-shaped tensor meant for a TP-split parameter by this rank's slice.

    A parameter is TP-split when tagged ``tensor_model_parallel`` with a ``partition_dim``; its
    global shape is the local one times the TP size along that dim. Tensors that already have the
    local shape are left alone, so calling this at several levels of a module tree is harmless.
    """
    world = tp_size()
    if world == 1:
        return
    rank = tp_rank()
    for name, param in module.named_parameters():
        key = prefix + name
        value = state_dict.get(key)
        if not isinstance(value, torch.Tensor) or not getattr(param, "tensor_model_parallel", False):
            continue
        dim = param.partition_dim  # type: ignore[attr-defined]
        if getattr(param, "partition_stride", 1) != 1:
            continue  # strided (gated) layouts are not produced by the drop-in layers
        local = tuple(param.shape)
        full = local[:dim] + (local[dim] * world,) + local[dim + 1:]
        if tuple(value.shape) == full:
            state_dict[key] = local_slice(value, dim, rank, world)


class TorchCompatMixin:
    """Deep copies share process groups (unpicklable) and keep the parameters' TP tags."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        assert isinstance(self, torch.nn.Module)
        params = list(self.parameters())
        for sub in self.modules():
            for value in vars(sub).values():
                if isinstance(value, ProcessGroup):
                    memo.setdefault(id(value), value)
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        # Parameter.__deepcopy__ drops Python attributes such as partition_dim: copy them over.
        for param in params:
            twin = memo.get(id(param))
            if twin is not None:
                for attr, value in vars(param).items():
                    setattr(twin, attr, value)
        return new


class TorchLoadMixin(TorchCompatMixin):
    """``load_state_dict`` accepts torch.nn keys (converted by ``_convert_torch_keys``) and full tensors."""

    def _convert_torch_keys(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rename/re-layout this module's torch.nn entries in ``state_dict`` (in place); none by default."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Runs before the children load, so they find their entries already converted and sliced.
        assert isinstance(self, torch.nn.Module)
        self._convert_torch_keys(state_dict, prefix)
        shard_full_tensors_(state_dict, prefix, self)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
