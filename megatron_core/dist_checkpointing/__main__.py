"""Command line: look into a checkpoint, or check every byte of it.

    python -m megatron_core.dist_checkpointing inspect DIR   # keys, shapes, dtypes, grid, bytes
    python -m megatron_core.dist_checkpointing verify DIR    # every checksum, every file

``verify`` exits with status 1 when anything is missing, corrupted or would need unpickling
(``UNSAFE``: a file from an older version; load it with ``allow_pickle=True`` only if trusted),
2 when DIR is not a (complete, undamaged) checkpoint.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_core import cli
from megatron_core.dist_checkpointing.checksums import crc32c
from megatron_core.dist_checkpointing.errors import (
    CheckpointingError,
    CorruptedCheckpointError,
    MissingChunkError,
    UnsafeCheckpointError,
)
from megatron_core.dist_checkpointing.metadata import (
    METADATA_FILE,
    CheckpointMetadata,
    TensorRecord,
    metadata_is_sealed,
    read_metadata,
    torch_dtype,
)
from megatron_core.dist_checkpointing.planner import box_of, plan_reads
from megatron_core.dist_checkpointing.tensorstore_io import TensorReader, check_chunk_files
from megatron_core.dist_checkpointing.torch_files import read_torch_file


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def inspect(path: Path, metadata: CheckpointMetadata) -> None:
    """Print a summary table of the checkpoint."""
    sizes = ", ".join(f"{k}={v}" for k, v in metadata.parallel_sizes.items()) or "-"
    print(f"checkpoint  {path}")
    print(f"format      {metadata.format} version {metadata.version}")
    print(f"saved by    world size {metadata.world_size} ({sizes})")
    rows = [("key", "dtype", "global shape", "shard grid", "inner chunk", "shards", "bytes")]
    total = 0
    for key, rec in sorted(metadata.tensors.items()):
        grid = "x".join(str(math.ceil(g / c) if g else 1) for g, c in zip(rec.global_shape, rec.chunk_shape,
                                                                           strict=True)) or "1"
        rows.append((key, rec.dtype, str(tuple(rec.global_shape)), grid, str(tuple(rec.inner_chunk_shape)),
                     str(len(rec.shards)), _human(rec.nbytes)))
        total += rec.nbytes
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"{len(metadata.tensors)} tensors, {_human(total)}")
    for key, obj in sorted(metadata.objects.items()):
        print(f"object {key}: global shape {tuple(obj.global_shape)}, {len(obj.shards)} shard(s)")
    if metadata.common is not None:
        print(f"common state: {metadata.common.path}")


def verify(path: Path, metadata: CheckpointMetadata) -> int:
    """Check every stored byte: chunk checksums (tensorstore), the crc32c of every ``torch.save``
    file and ``zarr.json``, and that no file needs unpickling. Returns the number of failures."""
    reader = TensorReader(path)
    failures = 0
    if not metadata_is_sealed(path):
        print(f"note  {METADATA_FILE} has no checksum of its own (written by an older version)")
    for key, rec in sorted(metadata.tensors.items()):
        try:
            for shard in rec.shards:  # one shard at a time keeps memory at one shard
                box = box_of(shard.offset, shard.shape)
                check_chunk_files(path, key, rec, [box])
                scratch = torch.empty(shard.shape, dtype=torch_dtype(rec.dtype))
                reader.read_into(key, rec, scratch, plan_reads(shard.offset, shard.shape, [box]).items)
                reader.finish()
            _check_zarr_json(path, key, rec)
            print(f"ok    {key}")
        except CheckpointingError as e:
            failures += 1
            print(f"FAIL  {key}: {e}")
    files = [(f"object {k} {tuple(s.offset)}", s.path, s.crc32c)
             for k, o in sorted(metadata.objects.items()) for s in o.shards]
    if metadata.common is not None:
        files.append(("common state", metadata.common.path, metadata.common.crc32c))
    for what, rel, crc in files:
        try:
            read_torch_file(path / rel, what, crc, allow_pickle=False)
            print(f"ok    {what}" + ("" if crc is not None else " (no checksum: written by an older version)"))
        except UnsafeCheckpointError as e:
            failures += 1
            print(f"UNSAFE {what}: {e}")
        except CheckpointingError as e:
            failures += 1
            print(f"FAIL  {what}: {e}")
    print(f"{'verified' if not failures else 'FAILED'}: {len(metadata.tensors)} tensors, {len(files)} files, "
          f"{failures} failure(s)")
    return failures


def _check_zarr_json(path: Path, key: str, rec: TensorRecord) -> None:
    if rec.zarr_json_crc32c is None:
        return
    file = path / rec.path / "zarr.json"
    try:
        found = crc32c(file.read_bytes())
    except OSError as e:
        raise MissingChunkError(f"{key}: cannot read {str(file)!r}: {e}") from e
    if found != rec.zarr_json_crc32c:
        raise CorruptedCheckpointError(f"{key}: {str(file)!r} failed its checksum (crc32c {found:08x}, "
                                       f"{METADATA_FILE} records {rec.zarr_json_crc32c:08x})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m megatron_core.dist_checkpointing",
                                     description="Inspect or verify a megatron_core checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("inspect", "keys, shapes, dtypes, shard grid, bytes, saving parallel sizes"),
                       ("verify", "read every chunk and check every checksum")):
        sub.add_parser(name, help=text).add_argument("checkpoint_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        metadata = read_metadata(args.checkpoint_dir)
    except CheckpointingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "inspect":
        inspect(args.checkpoint_dir, metadata)
        return 0
    return 1 if verify(args.checkpoint_dir, metadata) else 0


if __name__ == "__main__":
    cli.run(main, user_errors=(CheckpointingError,))  # also: `... inspect DIR | head` exits quietly
