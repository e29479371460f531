"""Random-number streams for tensor parallelism, and activation recompute that replays them.

Two streams matter:

* the default torch RNG, seeded identically on every TP rank, used for initialisation and for
  dropout on replicated activations (all ranks must drop the same elements);
* the tracker's ``'model-parallel-rng'`` stream, seeded ``seed + 2718 + tp_rank``, entered with
  ``get_rng_tracker().fork()`` around dropout on TP-split activations (e.g. attention probabilities
  of this rank's heads), so each rank draws independent masks.

The tracker keeps a CPU state and, once CUDA is in use, a CUDA state per stream: dropout draws
from the generator of the device it runs on, and both are swapped on ``fork``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.tensor_parallel.mappings import _gather_first_dim
from megatron_core.tensor_parallel.utils import split_tensor_along_dim

logger = logging.getLogger(__name__)

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_DATA_PARALLEL_RNG_TRACKER_NAME = "data-parallel-rng"
_TP_SEED_OFFSET = 2718

RNGState = dict[str, torch.Tensor]  # "cpu" -> state, optionally "cuda" -> state (current device)


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_rng_state() -> RNGState:
    """The default generators' states: CPU, and CUDA's current device when CUDA is initialised."""
    state = {"cpu": torch.get_rng_state()}
    if _cuda_in_use():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: RNGState) -> None:
    """Restore states captured by ``get_rng_state``."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _cuda_in_use():
        torch.cuda.set_rng_state(state["cuda"])


class RNGTrackerError(RuntimeError):
    """A named RNG stream is missing or added twice."""


