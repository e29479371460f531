import numpy as np
import pytest
import torch

from megatron_core.data import (
    ByteTokenizer,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    MicroBatchIterator,
    PackedSequenceDataset,
    build_from_text,
    split_train_valid,
)


def _docs(seed=0, n=37):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, size=int(rng.integers(0, 50))) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = _docs()
    with IndexedDatasetBuilder(tmp_path / "c", dtype=dtype) as builder:
        for d in docs:
            builder.add_document(d)
    ds = IndexedDataset(tmp_path / "c")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    long = next(i for i, d in enumerate(docs) if len(d) > 10)
    np.testing.assert_array_equal(ds.get(long, 3, 5), docs[long][3:8])
    with pytest.raises(IndexError, match="outside sequence"):
        ds.get(long, 3, 10_000)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(IndexedDatasetError, match="missing.idx not found"):
        IndexedDataset(tmp_path / "missing")
    with IndexedDatasetBuilder(tmp_path / "c") as builder:
        builder.add_document([1, 2, 3])
    with open(tmp_path / "c.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(IndexedDatasetError, match="c.bin: 8 bytes, index expects 6"):
        IndexedDataset(tmp_path / "c")
    with pytest.raises(IndexedDatasetError, match="do not fit dtype uint16"):
        IndexedDatasetBuilder(tmp_path / "d").add_document([70000])


def test_packing_covers_the_stream_without_gaps(tmp_path):
    docs = _docs(1)
    with IndexedDatasetBuilder(tmp_path / "c", dtype=np.uint16) as builder:
        for d in docs:
            builder.add_document(d)
    stream = np.concatenate(docs)
    packed = PackedSequenceDataset(IndexedDataset(tmp_path / "c"), seq_length=16)
    assert len(packed) == (len(stream) - 1) // 16
    for i in range(len(packed)):
        sample = packed[i]
        np.testing.assert_array_equal(sample["tokens"].numpy(), stream[i * 16:(i + 1) * 16])
        np.testing.assert_array_equal(sample["labels"].numpy(), stream[i * 16 + 1:(i + 1) * 16 + 1])
        assert sample["loss_mask"].sum() == 16
    train, valid = split_train_valid(packed, 0.25)
    assert len(train) + len(valid) == len(packed) and len(valid) == round(len(packed) * 0.25)
    assert torch.equal(valid[0]["tokens"], packed[len(train)]["tokens"])


def test_text_file_to_batches(tmp_path):
    text = "the quick brown fox\n\njumps over the lazy dog\n\n" * 20
    (tmp_path / "a.txt").write_text(text)
    build_from_text([tmp_path / "a.txt"], tmp_path / "data/a", split_paragraphs=True)
    ds = IndexedDataset(tmp_path / "data/a")
    tok = ByteTokenizer()
    assert len(ds) == 40
    assert tok.decode(ds[1], keep_special=True) == "jumps over the lazy dog<eos>"
    packed = PackedSequenceDataset(ds, 32)
    batches = MicroBatchIterator(packed, 4, seed=0)
    batch = next(batches)
    assert batch["tokens"].shape == batch["position_ids"].shape == (4, 32)
    with pytest.raises(ValueError, match="cannot fill one sample"):
        PackedSequenceDataset(ds, 10_000)
