"""Megatron-Core 0.19.2's indexed-dataset files read token for token, and ours written byte for byte."""

import json

import numpy as np
import pytest

from megatron_core.data import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from tests.paths import MMIDX_FIXTURES

EXPECTED = json.loads((MMIDX_FIXTURES / "small_docs.json").read_text())


@pytest.mark.parametrize("name", ["int32", "uint16"])
def test_reads_megatron_files_token_for_token(name):
    info = EXPECTED["files"][name]
    ds = IndexedDataset(MMIDX_FIXTURES / info["prefix"])
    assert ds.dtype == np.dtype(info["dtype"])
    assert len(ds) == EXPECTED["num_sequences"] and ds.num_documents == EXPECTED["num_documents"]
    assert ds.num_tokens == EXPECTED["num_tokens"]
    assert ds.sequence_lengths.tolist() == EXPECTED["sequence_lengths"]
    assert ds.sequence_pointers.tolist() == info["sequence_pointers"]
    assert ds.document_indices.tolist() == EXPECTED["document_indices"]
    for d, tokens in enumerate(EXPECTED["documents"]):
        assert ds.document(d).tolist() == tokens
        first, end = EXPECTED["document_indices"][d:d + 2]
        assert np.concatenate(ds[first:end]).tolist() == tokens


@pytest.mark.parametrize("name", ["int32", "uint16"])
def test_our_builder_writes_the_same_bytes(tmp_path, name):
    info = EXPECTED["files"][name]
    lengths, doc_idx = EXPECTED["sequence_lengths"], EXPECTED["document_indices"]
    with IndexedDatasetBuilder(tmp_path / "out", dtype=np.dtype(info["dtype"]).type) as builder:
        for d, (tokens, how) in enumerate(zip(EXPECTED["documents"], EXPECTED["write_path"], strict=True)):
            seq_lengths = lengths[doc_idx[d]:doc_idx[d + 1]]
            if how == "add_document":
                builder.add_document(tokens, seq_lengths)
            else:  # one add_item per sequence, then end_document
                start = 0
                for n in seq_lengths:
                    builder.add_item(tokens[start:start + n])
                    start += n
                builder.end_document()
    for suffix in (".idx", ".bin"):
        ours = (tmp_path / "out").with_suffix(suffix).read_bytes()
        theirs = (MMIDX_FIXTURES / info["prefix"]).with_suffix(suffix).read_bytes()
        assert ours == theirs, suffix
    assert ours[:0] == b"" and (tmp_path / "out.idx").read_bytes()[:18].hex() == info["header_first_18_bytes_hex"]


def _copy(tmp_path, name="small_uint16"):
    for suffix in (".idx", ".bin"):
        (tmp_path / name).with_suffix(suffix).write_bytes((MMIDX_FIXTURES / name).with_suffix(suffix).read_bytes())
    return tmp_path / name


def test_wrong_magic_version_and_truncation_name_the_file(tmp_path):
    prefix = _copy(tmp_path)
    idx = prefix.with_suffix(".idx")
    good = idx.read_bytes()
    idx.write_bytes(b"MCIDX\0\0\0" + good[8:])
    with pytest.raises(IndexedDatasetError, match=r"small_uint16.idx: not a Megatron indexed dataset index.*rebuild"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:9] + (2).to_bytes(8, "little") + good[17:])
    with pytest.raises(IndexedDatasetError, match=r"small_uint16.idx: index version 2, this reader knows version 1"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:17] + bytes([9]) + good[18:])
    with pytest.raises(IndexedDatasetError, match="unknown dtype code 9"):
        IndexedDataset(prefix)
    idx.write_bytes(good[:-8])
    with pytest.raises(IndexedDatasetError, match=r"small_uint16.idx: 662 bytes, expected 670"):
        IndexedDataset(prefix)
    idx.write_bytes(good)
    prefix.with_suffix(".bin").write_bytes(prefix.with_suffix(".bin").read_bytes()[:-2])
    with pytest.raises(IndexedDatasetError, match=r"small_uint16.bin: 824 bytes, index expects 826"):
        IndexedDataset(prefix)


def test_multimodal_tail_is_ignored_or_read(tmp_path):
    prefix = _copy(tmp_path)
    modes = np.arange(EXPECTED["num_sequences"], dtype=np.int8) % 3
    with open(prefix.with_suffix(".idx"), "ab") as f:
        f.write(modes.tobytes())
    assert IndexedDataset(prefix).document(1).tolist() == EXPECTED["documents"][1]
    np.testing.assert_array_equal(IndexedDataset(prefix, multimodal=True).sequence_modes, modes)