class RNGStatesTracker:
    """Named random streams, each entered with ``fork(name)`` (works on CPU and CUDA)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every stream."""
        self.states_: dict[str, RNGState] = {}
        self.seeds_: dict[str, int] = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self) -> dict[str, RNGState]:
        """A copy of every stream's state (for checkpoints and recompute)."""
        return {name: {dev: s.clone() for dev, s in state.items()} for name, state in self.states_.items()}

    def set_states(self, states: dict[str, RNGState]) -> None:
        """Replace the streams' states with ``states`` (from ``get_states``)."""
        self.states_ = {name: {dev: s.clone() for dev, s in state.items()} for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (without touching the default generators).

        Raises:
            RNGTrackerError: ``name`` exists, or another stream already uses ``seed``.
        """
        if name in self.states_:
            raise RNGTrackerError(f"RNG stream {name!r} already exists; call reset() first or pick another name")
        for other, other_seed in self.seeds_.items():
            if other_seed == seed:
                raise RNGTrackerError(
                    f"seed {seed} for RNG stream {name!r} is already used by {other!r}; streams need distinct seeds"
                )
        self.seeds_[name] = seed
        self.states_[name] = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if _cuda_in_use():
            self.states_[name]["cuda"] = self._cuda_state_for(seed)

    def _add_default_stream(self, name: str) -> None:
        # Friendlier than failing: derive the stream from the default generator's seed, which the
        # caller seeded identically on every TP rank (or the run is not reproducible anyway).
        base = torch.initial_seed() % (2**62)
        offset = _TP_SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank()
        seed = base + offset if name == _MODEL_PARALLEL_RNG_TRACKER_NAME else base
        logger.warning(
            "RNG stream %r used before model_parallel_manual_seed(); seeding it with %d derived from "
            "torch.initial_seed(). Call model_parallel_manual_seed(seed) at start-up for reproducible runs.",
            name, seed,
        )
        self.add(name, seed)

    @staticmethod
    def _cuda_state_for(seed: int) -> torch.Tensor:
        saved = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(seed)
        state = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(saved)
        return state

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default generators are untouched after it."""
        if name not in self.states_ and name in (_MODEL_PARALLEL_RNG_TRACKER_NAME, _DATA_PARALLEL_RNG_TRACKER_NAME):
            self._add_default_stream(name)
        if name not in self.states_:
            raise RNGTrackerError(
                f"RNG stream {name!r} is not registered (have {sorted(self.states_)}); call "
                "model_parallel_manual_seed(seed) or get_rng_tracker().add(name, seed) first"
            )
        stream = self.states_[name]
        if _cuda_in_use() and "cuda" not in stream:  # CUDA came up after the stream was added
            stream["cuda"] = self._cuda_state_for(self.seeds_[name])
        outside = get_rng_state()
        set_rng_state(stream)
        try:
            yield
        finally:
            self.states_[name] = get_rng_state()  # the stream advances
            set_rng_state(outside)


CudaRNGStatesTracker = RNGStatesTracker  # Megatron-Core's name

_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker."""
    return _RNG_TRACKER


get_cuda_rng_tracker = get_rng_tracker  # Megatron-Core's name


def model_parallel_manual_seed(seed: int, tp_rank: int | None = None) -> None:
    """Seed the default RNG with ``seed`` (same on every TP rank) and the TP stream per rank.

    The tracker's ``'model-parallel-rng'`` stream gets ``seed + 2718 + tp_rank`` and
    ``'data-parallel-rng'`` gets ``seed``.

    Args:
        seed: the run's seed; the same on every rank of a model replica.
        tp_rank: override the tensor-parallel rank (default: ``parallel_state``'s).
    """
    rank = parallel_state.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    torch.manual_seed(seed)  # CPU and every CUDA device
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _TP_SEED_OFFSET + rank)
    _RNG_TRACKER.add(_DATA_PARALLEL_RNG_TRACKER_NAME, seed)


model_parallel_cuda_manual_seed = model_parallel_manual_seed  # Megatron-Core's name


# ----------------------------------------------------------------------------- activation recompute
class _CheckpointFunction(torch.autograd.Function):
    """Run ``function`` without keeping activations; rerun it in backward with the same randomness."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, function: Callable[..., Any], distribute_saved_activations: bool, _anchor: torch.Tensor,
        *args: Any,
    ) -> Any:
        ctx.function = function
        ctx.rng_state = get_rng_state()
        ctx.tracker_states = _RNG_TRACKER.get_states()
        with torch.no_grad():
            outputs = function(*args)

        ctx.distributed_shape = None
        group = parallel_state.get_tensor_model_parallel_group()
        first = args[0] if args else None
        if (distribute_saved_activations and isinstance(first, torch.Tensor)
                and parallel_state.group_world_size(group) > 1):
            # Each TP rank keeps 1/tp of the (replicated) first input; gathered back in backward.
            ctx.distributed_shape = first.shape
            ctx.first_requires_grad = first.requires_grad
            world, rank = parallel_state.group_world_size(group), parallel_state.group_rank(group)
            args = (split_tensor_along_dim(first.detach().reshape(-1), world, rank), *args[1:])
        ctx.arg_is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.non_tensor_args = [None if t else a for a, t in zip(args, ctx.arg_is_tensor, strict=True)]
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "tensor_parallel.checkpoint: recompute does not work with torch.autograd.grad(); "
                "call .backward() on the loss instead"
            )
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if is_tensor else a for a, is_tensor in zip(ctx.non_tensor_args, ctx.arg_is_tensor,
                                                                           strict=True)]
        if ctx.distributed_shape is not None:
            full = _gather_first_dim(inputs[0], parallel_state.get_tensor_model_parallel_group())
            inputs[0] = full.view(ctx.distributed_shape).requires_grad_(ctx.first_requires_grad)
        inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in inputs]

        outside_rng, outside_tracker = get_rng_state(), _RNG_TRACKER.get_states()
        set_rng_state(ctx.rng_state)
        _RNG_TRACKER.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        finally:
            set_rng_state(outside_rng)
            _RNG_TRACKER.set_states(outside_tracker)

        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads, strict=False)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        input_grads = tuple(a.grad if isinstance(a, torch.Tensor) else None for a in inputs)
        return (None, None, None, *input_grads)


def checkpoint(function: Callable[..., Any], distribute_saved_activations: bool, *args: Any) -> Any:
    """Full activation recompute: run ``function(*args)`` now, rerun it in backward.

    The default CPU/CUDA generators and the tracker's streams are restored for the rerun, so
    dropout masks (inside and outside ``fork()``) are identical; the generators are put back
    afterwards. Parameters used by ``function`` get gradients even if no input requires one.

    Args:
        function: the block to recompute (a layer's forward, or several).
        distribute_saved_activations: keep only 1/tp of ``args[0]`` (replicated across TP) between
            forward and backward; its element count must be divisible by the TP size.
        *args: the inputs; tensors are saved, anything else is passed through.
    """
    # A grad-requiring anchor makes autograd call backward even when no input requires grad.
    anchor = torch.empty(0, requires_grad=True)
    return _CheckpointFunction.apply(function, distribute_saved_activations, anchor, *args)
