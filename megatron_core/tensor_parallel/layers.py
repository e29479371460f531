"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Weights are split across the tensor-parallel group:

* ``ColumnParallelLinear``: ``weight [out/tp, in]``, ``bias [out/tp]`` (output features split);
* ``RowParallelLinear``: ``weight [out, in/tp]`` (input features split), ``bias [out]`` replicated;
* ``VocabParallelEmbedding``: ``weight [vocab/tp, h]`` (vocabulary split).

Initialisation is TP-invariant: the full weight is drawn on every rank from the default torch
RNG (seeded the same on all TP ranks) and each rank keeps its slice, so a seed gives the same
full weights at every TP size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict
from megatron_core.module import MegatronModule, make_sharded_tensors_for_checkpoint
from megatron_core.tensor_parallel.cpu_matmul import linear
from megatron_core.tensor_parallel.linear_cross_entropy import linear_cross_entropy
from megatron_core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_core.tensor_parallel.utils import TensorParallelError, VocabUtility, divide

InitMethod = Callable[[torch.Tensor], Any]

_TP_ATTRIBUTES = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1}


# ----------------------------------------------------------------------------- parameter attributes
def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int) -> None:
    """Tag a parameter with how it is split (read by grad clipping and optimizers)."""
    tensor.tensor_model_parallel = is_parallel  # type: ignore[attr-defined]
    tensor.partition_dim = dim  # type: ignore[attr-defined]
    tensor.partition_stride = stride  # type: ignore[attr-defined]


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    """Mark a parameter as replicated across TP unless it was tagged already."""
    for name, value in _TP_ATTRIBUTES.items():
        if not hasattr(tensor, name):
            setattr(tensor, name, value)


