"""Checkpoint planning at scale, simulated in one process: a Llama-70B-shaped model at 1024 and
4096 ranks.

Saving and loading plan from shard descriptions alone (no tensor is touched), so this builds the
descriptions every rank of a real layout would produce and times, on them, what a real run does:

* the save's validation that every rank runs on the gathered descriptions (each key's main
  replicas tile its tensor exactly once; shapes and dtypes agree) and the storage layout derived
  from them (``plan_cache.build_plan``);
* the size of what each rank contributes to the gather (``all_gather_object`` pickles it), the
  total every rank receives, and what a repeated save of the same structure sends instead (the
  cached plan: one digest per rank);
* ``metadata.json``: its size, and the time to parse and check it (``read_metadata``);
* one rank's load plan against that metadata (``plan_reads`` for each of its tensors).

Layout: Llama-70B (80 layers, hidden 8192, FFN 28672 SwiGLU, 64 heads, 8 KV groups, vocabulary
128256), TP=8 x PP=8 x DP=16 (1024 ranks) and TP=8 x PP=8 x DP=64 (4096 ranks). Each parameter's
two AdamW moments are sharded as a distributed optimizer shards them: the TP shard split again
over the DP ranks along its first axis, each DP rank the main replica of its slice.

    .venv/bin/python bench/checkpoint_plan_scale.py
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core.dist_checkpointing.gc_pause import gc_paused  # noqa: E402
from megatron_core.dist_checkpointing.metadata import CheckpointMetadata, read_metadata, write_metadata  # noqa: E402
from megatron_core.dist_checkpointing.plan_cache import digest, plan_validated  # noqa: E402
from megatron_core.dist_checkpointing.planner import ShardIndex  # noqa: E402
from megatron_core.dist_checkpointing.validation import ShardDesc, summarize, validate_gathered  # noqa: E402

LAYERS, HIDDEN, FFN, HEADS, GROUPS, VOCAB = 80, 8192, 28672, 64, 8, 128256
QKV = (HEADS + 2 * GROUPS) * (HIDDEN // HEADS)


def _params(pp_rank: int, pp: int) -> list[tuple[str, tuple[int, ...], int | None, int]]:
    """(key, global shape, TP-split axis or None, fragments along it per TP rank) of one stage."""
    out: list[tuple[str, tuple[int, ...], int | None, int]] = []
    per = LAYERS // pp
    for layer in range(pp_rank * per, (pp_rank + 1) * per):
        p = f"decoder.layers.{layer}."
        out += [(p + "input_layernorm.weight", (HIDDEN,), None, 1),
                (p + "self_attention.linear_qkv.weight", (QKV, HIDDEN), 0, 1),
                (p + "self_attention.linear_proj.weight", (HIDDEN, HIDDEN), 1, 1),
                (p + "pre_mlp_layernorm.weight", (HIDDEN,), None, 1),
                (p + "mlp.linear_fc1.weight", (2 * FFN, HIDDEN), 0, 2),  # [gate; up]: two fragments per rank
                (p + "mlp.linear_fc2.weight", (HIDDEN, FFN), 1, 1)]
    if pp_rank == 0:
        out.append(("embedding.word_embeddings.weight", (VOCAB, HIDDEN), 0, 1))
    if pp_rank == pp - 1:
        out += [("decoder.final_layernorm.weight", (HIDDEN,), None, 1), ("output_layer.weight", (VOCAB, HIDDEN), 0, 1)]
    return out


def rank_descs(rank: int, tp: int, pp: int, dp: int) -> list[ShardDesc]:
    """What rank ``rank`` (TP fastest, then DP, then PP, as Megatron orders them) describes."""
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    descs = []
    for key, shape, axis, frags in _params(pp_rank, pp):
        boxes = []
        if axis is None:  # replicated over TP: TP rank 0 of DP rank 0 writes it
            boxes.append(((0,) * len(shape), shape, tp_rank == 0))
        else:
            n = tp * frags
            step = shape[axis] // n
            for f in range(frags):
                i = f * tp + tp_rank
                off = tuple(i * step if a == axis else 0 for a in range(len(shape)))
                shp = tuple(step if a == axis else s for a, s in enumerate(shape))
                boxes.append((off, shp, True))
        for off, shp, tp_main in boxes:
            descs.append(ShardDesc(key, False, shape, "bfloat16", off, shp, tp_main and dp_rank == 0, rank))
            # the distributed optimizer: this TP shard split over DP along axis 0
            lo, hi = shp[0] * dp_rank // dp, shp[0] * (dp_rank + 1) // dp
            for moment in ("exp_avg", "exp_avg_sq"):
                descs.append(ShardDesc(f"optimizer.state.{key}.{moment}", False, shape, "float32",
                                       (off[0] + lo, *off[1:]), (hi - lo, *shp[1:]), tp_main, rank))
    return descs


def measure(tp: int, pp: int, dp: int, repeats: int) -> dict[str, float]:
    world = tp * pp * dp
    t0 = time.process_time()
    per_rank = [rank_descs(r, tp, pp, dp) for r in range(world)]
    build_s = time.process_time() - t0
    # what each rank sends in the first save's gather (all_gather_object pickles it)
    sent = [pickle.dumps(summarize(d, r)) for r, d in enumerate(per_rank)]
    cached = len(pickle.dumps((digest(per_rank[0]), "0" * 40, None, [], [])))
    decode, valid = [], []
    for _ in range(repeats):
        with gc_paused():  # as plan_cache does
            t0 = time.process_time()
            gathered = [pickle.loads(b) for b in sent]
            t1 = time.process_time()
            validated = validate_gathered(gathered)
            plan = plan_validated(validated)
            t2 = time.process_time()
        decode.append(t1 - t0)
        valid.append(t2 - t1)
        assert not validated.problems, validated.problems[:5]
        del gathered, validated
    meta = CheckpointMetadata(world_size=world, parallel_sizes={"tensor_model_parallel_size": tp,
                              "pipeline_model_parallel_size": pp, "data_parallel_size": dp},
                              tensors={}, objects={})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()  # rank 0, in the background of an async save: the records' shard lists, the file
        meta.tensors = plan.full_records()
        write_metadata(Path(tmp), meta)
        write_s = time.process_time() - t0
        size = (Path(tmp) / "metadata.json").stat().st_size
        parse = []
        for _ in range(repeats):
            t0 = time.process_time()
            loaded = read_metadata(tmp)
            parse.append(time.process_time() - t0)
    rank = world - 1  # a last-stage rank: the most keys (output layer too)
    plans = []
    for _ in range(repeats):
        t0 = time.process_time()
        for d in per_rank[rank]:
            shards = loaded.tensors[d.key].shards
            read = ShardIndex([s.offset for s in shards], [s.shape for s in shards]).plan(d.offset, d.shape)
            assert not read.uncovered
        plans.append(time.process_time() - t0)
    return {"world": world, "descs": len(per_rank) and sum(map(len, per_rank)), "keys": len(plan.records),
            "build_s": build_s, "decode_s": min(decode), "validate_s": min(valid),
            "validate_med": statistics.median(valid), "per_rank_bytes": statistics.mean(map(len, sent)),
            "received_bytes": sum(map(len, sent)), "cached_bytes": cached, "metadata_bytes": size,
            "write_s": write_s, "parse_s": min(parse), "load_plan_ms": 1e3 * min(plans),
            "rank_descs": len(per_rank[rank])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [measure(8, 8, 16, args.repeats), measure(8, 8, 64, args.repeats)]
    print("All times are CPU seconds of this process (time.process_time), min over repeats: robust to other "
          "processes sharing the machine, though cache contention still inflates them.\n")
    print("| ranks (TP x PP x DP) | shard descriptions / keys | validation + layout, s | decoding the gather, s "
          "| gathered per rank (first save) | received by each rank | repeated save (cached plan), per rank "
          "| metadata.json | write (rank 0), s | parse, s | one rank's load plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r, (tp, pp, dp) in zip(rows, [(8, 8, 16), (8, 8, 64)], strict=True):
        print(f"| {r['world']} ({tp} x {pp} x {dp}) | {r['descs']:,} / {r['keys']:,} | {r['validate_s']:.2f} "
              f"(median {r['validate_med']:.2f}) | {r['decode_s']:.2f} | {r['per_rank_bytes'] / 1024:.0f} KiB | "
              f"{r['received_bytes'] / 2**20:.0f} MiB | {r['cached_bytes']} B | {r['metadata_bytes'] / 2**20:.1f} MiB "
              f"| {r['write_s']:.2f} | {r['parse_s']:.2f} | {r['load_plan_ms']:.1f} ms ({r['rank_descs']} tensors) |")
    a, b = rows
    growth = (b["validate_s"] / a["validate_s"]) / (b["descs"] / a["descs"])
    print(f"\nvalidation time per description, 4096 vs 1024 ranks: {growth:.2f}x (1.0 = linear in ranks x keys)")


if __name__ == "__main__":
    main()
