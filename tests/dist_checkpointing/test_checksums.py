"""Every file is checksummed and nothing in a checkpoint is ever unpickled on load."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron_core.dist_checkpointing.__main__ import main as cli
from megatron_core.dist_checkpointing.checksums import crc32c, seal_json
from megatron_core.dist_checkpointing.metadata import read_metadata
from tests.dist_checkpointing.helpers import flip_byte


def _state(empty: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 48, generator=g)
    return {
        "w": [ShardedTensor.from_rank_offsets("w", torch.zeros(32, 48) if empty else c, (0, r, 2))
              for r, c in enumerate(w.chunk(2))],
        "b": ShardedTensor.from_rank_offsets("b", torch.zeros(5) if empty else torch.arange(5.0)),
        "rng": ShardedObject("rng", None if empty else {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}),
    }


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    dc.save(_state(), path, common_state_dict={"iteration": 7, "run": {"lr": 0.1, "name": "x"}})
    return path


def _restore(path: Path, **kw) -> tuple[dict, dict]:
    """Everything a resume reads: the common state, then every tensor and object."""
    common = dc.load_common_state_dict(path, **kw)
    req = _state(empty=True)
    req["w"] = ShardedTensor.from_rank_offsets("w", torch.zeros(64, 48))
    return common, dc.load(req, path, **kw)


def _reseal(path: Path, raw: dict) -> None:
    """Rewrite metadata.json as a writer (or an attacker with the code) would: checksum recomputed."""
    (path / "metadata.json").write_text(seal_json(json.dumps(raw, indent=1)))


def test_every_torch_file_has_a_crc32c_and_metadata_is_sealed(ckpt):
    meta = read_metadata(ckpt)
    assert meta.common.crc32c == crc32c((ckpt / "common.pt").read_bytes())
    shard = meta.objects["rng"].shards[0]
    assert shard.crc32c == crc32c((ckpt / shard.path).read_bytes())
    for rec in meta.tensors.values():
        assert rec.zarr_json_crc32c == crc32c((ckpt / rec.path / "zarr.json").read_bytes())
    assert (ckpt / "metadata.json").read_text().startswith('{\n "crc32c": "')
    common, out = _restore(ckpt)
    assert common == {"iteration": 7, "run": {"lr": 0.1, "name": "x"}}
    assert torch.equal(out["b"], torch.arange(5.0))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_a_flipped_byte_anywhere_is_caught_naming_the_file(ckpt, tmp_path):
    """Every file, several random offsets each: load (or, for zarr.json which load never reads,
    verify) raises CorruptedCheckpointError naming the file or its key."""
    pristine = {p: p.read_bytes() for p in _files(ckpt)}
    rnd = random.Random(0)
    checked = 0
    for file, data in pristine.items():
        rel = file.relative_to(ckpt)
        for offset in sorted({0, len(data) - 1, *(rnd.randrange(len(data)) for _ in range(3))}):
            flip_byte(file, offset)
            named = str(rel) if file.name in ("metadata.json", "common.pt", "zarr.json") else rel.parts[0]
            if file.name == "zarr.json":
                assert cli(["verify", str(ckpt)]) == 1, rel
            else:
                with pytest.raises(dc.CorruptedCheckpointError) as err:
                    _restore(ckpt)
                assert named.split("/")[-1] in str(err.value) or rel.parts[0] in str(err.value), (rel, err.value)
            file.write_bytes(data)
            checked += 1
    assert checked >= 5 * 6
    _restore(ckpt)  # all restored: loads again


def test_verify_reports_a_damaged_object_file(ckpt, capsys):
    flip_byte(ckpt / "objects" / "rng" / "shard_0.pt", 100)
    assert cli(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  object rng (0,)" in out and "shard_0.pt" in out and "failed its checksum" in out


def test_save_refuses_objects_that_would_need_unpickling(tmp_path):
    state = {"rng": ShardedObject("rng", {"numpy": np.random.RandomState(1).get_state()})}
    with pytest.raises(dc.UnsafeCheckpointError, match=r"ShardedObject 'rng'.*numpy.*torch.from_numpy"):
        dc.save(state, tmp_path / "ckpt")
    with pytest.raises(dc.UnsafeCheckpointError, match=r"common_state_dict.*Unsupported global"):
        dc.save({}, tmp_path / "ckpt", common_state_dict={"when": np.float64(1.0)})
    assert not list(tmp_path.iterdir())  # nothing written, no temporary directory left


def _make_legacy(path: Path, payload: object, target: str) -> None:
    """Turn ``path`` into what an older version wrote: ``target`` file pickled (weights_only False
    in metadata), no checksums anywhere."""
    meta = read_metadata(path).model_dump(mode="json")
    torch.save(payload, path / target)
    meta["common"].pop("crc32c")
    for rec in meta["objects"].values():
        for s in rec["shards"]:
            s.pop("crc32c")
            s["weights_only"] = s["path"] != target
    for rec in meta["tensors"].values():
        rec.pop("zarr_json_crc32c")
    meta["common"]["weights_only"] = target != "common.pt"
    (path / "metadata.json").write_text(json.dumps(meta, indent=1))


def test_older_pickled_files_load_only_with_allow_pickle(ckpt, capsys):
    legacy = {"numpy": np.random.RandomState(1).get_state(), "torch": torch.get_rng_state()}
    _make_legacy(ckpt, legacy, "objects/rng/shard_0.pt")
    with pytest.raises(dc.UnsafeCheckpointError, match=r"rng: .*shard_0.pt.* allow_pickle=True"):
        _restore(ckpt)
    _, out = _restore(ckpt, allow_pickle=True)
    np.testing.assert_array_equal(out["rng"]["numpy"][1], legacy["numpy"][1])
    assert cli(["verify", str(ckpt)]) == 1
    text = capsys.readouterr().out
    assert "UNSAFE object rng (0,)" in text and "no checksum of its own" in text
    assert "ok    common state (no checksum: written by an older version)" in text


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this calls os.mkdir(marker): code from the file runs
        return (os.mkdir, (self.marker,))


def test_crafted_common_pt_with_recomputed_checksums_runs_no_code(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"common": _Evil(str(marker)), "nonsharded": {}}, evil)
    torch.load(evil, weights_only=False)  # the payload is live: unpickling runs it
    assert marker.is_dir()
    marker.rmdir()
    # the attacker replaces common.pt, flags it as needing unpickling and recomputes every checksum
    (ckpt / "common.pt").write_bytes(evil.read_bytes())
    meta = read_metadata(ckpt).model_dump(mode="json")
    meta["common"].update(weights_only=False, crc32c=crc32c(evil.read_bytes()))
    _reseal(ckpt, meta)
    for attempt in (lambda: dc.load_common_state_dict(ckpt), lambda: _restore(ckpt),
                    lambda: dc.load({"x": {"nonsharded": 1}, **_state(empty=True)}, ckpt, strict="ignore")):
        with pytest.raises(dc.UnsafeCheckpointError, match=r"common state: .*common.pt.*unpickling"):
            attempt()
    assert cli(["verify", str(ckpt)]) == 1
    # and through the command line in a fresh interpreter
    proc = subprocess.run([sys.executable, "-m", "megatron_core.dist_checkpointing", "verify", str(ckpt)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 1 and "UNSAFE common state" in proc.stdout
    assert not marker.exists(), "code from the checkpoint ran"
