"""Process groups for tensor, context, data and pipeline parallelism over ``torch.distributed``.

Rank layout (as in Megatron-Core's default "tp-cp-dp-pp" order): tensor-parallel groups are blocks
of contiguous ranks, context-parallel groups join ranks with the same TP, DP and PP position,
data-parallel groups join ranks with the same TP, CP and PP position, and pipeline-parallel groups
stride over the whole world::

    global_rank = tp_rank + tp_size * (cp_rank + cp_size * (dp_rank + dp_size * pp_rank))

Context-parallel ranks hold the same weights and different parts of each sequence, so gradients are
reduced over data x context parallel ranks (``get_data_parallel_group(with_context_parallel=True)``),
while data (samples) is sharded over the data-parallel ranks only: the CP ranks of one data-parallel
rank read the same batch and each keeps its chunks of the sequence.

Expert parallelism (as in Megatron-Core) is carved out of the data x context parallel ranks: with
``q = cp_rank + cp_size * dp_rank`` (the rank's index among the ``dp_size * cp_size`` ranks of its TP
and PP position), ``q = ep_rank + ep_size * edp_rank``. An expert-parallel group joins ``ep_size``
consecutive such ranks: each holds a different slice of the experts and they exchange tokens
(context-parallel ranks hold other tokens of the same sequences; the MoE layer is token-wise, so
which ranks' tokens meet does not matter). The expert-data-parallel group joins the ranks that hold
the *same* experts (same TP, PP and EP position): expert gradients are summed over it (scaled like
every other gradient, by 1 / (DP x CP)), where every other gradient is averaged over the full data x
context parallel group. Without CP, ``q`` is the data-parallel rank. Experts are split over TP like
dense MLPs (expert tensor parallel size = TP).

Without ``torch.distributed`` initialised, and with every size 1, the module behaves as a single
process (world size 1, rank 0, group ``None``) so that nothing needs a launcher.

This module is the only global mutable state in the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed import ProcessGroup

if TYPE_CHECKING:
    from megatron_core.config import TransformerConfig


class ParallelStateError(RuntimeError):
    """The requested parallel layout cannot be set up."""


class ParallelSizeMismatchError(ValueError):
    """A config's parallel size disagrees with the process group that will split the module."""


@dataclass
class _ParallelState:
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: ProcessGroup | None
    pp_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    mp_group: ProcessGroup | None  # tensor x pipeline: one model replica
    embedding_group: ProcessGroup | None  # first and last pipeline stage, for tied embeddings
    pp_ranks: list[int]  # global ranks of this rank's pipeline group, by stage
    embedding_ranks: list[int]
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: ProcessGroup | None = None
    cp_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's context-parallel group, by CP rank
    dp_cp_group: ProcessGroup | None = None  # data x context parallel: where gradients are reduced
    amax_group: ProcessGroup | None = None  # tensor x data x context parallel (one pipeline stage): FP8 amax
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: ProcessGroup | None = None
    edp_size: int = 1
    edp_rank: int = 0
    edp_group: ProcessGroup | None = None
    vpp_size: int | None = None  # model chunks per pipeline rank (interleaved 1F1B); None: not interleaved
    vpp_rank: int = 0  # the chunk being built or run


_STATE: _ParallelState | None = None

