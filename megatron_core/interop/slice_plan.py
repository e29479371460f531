"""Read only a rank's part of a tensor that a key-table transform fuses or reshapes (``load_hf_dir``).

The transforms that fuse or reshape Hugging Face tensors into ours (q/k/v into ``linear_qkv``,
gate/up into ``linear_fc1``, GPT-2's transposed ``Conv1D`` weights, ...) are pure reindexing: every
element of the output is one element of one source tensor, and which one depends on each output
dimension separately (output row r comes from source ``s(r)``, row ``i(r)``; output column c from
source column ``j(c)``). :func:`plan` finds those per-dimension maps without the weights, by running
the transform on small integer *probes* (one source dimension at a time, size 1 elsewhere, each
element holding its source number and position); :func:`gather` then reads, for the output box a
rank holds, only the box of each source that it needs (``safe_open(...).get_slice``) and places it.

Only transforms marked :func:`keymap.reindexing` are planned (arithmetic would corrupt the probes);
a group whose transform is not, or that the probes cannot explain (e.g. one stacked tensor split
into per-expert outputs), gives ``None`` and the caller reads it whole.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_core.interop.keymap import Transform, is_reindexing

#: Reads ``box`` of source number ``i``: ``read(i, box) -> tensor`` (only that box is read).
Reader = Callable[[int, tuple[slice, ...]], torch.Tensor]


@dataclass(frozen=True)
class DimMap:
    """Where output dimension ``j`` reads from.

    Attributes:
        source_dim: the source dimension it runs along.
        index: ``[size_j]`` position along ``source_dim`` per output position (None: the same position).
        source: ``[size_j]`` which source tensor per output position (None: not decided by this dimension).
    """

    source_dim: int
    index: torch.Tensor | None
    source: torch.Tensor | None


def _probes(shapes: Sequence[torch.Size], dim: int, stride: int) -> list[torch.Tensor]:
    """Per source: its positions along ``dim`` (plus ``source * stride``), size 1 along the other dims."""
    out = []
    for i, shape in enumerate(shapes):
        view = [1] * len(shape)
        view[dim] = shape[dim]
        out.append((torch.arange(shape[dim], dtype=torch.int64) + i * stride).reshape(view))
    return out


def _run(transform: Transform, tensors: list[torch.Tensor], output: int) -> torch.Tensor | None:
    try:
        results = list(transform(tensors))
    except (ValueError, RuntimeError, IndexError):
        return None  # this probe's shape does not fit the transform (e.g. a row count it checks)
    return results[output] if output < len(results) else None


def plan(transform: Transform, shapes: Sequence[torch.Size], output: int = 0) -> list[DimMap] | None:
    """Per output dimension of output number ``output``, where it reads from; None when it cannot be planned.

    Args:
        transform: the group's forward transform (sources in pattern order -> outputs).
        shapes: the sources' shapes (e.g. ``get_slice(key).get_shape()``).
        output: which output of the transform.
    """
    if not is_reindexing(transform) or len({len(s) for s in shapes}) != 1:
        return None
    shape = _run(transform, [torch.empty(s, device="meta") for s in shapes], output)
    if shape is None or shape.dim() != len(shapes[0]):
        return None
    full = tuple(shape.shape)
    stride = max(max(s) for s in shapes) + 1
    maps: dict[int, DimMap] = {}
    for dim in range(len(full)):
        probe = _run(transform, _probes(shapes, dim, stride), output)
        if probe is None or probe.dim() != len(full):
            continue
        along = [j for j, n in enumerate(probe.shape) if n != 1]
        if len(along) != 1 or probe.shape[along[0]] != full[along[0]] or along[0] in maps:
            continue
        codes = probe.reshape(-1)
        sources = codes // stride
        maps[along[0]] = DimMap(dim, codes % stride, sources if len(shapes) > 1 else None)
    return _complete(maps, full, shapes)


def _complete(maps: dict[int, DimMap], full: tuple[int, ...], shapes: Sequence[torch.Size]) -> list[DimMap] | None:
    """Pair the output dims no probe explained with the unused source dims, in order (same positions)."""
    free_sources = [d for d in range(len(full)) if d not in {m.source_dim for m in maps.values()}]
    free_outputs = [j for j in range(len(full)) if j not in maps]
    for j, d in zip(free_outputs, free_sources, strict=True):
        if any(s[d] != full[j] for s in shapes):
            return None
        maps[j] = DimMap(d, None, None)
    deciding = [m for m in maps.values() if m.source is not None]
    if len(shapes) > 1 and len(deciding) != 1:
        return None  # which source an element comes from must depend on exactly one output dimension
    return [maps[j] for j in range(len(full))]


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted positions as maximal runs of consecutive values ``[(start, stop), ...]``."""
    values = positions.unique().tolist()  # sorted
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def _read_runs(read: Callable[[tuple[slice, ...]], torch.Tensor], positions: list[torch.Tensor]) -> torch.Tensor:
    """The elements at ``positions`` (one index list per source dim), reading one box per combination of runs."""
    out: torch.Tensor | None = None
    for combo in itertools.product(*(_runs(p) for p in positions)):
        part = read(tuple(slice(a, b) for a, b in combo))
        picks = []
        for axis, ((a, b), p) in enumerate(zip(combo, positions, strict=True)):
            inside = ((p >= a) & (p < b)).nonzero().reshape(-1)  # where these elements go
            part = part.index_select(axis, p[inside] - a)
            picks.append(inside.reshape([-1 if k == axis else 1 for k in range(len(positions))]))
        if out is None:
            out = part.new_empty([len(p) for p in positions])
        out[tuple(picks)] = part
    assert out is not None
    return out


def gather(maps: Sequence[DimMap], local: Sequence[torch.Tensor], read: Reader) -> torch.Tensor:
    """The output at positions ``local[j]`` (per output dimension), reading only the boxes needed.

    Args:
        maps: :func:`plan`'s answer.
        local: per output dimension, the positions (into the full output) this rank holds.
        read: reads a box of one source.
    """
    decide = next((j for j, m in enumerate(maps) if m.source is not None), None)
    sources: torch.Tensor | None = None
    if decide is not None:
        source_map = maps[decide].source
        assert source_map is not None
        sources = source_map[local[decide]]
    out: torch.Tensor | None = None
    where = torch.empty(0, dtype=torch.int64)
    for src in (sources.unique().tolist() if sources is not None else [0]):
        picked = list(local)
        if decide is not None and sources is not None:
            where = torch.eq(sources, src).nonzero().reshape(-1)
            picked[decide] = local[decide][where]
        # per output dim: positions along its source dim
        positions = [picked[j] if m.index is None else m.index[picked[j]] for j, m in enumerate(maps)]
        order = sorted(range(len(maps)), key=lambda j: maps[j].source_dim)  # output dims in source-dim order
        block = _read_runs(functools.partial(read, int(src)), [positions[j] for j in order])
        block = block.permute([order.index(j) for j in range(len(maps))])  # source-dim order -> output order
        if out is None:
            out = block.new_empty([len(p) for p in local])
        if decide is None:
            out.copy_(block)
        else:
            out.index_copy_(decide, where, block)
    assert out is not None
    return out
