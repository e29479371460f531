"""Training checkpoints: model, optimizer, scheduler, iteration and RNG in one sharded checkpoint.

``SAVE_DIR/iter_0000100/`` is one ``dist_checkpointing`` checkpoint:

* every model tensor under its model key, and AdamW's moments under
  ``optimizer.state.<param key>.exp_avg`` / ``.exp_avg_sq``, sharded like their parameter (so a
  run saved at TP=2 resumes, or evaluates, at TP=1);
* ``rng_state``: a per-rank ``ShardedObject`` (torch's default generator, CUDA's, the tensor-parallel
  RNG tracker's states, Python's and NumPy's), restored only when world size, TP and PP are unchanged;
* the common state: iteration, consumed samples, scheduler, AdamW step, parallel sizes.

The optimizer is plain AdamW or the distributed optimizer (``optimizer.DistributedOptimizer``, its
sharded moments gathered per parameter); both write the same keys, so a
checkpoint of either resumes into either, at any (TP, PP, DP).

A checkpoint is complete once its ``metadata.json`` exists (``dist_checkpointing`` writes it last),
so ``latest_checkpoint`` skips a save that was interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing, parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict, ShardedTensor
from megatron_core.dist_checkpointing.metadata import torch_dtype
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.optimizer.distrib_optimizer import MASTER_KEY
from megatron_core.training.optimizer import (
    OptimizerStateError,
    load_optimizer_state,
    model_sharded_state_dict,
    optimizer_common_state,
    optimizer_sharded_state_dict,
)
from megatron_core.training.scheduler import WarmupCosineScheduler

logger = logging.getLogger(__name__)

_ITER_DIR = re.compile(r"^iter_(\d+)$")
RNG_KEY = "rng_state"
OPTIMIZER_PREFIX = "optimizer.state."


def checkpoint_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The complete checkpoint (one with ``metadata.json``) of the highest iteration, or None."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _ITER_DIR.match(p.name)) and (p / "metadata.json").is_file()]
    return max(found)[1] if found else None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _rng_tracker() -> Any:
    try:
        from megatron_core.tensor_parallel.random import get_rng_tracker
    except ImportError:  # tensor_parallel without an RNG tracker: nothing extra to save
        return None
    return get_rng_tracker()


def get_rng_state() -> dict[str, Any]:
    """Every random generator training touches, for this rank."""
    tracker = _rng_tracker()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states() if tracker is not None else None,
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
    }


def _numpy_state_to_plain(state: Any) -> tuple[Any, ...]:
    # Tensors and Python scalars only, so the state loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_plain(state: tuple[Any, ...]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _rng_tracker()
    if state.get("tracker") is not None and tracker is not None:
        tracker.set_states(state["tracker"])
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))


def _optimizer_sharded(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                       model_sd: ShardedStateDict) -> ShardedStateDict:
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.sharded_state_dict(model, model_sd)
    return optimizer_sharded_state_dict(optimizer, model, model_sd)


def _optimizer_common(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.common_state()  # a collective over the data-parallel group
    return optimizer_common_state(optimizer)


def _rng_object(data: Any) -> ShardedObject:
    world, rank = _world()
    return ShardedObject(RNG_KEY, data, global_shape=(world,), global_offset=(rank,), replica_id=0)


def save_checkpoint(save_dir: str | Path, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: WarmupCosineScheduler | None = None,
                    extra_common: dict[str, Any] | None = None) -> Path:
    """Save everything needed to resume at ``iteration``; returns the checkpoint directory."""
    path = checkpoint_dir(save_dir, iteration)
    sharded, common = _training_state(iteration, model, optimizer, scheduler, extra_common)
    dist_checkpointing.save(sharded, str(path), common_state_dict=common, overwrite=True)
    logger.debug("saved checkpoint %s", path)
    return path


def async_save_checkpoint(save_dir: str | Path, iteration: int, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer | None = None,
                          scheduler: WarmupCosineScheduler | None = None,
                          extra_common: dict[str, Any] | None = None) -> dist_checkpointing.AsyncSaveHandle:
    """``save_checkpoint`` in the background: returns once this rank's state is snapshotted
    (training may continue at once); ``handle.wait()`` until committed."""
    sharded, common = _training_state(iteration, model, optimizer, scheduler, extra_common)
    return dist_checkpointing.async_save(sharded, str(checkpoint_dir(save_dir, iteration)), common,
                                         overwrite=True)


def prune_checkpoints(save_dir: str | Path, keep_last_n: int, protect: Path | None = None) -> list[Path]:
    """Rank 0 deletes complete checkpoints older than the newest ``keep_last_n`` (never ``protect``,
    e.g. the one a run resumed from); returns what was deleted. Call only after the newest
    checkpoint is committed. Incomplete saves (``iter_N.tmp-*``) are left alone."""
    root = Path(save_dir)
    if _world()[1] != 0 or not root.is_dir():
        return []
    complete = sorted((int(m.group(1)), p) for p in root.iterdir()
                      if (m := _ITER_DIR.match(p.name)) and (p / "metadata.json").is_file())
    keep = protect.resolve() if protect is not None else None
    deleted = []
    for _, path in complete[:-keep_last_n]:
        if keep is not None and path.resolve() == keep:
            continue
        # the commit marker first: a deletion cut short leaves an incomplete checkpoint, never a damaged one
        (path / "metadata.json").unlink()
        shutil.rmtree(path)
        deleted.append(path)
        logger.info("keep_last_n=%d: deleted %s", keep_last_n, path)
    return deleted


def _training_state(iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: WarmupCosineScheduler | None, extra_common: dict[str, Any] | None
                    ) -> tuple[ShardedStateDict, dict[str, Any]]:
    model_sd = model_sharded_state_dict(model)
    sharded: ShardedStateDict = dict(model_sd)
    common: dict[str, Any] = {
        "iteration": iteration,
        "world_size": _world()[0],
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        **(extra_common or {}),
    }
    if optimizer is not None:
        sharded.update(_optimizer_sharded(optimizer, model, model_sd))
        common["optimizer"] = _optimizer_common(optimizer)
    if scheduler is not None:
        common["scheduler"] = scheduler.state_dict()
    sharded[RNG_KEY] = _rng_object(get_rng_state())
    return sharded, common


def load_model(checkpoint: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load only the model weights (any TP size); returns the checkpoint's common state."""
    return load_checkpoint(checkpoint, model, load_rng=False)