def copy_tensor_model_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    """Copy the TP tags of ``source`` onto ``destination``."""
    for name in _TP_ATTRIBUTES:
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True for TP-split params and, for replicated ones, only on TP rank 0 (count each once)."""
    return bool(getattr(param, "tensor_model_parallel", False)) or (
        parallel_state.get_tensor_model_parallel_rank() == 0
    )


# ----------------------------------------------------------------------------- initialisation
def _tp_group_of(tp_group: ProcessGroup | None) -> ProcessGroup | None:
    return parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group


def _initialize_affine_weight(
    weight: torch.Tensor,
    full_shape: tuple[int, int],
    partition_dim: int,
    init_method: InitMethod,
    stride: int,
    rank: int,
    world_size: int,
) -> None:
    """Fill ``weight`` with this rank's slice of a full weight drawn from the default RNG.

    The full (master) weight is cut into ``world_size * stride`` chunks along ``partition_dim``;
    rank ``r`` keeps chunks ``r, r + world_size, ...`` concatenated. With ``stride=2`` a
    ``[gate; up]`` matrix thus gives each rank ``[gate_r; up_r]``.
    """
    # Drawn in fp32 on the CPU generator: the same numbers on every rank, at every TP, on any device.
    master = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(master)
    per_partition = divide(full_shape[partition_dim], world_size, f"dimension {partition_dim} of the weight")
    chunk = divide(per_partition, stride, f"per-rank dimension {partition_dim} (stride={stride})")
    chunks = torch.split(master, chunk, dim=partition_dim)
    mine = torch.cat(chunks[rank::world_size], dim=partition_dim)  # [per_partition, ...] along the split dim
    with torch.no_grad():
        weight.copy_(mine.to(dtype=weight.dtype))


def _new_param(shape: tuple[int, ...], config: TransformerConfig) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(shape, dtype=config.torch_dtype))


def _zero_bias(size: int, config: TransformerConfig) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(size, dtype=config.torch_dtype))


# ----------------------------------------------------------------------------- column parallel
class ColumnParallelLinear(MegatronModule):
    """``Y = X A^T + b`` with ``A``'s output features split across TP ranks.

    Input ``[s, b, in]`` (``[s/tp, b, in]`` with sequence parallelism, gathered first); output
    ``[s, b, out/tp]``, or ``[s, b, out]`` with ``gather_output``. ``forward`` returns
    ``(output, bias)``; the bias is ``None`` unless ``skip_bias_add``.

    Megatron-Core-compatible arguments kept for callers and builders that pass them:
    ``is_expert`` marks the parameters ``allreduce=False`` (an expert's gradients are reduced over
    the expert-data-parallel group, not the data-parallel one); ``tp_comm_buffer_name`` names the
    layer for communication/GEMM overlap, which the local kernels do not do, so it is accepted and
    ignored.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
        disable_grad_reduce: bool = False,
    ) -> None:
        super().__init__(config, groups={"tp_group": tp_group})
        del tp_comm_buffer_name  # Megatron-Core-compatible argument; the local kernels overlap no communication
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.disable_grad_reduce = disable_grad_reduce
        self.tp_group = _tp_group_of(tp_group)
        self.tp_size = parallel_state.group_world_size(self.tp_group)
        self.tp_rank = parallel_state.group_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        self.output_size_per_partition = divide(output_size, self.tp_size, "ColumnParallelLinear output_size")
        if gather_output and self.sequence_parallel:
            raise TensorParallelError(
                "ColumnParallelLinear: gather_output=True with sequence_parallel=True is not supported; "
                "keep the output split (gather_output=False) and gather where it is consumed"
            )

        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            self.weight = _new_param((self.output_size_per_partition, input_size), config)
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
            if config.perform_initialization:
                _initialize_affine_weight(
                    self.weight, (output_size, input_size), 0, init_method, stride, self.tp_rank, self.tp_size
                )
            self.weight.allreduce = not is_expert  # type: ignore[attr-defined]
        if bias:
            self.bias = _zero_bias(self.output_size_per_partition, config)
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
            self.bias.allreduce = not is_expert  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def forward(
        self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the layer.

        Args:
            input_: ``[s, b, in]`` (``[s/tp, b, in]`` with sequence parallelism).
            weight: the weight to use when the layer was built with ``skip_weight_param_allocation``
                (e.g. a tied output layer); shape ``[out/tp, in]``.
            runtime_gather_output: overrides ``gather_output`` for this call.

        Returns:
            ``(output, bias)``: output ``[s, b, out/tp]`` (``[s, b, out]`` when gathered).
        """
        weight = self._weight_for(weight)
        input_parallel = self._input_parallel(input_)
        bias = self.bias if not self.skip_bias_add else None
        output_parallel = linear(input_parallel, weight, bias, self.config.cpu_matmul)  # [s, b, out/tp]

        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        output = gather_from_tensor_model_parallel_region(output_parallel, self.tp_group) if gather \
            else output_parallel  # [s, b, out]
        return output, (self.bias if self.skip_bias_add else None)

    def _weight_for(self, weight: torch.Tensor | None) -> torch.Tensor:
        """The weight to apply: ``weight`` (checked) when given, else the layer's own."""
        if weight is None:
            if self.weight is None:
                raise TensorParallelError(
                    "ColumnParallelLinear was built with skip_weight_param_allocation=True: pass the weight "
                    f"to forward(input_, weight) with shape ({self.output_size_per_partition}, {self.input_size})"
                )
            weight = self.weight
        elif tuple(weight.shape) != (self.output_size_per_partition, self.input_size):
            raise TensorParallelError(
                f"ColumnParallelLinear: weight passed to forward has shape {tuple(weight.shape)}, expected "
                f"({self.output_size_per_partition}, {self.input_size}) = [output_size/tp, input_size]"
            )
        return weight

    def _input_parallel(self, input_: torch.Tensor) -> torch.Tensor:
        """The input every TP rank multiplies: gathered over the sequence with SP; the backward reduces."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(input_, True, self.tp_group)  # [s/tp,b,h]->[s,b,h]
        if self.disable_grad_reduce:
            return input_
        return copy_to_tensor_model_parallel_region(input_, self.tp_group)

    def cross_entropy(
        self,
        input_: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
        chunk_tokens: int | None = None,
    ) -> torch.Tensor:
        """Per-token loss of this layer's (vocab-parallel) logits, never holding them whole.

        Same result as ``vocab_parallel_cross_entropy(self(input_, weight)[0].float(), target)``, computed
        in chunks of tokens by :func:`linear_cross_entropy` (the output layer of a language model).

        Args:
            input_: ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism).
            target: ``[s, b]`` global token ids.
            weight: as in :meth:`forward` (a tied output layer's weight).
            label_smoothing: as in ``torch.nn.functional.cross_entropy``.
            chunk_tokens: tokens per chunk (default: about 8M logits per chunk).

        Returns:
            ``[s, b]`` fp32 loss per token.
        """
        if self.skip_bias_add and self.bias is not None:
            raise TensorParallelError("ColumnParallelLinear.cross_entropy: skip_bias_add=True has no loss meaning; "
                                      "build the output layer with skip_bias_add=False")
        return linear_cross_entropy(
            self._input_parallel(input_), self._weight_for(weight), target, self.bias,
            label_smoothing=label_smoothing, chunk_tokens=chunk_tokens, group=self.tp_group,
            cpu_matmul=self.config.cpu_matmul,
        )

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (), metadata: dict[str, Any] | None = None
    ) -> ShardedStateDict:
        """Weight and bias split along axis 0 (output features)."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0, "bias": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return (f"in_features={self.input_size}, out_features={self.output_size}, "
                f"per_partition={self.output_size_per_partition}, bias={self.bias is not None}, "
                f"tp={self.tp_size}, gather_output={self.gather_output}")