_SINGLE = _ParallelState(1, 1, 1, 0, 0, 0, None, None, None, None, None, [0], [0])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> None:
    """Create the tensor-, context-, data- and pipeline-parallel groups of the current world.

    Args:
        tensor_model_parallel_size: ranks that split each layer's weights.
        pipeline_model_parallel_size: stages the layer stack is split into.
        expert_model_parallel_size: data-parallel ranks that split the MoE experts among them.
        context_parallel_size: ranks that split each sequence (ring attention).
        virtual_pipeline_model_parallel_size: model chunks per pipeline rank for the interleaved
            1F1B schedule (None: one chunk).

    Raises:
        ParallelStateError: torch.distributed is not initialised while a size > 1 is asked for,
            the world size is not divisible by TP * CP * PP, data-parallel x context-parallel size
            is not divisible by EP, or the state is already initialised.
    """
    global _STATE
    if _STATE is not None:
        raise ParallelStateError(
            "model parallel state is already initialised; call destroy_model_parallel() first"
        )
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    cp = context_parallel_size
    if tp < 1 or pp < 1 or ep < 1 or cp < 1:
        raise ParallelStateError(
            f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}, "
            f"expert_model_parallel_size={ep}, context_parallel_size={cp}: sizes must be >= 1"
        )
    if not (dist.is_available() and dist.is_initialized()):
        if tp * pp * ep * cp != 1:
            raise ParallelStateError(
                f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} x "
                f"expert_model_parallel_size={ep} x context_parallel_size={cp} needs "
                "torch.distributed: launch with torchrun and call "
                "torch.distributed.init_process_group() first"
            )
        _STATE = _ParallelState(**vars(_SINGLE))
        set_virtual_pipeline_model_parallel_world_size(virtual_pipeline_model_parallel_size)
        return

    world, rank = _world()
    if world % (tp * cp * pp) != 0:
        raise ParallelStateError(
            f"world size {world} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"context_parallel_size ({cp}) x pipeline_model_parallel_size ({pp}) = {tp * cp * pp}; "
            f"launch a multiple of {tp * cp * pp} processes"
        )
    dp = world // (tp * cp * pp)
    if (dp * cp) % ep != 0:
        raise ParallelStateError(
            f"expert_model_parallel_size={ep} must divide data-parallel size {dp} x context_parallel_size {cp} "
            f"= {dp * cp} (world {world} / (TP {tp} x PP {pp})): expert ranks are carved out of the data x "
            f"context parallel ranks; launch a multiple of {tp * pp * ep} processes or lower "
            "expert_model_parallel_size"
        )

    def rank_of(t: int, d: int, p: int, c: int = 0) -> int:
        return t + tp * (c + cp * (d + dp * p))

    cps = range(cp)
    tp_lists = [[rank_of(t, d, p, c) for t in range(tp)] for d in range(dp) for p in range(pp) for c in cps]
    cp_lists = [[rank_of(t, d, p, c) for c in cps] for d in range(dp) for p in range(pp) for t in range(tp)]
    dp_lists = [[rank_of(t, d, p, c) for d in range(dp)] for p in range(pp) for t in range(tp) for c in cps]
    dp_cp_lists = [sorted(rank_of(t, d, p, c) for d in range(dp) for c in cps) for p in range(pp)
                   for t in range(tp)]
    amax_lists = [list(range(p * tp * cp * dp, (p + 1) * tp * cp * dp)) for p in range(pp)]  # pp is outermost
    pp_lists = [[rank_of(t, d, p, c) for p in range(pp)] for d in range(dp) for t in range(tp) for c in cps]
    embedding_lists = [[ranks[0], ranks[-1]] if pp > 1 else [ranks[0]] for ranks in pp_lists]
    mp_lists = [sorted(rank_of(t, d, p, c) for p in range(pp) for t in range(tp)) for d in range(dp) for c in cps]
    tp_group, _ = _create_groups(tp_lists, rank)
    cp_group, cp_ranks = _create_groups(cp_lists, rank)
    dp_group, _ = _create_groups(dp_lists, rank)
    dp_cp_group, _ = _create_groups(dp_cp_lists, rank)
    amax_group, _ = _create_groups(amax_lists, rank)
    pp_group, pp_ranks = _create_groups(pp_lists, rank)
    embedding_group, embedding_ranks = _create_groups(embedding_lists, rank)
    mp_group, _ = _create_groups(mp_lists, rank)
    edp = dp * cp // ep

    def rank_of_q(t: int, q: int, p: int) -> int:  # q = c + cp * d = e + ep * k
        return rank_of(t, q // cp, p, q % cp)

    ep_lists = [[rank_of_q(t, e + ep * k, p) for e in range(ep)] for p in range(pp) for k in range(edp)
                for t in range(tp)]
    edp_lists = [[rank_of_q(t, e + ep * k, p) for k in range(edp)] for p in range(pp) for e in range(ep)
                 for t in range(tp)]
    ep_group, _ = _create_groups(ep_lists, rank)
    edp_group, _ = _create_groups(edp_lists, rank)
    dp_rank = (rank // (tp * cp)) % dp
    q_rank = (rank // tp) % cp + cp * dp_rank
    _STATE = _ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp,
        tp_rank=rank % tp, pp_rank=rank // (tp * cp * dp), dp_rank=dp_rank,
        cp_size=cp, cp_rank=(rank // tp) % cp, cp_group=cp_group, cp_ranks=tuple(cp_ranks), dp_cp_group=dp_cp_group,
        amax_group=amax_group,
        tp_group=tp_group, pp_group=pp_group, dp_group=dp_group, mp_group=mp_group,
        embedding_group=embedding_group, pp_ranks=pp_ranks, embedding_ranks=embedding_ranks,
        ep_size=ep, ep_rank=q_rank % ep, ep_group=ep_group,
        edp_size=edp, edp_rank=q_rank // ep, edp_group=edp_group,
    )
    set_virtual_pipeline_model_parallel_world_size(virtual_pipeline_model_parallel_size)


def _create_groups(rank_lists: list[list[int]], rank: int) -> tuple[ProcessGroup | None, list[int]]:
    """Create one group per rank list; return the group holding ``rank`` and its ranks.

    Every rank must create every group, in the same order (torch.distributed's contract).
    """
    mine: tuple[ProcessGroup | None, list[int]] = (None, [])
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    return mine


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself stays up; destroy it with torch.distributed)."""
    global _STATE
    _STATE = None


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def _state() -> _ParallelState:
    # Uninitialised state reads as a single process so that TP=1 code runs without setup.
    return _STATE if _STATE is not None else _SINGLE


# ---- tensor parallel
def get_tensor_model_parallel_group() -> ProcessGroup | None:
    return _state().tp_group


def get_tensor_model_parallel_world_size() -> int:
    return _state().tp_size


def get_tensor_model_parallel_rank() -> int:
    return _state().tp_rank


# ---- context parallel
def get_context_parallel_group() -> ProcessGroup | None:
    """Ranks that split each sequence (ring attention); None without torch.distributed."""
    return _state().cp_group


def get_context_parallel_world_size() -> int:
    return _state().cp_size


def get_context_parallel_rank() -> int:
    return _state().cp_rank


def get_context_parallel_global_ranks() -> list[int]:
    """Global ranks of this rank's context-parallel group, ordered by CP rank."""
    return list(_state().cp_ranks)


# ---- data parallel
def get_data_parallel_group(with_context_parallel: bool = False) -> ProcessGroup | None:
    """Replicas of this rank's weights with different samples; ``with_context_parallel`` adds the
    CP ranks (same weights, other parts of the sequences): the group gradients are reduced over."""
    state = _state()
    if with_context_parallel and state.cp_size > 1:
        return state.dp_cp_group
    return state.dp_group


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    state = _state()
    return state.dp_size * (state.cp_size if with_context_parallel else 1)


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    state = _state()
    return state.dp_rank * state.cp_size + state.cp_rank if with_context_parallel else state.dp_rank


# ---- expert parallel (MoE)
def get_expert_model_parallel_group() -> ProcessGroup | None:
    """Ranks that split the experts among them and exchange tokens (None when EP = 1 without dist)."""
    return _state().ep_group


def get_expert_model_parallel_world_size() -> int:
    return _state().ep_size


def get_expert_model_parallel_rank() -> int:
    return _state().ep_rank


def get_expert_data_parallel_group() -> ProcessGroup | None:
    """Ranks holding the same experts: expert gradients are averaged over this group."""
    return _state().edp_group


def get_expert_data_parallel_world_size() -> int:
    return _state().edp_size


def get_expert_data_parallel_rank() -> int:
    return _state().edp_rank


# ---- pipeline parallel
def get_pipeline_model_parallel_group() -> ProcessGroup | None:
    return _state().pp_group


def get_pipeline_model_parallel_world_size() -> int:
    return _state().pp_size


def get_pipeline_model_parallel_rank() -> int:
    return _state().pp_rank


def get_pipeline_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline group, ordered by stage."""
    return list(_state().pp_ranks)


def get_pipeline_model_parallel_next_rank() -> int:
    state = _state()
    return state.pp_ranks[(state.pp_rank + 1) % state.pp_size]


def get_pipeline_model_parallel_prev_rank() -> int:
    state = _state()
    return state.pp_ranks[(state.pp_rank - 1) % state.pp_size]


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """First stage; with virtual pipelining also its first model chunk (unless ``ignore_virtual``)."""
    state = _state()
    return state.pp_rank == 0 and (ignore_virtual or state.vpp_size is None or state.vpp_rank == 0)


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """Last stage; with virtual pipelining also its last model chunk (unless ``ignore_virtual``)."""
    state = _state()
    last_chunk = ignore_virtual or state.vpp_size is None or state.vpp_rank == state.vpp_size - 1
    return state.pp_rank == state.pp_size - 1 and last_chunk


# ---- virtual pipeline (interleaved 1F1B): each rank holds several model chunks
def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    """Model chunks per pipeline rank; None without interleaving."""
    return _state().vpp_size


def set_virtual_pipeline_model_parallel_world_size(size: int | None) -> None:
    """Interleave ``size`` model chunks per pipeline rank (None: one, not interleaved)."""
    if size is not None and size < 1:
        raise ParallelStateError(f"virtual_pipeline_model_parallel_size={size}: must be >= 1 or None")
    if _STATE is None:
        raise ParallelStateError("initialize_model_parallel() first, then set the virtual pipeline size")
    _STATE.vpp_size, _STATE.vpp_rank = size, 0


def get_virtual_pipeline_model_parallel_rank() -> int:
    """The model chunk being built or run on this rank (0 without interleaving)."""
    return _state().vpp_rank


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    """Select the model chunk that stage checks (first/last stage, layer offsets) refer to."""
    state = _state()
    if state.vpp_size is None or not 0 <= rank < state.vpp_size:
        raise ParallelStateError(
            f"virtual pipeline rank {rank} is out of range for virtual_pipeline_model_parallel_size="
            f"{state.vpp_size}; set the size first (initialize_model_parallel(..., "
            "virtual_pipeline_model_parallel_size=v))"
        )
    state.vpp_rank = rank


# ---- model parallel (one replica) and embedding sync
def get_model_parallel_group() -> ProcessGroup | None:
    return _state().mp_group


def get_amax_reduction_group() -> ProcessGroup | None:
    """Tensor x data x context parallel ranks of this pipeline stage (Megatron-Core's FP8 amax group with CP)."""
    return _state().amax_group


def get_embedding_group() -> ProcessGroup | None:
    """Group of the first and last pipeline stage (tied word embeddings); None on middle stages."""
    return _state().embedding_group


def is_rank_in_embedding_group() -> bool:
    _, rank = _world()
    return rank in _state().embedding_ranks


def group_world_size(group: ProcessGroup | None) -> int:
    """World size of ``group``. ``None`` means "no parallelism here" (size 1), never WORLD."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank within ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


# ---- one source of truth for parallel sizes
@dataclass(frozen=True)
class ParallelDimension:
    """One way of splitting a model: the config field that states its size and the group that has it.

    Attributes:
        field: the ``TransformerConfig`` field holding the size.
        group_arg: the name under which a module takes an explicit group of this dimension.
        world_size: parallel_state's size of this dimension.
    """

    field: str
    group_arg: str
    world_size: Callable[[], int]


# A new parallel dimension (expert, context) is one more row here; every module checks it then.
PARALLEL_DIMENSIONS: tuple[ParallelDimension, ...] = (
    ParallelDimension("tensor_model_parallel_size", "tp_group", get_tensor_model_parallel_world_size),
    ParallelDimension("pipeline_model_parallel_size", "pp_group", get_pipeline_model_parallel_world_size),
    ParallelDimension("expert_model_parallel_size", "ep_group", get_expert_model_parallel_world_size),
    ParallelDimension("context_parallel_size", "cp_group", get_context_parallel_world_size),
)


def check_config_parallel_sizes(
    config: TransformerConfig, groups: Mapping[str, ProcessGroup | None] | None = None
) -> None:
    """Raise unless every parallel size in ``config`` equals the size of the group that splits the module.

    The process groups decide; the config must agree, so that its divisibility checks (heads, query
    groups, FFN width by the TP size) are the ones that hold for the groups really used.

    Args:
        config: the config a module is being built with.
        groups: explicit groups handed to the module, by argument name (``{"tp_group": group}``);
            a missing or ``None`` entry means parallel_state's group.

    Raises:
        ParallelSizeMismatchError: a size disagrees; the message names the field, both sizes and the fix.
        ValueError: ``groups`` names an argument that is no parallel dimension.
    """
    given = dict(groups or {})
    known = {dim.group_arg for dim in PARALLEL_DIMENSIONS}
    if not set(given) <= known:
        raise ValueError(f"check_config_parallel_sizes: unknown group arguments {sorted(set(given) - known)}; "
                         f"use {sorted(known)}")
    for dim in PARALLEL_DIMENSIONS:
        expected = getattr(config, dim.field)
        group = given.get(dim.group_arg)
        if group is not None:
            actual = group_world_size(group)
            where = f"the {dim.group_arg} passed to the module has {actual} rank(s)"
            fix = f"pass a {dim.group_arg} of {expected} ranks, or set {dim.field}={actual} in the config"
        else:
            actual = dim.world_size()
            state = "" if model_parallel_is_initialized() else " (not initialised: a single process)"
            where = f"parallel_state{state} has {dim.field}={actual}"
            fix = (f"call parallel_state.initialize_model_parallel({dim.field}={expected}, ...) before building "
                   f"the model, or set {dim.field}={actual} in the config")
        if expected != actual:
            raise ParallelSizeMismatchError(f"config.{dim.field}={expected} but {where}. Fix: {fix}")