def load_checkpoint(checkpoint: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: WarmupCosineScheduler | None = None, load_rng: bool = True) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` saved into the given objects; returns the common state.

    Stored tensors are cast to the run's dtypes. With an optimizer (a resume) the fp32 master weights
    follow the precision of the run: a bf16 distributed-optimizer run resuming a checkpoint without
    them reads them from the checkpoint's weights in fp32; an fp32 run resuming a bf16 run's checkpoint
    takes its weights from the stored fp32 masters.

    ``model`` may be :class:`~megatron_core.training.chunks.ModelChunks` (virtual pipelining): checkpoint
    keys are global layer indices, so any PP / VPP layout loads any other's checkpoint.

    The RNG is restored only when the world size and the TP, PP and VPP sizes match the saving run's
    (otherwise a warning): per-rank generator states are only meaningful in the same roles (the
    ranks of one TP group must share the default generator).
    """
    path = Path(checkpoint)
    common = dist_checkpointing.load_common_state_dict(str(path))
    model_sd = _without_absent_extra_state(model_sharded_state_dict(model), path)
    sharded: ShardedStateDict = dict(model_sd)
    masters: ShardedStateDict = {}
    if optimizer is not None:
        if "optimizer" not in common:
            raise KeyError(f"{path}: holds no optimizer state (saved without one); load with optimizer=None")
        request, masters = _resume_requests(path, optimizer, model, model_sd)
        sharded.update(request)
    world = _world()[0]
    saved_layout = (common.get("world_size"), common.get("tensor_model_parallel_size", 1),
                    common.get("pipeline_model_parallel_size", 1), common.get("virtual_pipeline_model_parallel_size"))
    layout = (world, parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_virtual_pipeline_model_parallel_world_size())
    restore_rng = load_rng and saved_layout == layout
    if load_rng and not restore_rng and _world()[1] == 0:
        logger.warning("%s was saved at (world, TP, PP, VPP) = %s, this run is %s: RNG state not restored",
                       path, saved_layout, layout)
    if restore_rng:
        sharded[RNG_KEY] = _rng_object(None)
    # model-only loads leave optimizer state and RNG in the checkpoint: unexpected keys are fine
    # Stored tensors are cast to this run's dtypes (an fp32 run's checkpoint resumes a bf16 run and back).
    loaded = dist_checkpointing.load(sharded, str(path), strict="raise_missing", allow_dtype_cast=True)
    if masters:  # one more collective read, on every rank (the decision depends on the checkpoint only)
        loaded.update(dist_checkpointing.load(masters, str(path), strict="raise_missing", allow_dtype_cast=True))
    _copy_into_model(model, model_sd, loaded)
    if optimizer is not None:
        if isinstance(optimizer, DistributedOptimizer):
            optimizer.load_sharded_state_dict(model, model_sd, loaded, common["optimizer"])
        else:
            load_optimizer_state(optimizer, model, model_sd, loaded, common["optimizer"])
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng:
        set_rng_state(loaded[RNG_KEY])
    return common


def _resume_requests(path: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                     model_sd: ShardedStateDict) -> tuple[ShardedStateDict, ShardedStateDict]:
    """What a resume reads besides the model: (entries for the main load, fp32 masters read in a second load).

    The main load gets the optimizer state, and, for fp32 parameters whose checkpoint weights are in lower
    precision but which have fp32 masters there (a bf16 distributed-optimizer run), the masters as weights.
    """
    tensors = dist_checkpointing.read_metadata(path).tensors
    optimizer_sd = _optimizer_sharded(optimizer, model, model_sd)
    masters = _masters_to_read_from_weights(path, optimizer_sd, set(tensors))
    request = {k: v for k, v in optimizer_sd.items() if k not in masters}
    for key, entry in model_sd.items():
        master = f"{OPTIMIZER_PREFIX}{entry.key}.{MASTER_KEY}"
        if (isinstance(entry, ShardedTensor) and entry.dtype == torch.float32 and master in tensors
                and entry.key in tensors and torch_dtype(tensors[entry.key].dtype) != torch.float32):
            request[key] = dataclasses.replace(entry, key=master)  # the weight's full-precision value
    return request, masters


def _masters_to_read_from_weights(path: Path, optimizer_sd: ShardedStateDict, stored: set[str]) -> ShardedStateDict:
    """The fp32 master weights (``...fp32_param``) to read from the model weights, when the checkpoint has none.

    A bf16 run with the distributed optimizer keeps fp32 masters; a checkpoint of an fp32 run or of
    plain AdamW holds none. The masters then start from the checkpoint's model weights, read in
    fp32 (so an fp32 run's weights are taken exactly, not rounded through bf16), as Megatron-Core
    starts masters from the model. Same dictionary keys as the optimizer's entries, model keys inside.

    Raises:
        OptimizerStateError: the checkpoint holds no AdamW moments, or fp32 masters for some
            parameters but not for one this run needs.
    """
    if not any(k.startswith(OPTIMIZER_PREFIX) for k in stored):
        raise OptimizerStateError(
            f"{path}: holds no AdamW moments ({OPTIMIZER_PREFIX}<param key>.exp_avg / .exp_avg_sq), so the "
            "optimizer cannot resume from it; load the weights only (megatron_core.training.load_model, or "
            "load_checkpoint(..., optimizer=None)) and start a fresh optimizer"
        )
    wanted = {k: v for k, v in optimizer_sd.items() if k.endswith(f".{MASTER_KEY}")}
    if not wanted or any(k.endswith(f".{MASTER_KEY}") for k in stored):
        missing = sorted(v.key for v in wanted.values() if isinstance(v, ShardedTensor) and v.key not in stored)
        if wanted and missing:
            raise OptimizerStateError(
                f"{path}: holds fp32 master weights ({MASTER_KEY}) for some parameters but not {missing[0]!r}: "
                "a damaged or hand-edited checkpoint; resume from another checkpoint"
            )
        return {}
    logger.info("%s holds no fp32 master weights (%s): they start from its model weights, read in fp32",
                path, MASTER_KEY)
    return {k: dataclasses.replace(v, key=v.key[len(OPTIMIZER_PREFIX):-len(MASTER_KEY) - 1])
            for k, v in wanted.items()}


EXTRA_STATE_SUFFIX = "_extra_state"


def _without_absent_extra_state(model_sd: ShardedStateDict, path: Path) -> ShardedStateDict:
    """``model_sd`` less the TE ``_extra_state`` objects (FP8 state) that the checkpoint lacks.

    A checkpoint saved without ``fp8`` holds none: an FP8 run starting from it keeps its fresh FP8
    scaling state instead of failing on the missing keys.
    """
    wanted = {k: v.key for k, v in model_sd.items() if isinstance(v, ShardedObject) and v.key.endswith(EXTRA_STATE_SUFFIX)}
    if not wanted:
        return model_sd
    stored = dist_checkpointing.read_metadata(str(path)).objects
    absent = {k for k, key in wanted.items() if key not in stored}
    if absent:
        logger.info("%s holds no FP8 state for %d TE module(s) (saved without fp8): their FP8 scaling starts fresh",
                    path, len(absent))
    return {k: v for k, v in model_sd.items() if k not in absent}


def _copy_into_model(model: torch.nn.Module, model_sd: ShardedStateDict, loaded: dict[str, Any]) -> None:
    state = model.state_dict(keep_vars=True)
    for key in model_sd:
        if key not in state:
            raise KeyError(f"sharded_state_dict key {key!r} is not a state_dict() key of {type(model).__name__}")
        if key.endswith(EXTRA_STATE_SUFFIX):  # a TE module's FP8 state: not a tensor to copy into, handed back whole
            model.get_submodule(key.rpartition(".")[0]).set_extra_state(loaded[key])
            continue
        with torch.no_grad():
            state[key].copy_(loaded[key])