# ----------------------------------------------------------------------------- row parallel
class RowParallelLinear(MegatronModule):
    """``Y = X A^T + b`` with ``A``'s input features split across TP ranks.

    Input ``[s, b, in/tp]`` (``input_is_parallel``) or ``[s, b, in]`` (scattered first); the partial
    products are all-reduced (reduce-scattered to ``[s/tp, b, out]`` with sequence parallelism),
    then the replicated bias is added, or returned when ``skip_bias_add``.

    ``is_expert`` and ``tp_comm_buffer_name`` are Megatron-Core-compatible arguments, as for
    ``ColumnParallelLinear``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        stride: int = 1,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, groups={"tp_group": tp_group})
        del tp_comm_buffer_name  # Megatron-Core-compatible argument; the local kernels overlap no communication
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.tp_group = _tp_group_of(tp_group)
        self.tp_size = parallel_state.group_world_size(self.tp_group)
        self.tp_rank = parallel_state.group_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        self.input_size_per_partition = divide(input_size, self.tp_size, "RowParallelLinear input_size")
        if self.sequence_parallel and not input_is_parallel:
            raise TensorParallelError(
                "RowParallelLinear: sequence_parallel=True needs input_is_parallel=True (the input comes "
                "from a column-parallel layer); got input_is_parallel=False"
            )

        self.weight = _new_param((output_size, self.input_size_per_partition), config)
        set_tensor_model_parallel_attributes(self.weight, True, 1, stride)
        if config.perform_initialization:
            _initialize_affine_weight(
                self.weight, (output_size, input_size), 1, init_method, stride, self.tp_rank, self.tp_size
            )
        self.weight.allreduce = not is_expert  # type: ignore[attr-defined]
        if bias:
            self.bias = _zero_bias(output_size, config)
            set_defaults_if_not_set_tensor_model_parallel_attributes(self.bias)
            self.bias.allreduce = not is_expert  # type: ignore[attr-defined]
            # Each rank adds the bias to its own sequence chunk: grads are partial, summed over TP later.
            self.bias.sequence_parallel = self.sequence_parallel  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the layer.

        Args:
            input_: ``[s, b, in/tp]`` if ``input_is_parallel`` else ``[s, b, in]``.

        Returns:
            ``(output, bias)``: output ``[s, b, out]`` (``[s/tp, b, out]`` with sequence parallelism).
        """
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_, self.tp_group)  # [.., in]->[.., in/tp]
        output_parallel = linear(input_parallel, self.weight, None, self.config.cpu_matmul)  # partial sums [s, b, out]
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel, self.tp_group)  # [s/tp, b, out]
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel, self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        if self.bias is not None:
            output = output + self.bias
        return output, None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (), metadata: dict[str, Any] | None = None
    ) -> ShardedStateDict:
        """Weight split along axis 1 (input features); bias replicated."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 1}, sharded_offsets)

    def extra_repr(self) -> str:
        return (f"in_features={self.input_size}, out_features={self.output_size}, "
                f"per_partition={self.input_size_per_partition}, bias={self.bias is not None}, tp={self.tp_size}")


# ----------------------------------------------------------------------------- vocab parallel embedding
class VocabParallelEmbedding(MegatronModule):
    """Embedding table split along the vocabulary: ``weight [vocab/tp, h]``.

    Each rank looks up the ids in its range (zeros elsewhere) and the partial results are summed
    over TP. With ``reduce_scatter_embeddings`` the output ``[b, s, h]`` is transposed to
    ``[s, b, h]`` and reduce-scattered to ``[s/tp, b, h]`` (sequence parallelism).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod,
        config: TransformerConfig,
        reduce_scatter_embeddings: bool = False,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, groups={"tp_group": tp_group})
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.tp_group = _tp_group_of(tp_group)
        self.tp_size = parallel_state.group_world_size(self.tp_group)
        self.tp_rank = parallel_state.group_rank(self.tp_group)
        if num_embeddings % self.tp_size != 0:
            raise TensorParallelError(
                f"VocabParallelEmbedding: vocabulary size {num_embeddings} is not divisible by the "
                f"tensor-parallel size {self.tp_size}; pad the vocabulary to a multiple of {self.tp_size}"
            )
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, self.tp_rank, self.tp_size
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = _new_param((self.num_embeddings_per_partition, embedding_dim), config)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        if config.perform_initialization:
            _initialize_affine_weight(
                self.weight, (num_embeddings, embedding_dim), 0, init_method, 1, self.tp_rank, self.tp_size
            )

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """Look up ``input_`` ids (any shape, usually ``[b, s]``) -> ``[*input_.shape, h]``."""
        if self.tp_size > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local_ids = input_
        output_parallel = F.embedding(local_ids, self.weight)  # [b, s, h]
        if self.tp_size > 1:
            output_parallel = output_parallel.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(output_parallel, self.tp_group)  # [s/tp, b, h]
        return reduce_from_tensor_model_parallel_region(output_parallel, self.tp_group)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (), metadata: dict[str, Any] | None = None
    ) -> ShardedStateDict:
        """Weight split along axis 0 (vocabulary)."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, per_partition={self.num_embeddings_per_partition}"
