"""Document sources (parquet dir, HF streaming) and the built-in demo corpus."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import raw_string_array, write_parquet_files

from nanochat_unsloth.common import UserError
from nanochat_unsloth.prep.demo_data import MARKER, NUM_FILES, write_demo_corpus
from nanochat_unsloth.prep.sources import HFStreamingSource, ParquetDirSource, open_source


def test_parquet_dir_splits_order_and_skipping(tiny_corpus_dir, tiny_corpus_docs):
    source = open_source(str(tiny_corpus_dir))
    assert isinstance(source, ParquetDirSource)
    for split in ("train", "val"):
        docs = tiny_corpus_docs[split]
        assert list(source.iter_documents(split)) == docs
        assert source.num_documents(split) == len(docs)
        # starting anywhere (inside a row group, on a group or file boundary) == slicing
        for start in [0, 1, 15, 16, 17, len(docs) // 2, len(docs) - 1, len(docs), len(docs) + 5]:
            assert list(source.iter_documents(split, start_doc=start)) == docs[start:]
    d = source.describe()
    assert d["kind"] == "parquet" and d["val_files"] == ["shard_00002.parquet"]
    assert d["rows"] == {"train": len(tiny_corpus_docs["train"]), "val": len(tiny_corpus_docs["val"])}


def test_parquet_dir_val_files(tiny_corpus_dir, tiny_corpus_docs):
    source = ParquetDirSource(tiny_corpus_dir, val_files=2)
    train = tiny_corpus_docs["train"]
    assert list(source.iter_documents("train")) == train[: len(train) // 2]
    assert list(source.iter_documents("val")) == train[len(train) // 2:] + tiny_corpus_docs["val"]
    with pytest.raises(UserError, match="--val-files 3"):
        ParquetDirSource(tiny_corpus_dir, val_files=3)


def test_parquet_dir_bad_input(tmp_path):
    with pytest.raises(UserError, match=r"missing.*directory not found.*demo-data"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=r"empty: no \*\.parquet files"):
        open_source(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    write_parquet_files(bad, [["a", "b"], ["c"]])
    pq.write_table(pa.table({"content": ["x"]}), bad / "shard_00002.parquet")
    with pytest.raises(UserError, match=r"shard_00002\.parquet: has no 'text' column \(columns: content\)"):
        open_source(str(bad))
    (bad / "shard_00002.parquet").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"shard_00002\.parquet: not a readable parquet file"):
        open_source(str(bad))
    single = tmp_path / "single"
    write_parquet_files(single, [["a"]])
    with pytest.raises(UserError, match="at least 2 files"):
        open_source(str(single))


def test_parquet_dir_yields_bad_rows_as_stored(tmp_path):
    # a row that is not valid UTF-8 comes as its bytes, in its place, not as an error for its whole batch
    bad = raw_string_array(["x", b"caf\xe9 latin-1", None, "y"])
    write_parquet_files(tmp_path, [["a", None, "b"], bad, ["v"]], rows_per_group=2)
    source = open_source(str(tmp_path), val_files=1)
    assert list(source.iter_documents("train")) == ["a", None, "b", "x", b"caf\xe9 latin-1", None, "y"]
    assert list(source.iter_documents("train", start_doc=4)) == [b"caf\xe9 latin-1", None, "y"]
    # the same through the hf: path (datasets' arrow batches)
    hf = open_source("hf:parquet", hf_data_files=str(tmp_path / "*.parquet"), val_docs=2)
    assert list(hf.iter_documents("val")) == ["a", None]
    assert list(hf.iter_documents("train")) == ["b", "x", b"caf\xe9 latin-1", None, "y", "v"]


@pytest.mark.parametrize("column", [pa.array([b"binary", b"text"]), pa.array([1, 2])], ids=["binary", "int64"])
def test_a_text_column_that_is_not_strings_is_refused_up_front(tmp_path, column):
    write_parquet_files(tmp_path, [["a"], ["v"]])
    pq.write_table(pa.table({"text": column}), tmp_path / "shard_00000.parquet")
    with pytest.raises(UserError, match=rf"shard_00000\.parquet: its 'text' column holds {column.type}, not strings"):
        open_source(str(tmp_path))
    with pytest.raises(UserError, match=rf"hf:parquet: its 'text' column holds {column.type}, not strings"):
        open_source("hf:parquet", hf_data_files=str(tmp_path / "shard_00000.parquet"))


def test_hf_streaming_path_offline(tiny_corpus_dir, tiny_corpus_docs):
    """The hf: code path (datasets.load_dataset(..., streaming=True)) on local parquet files."""
    all_docs = tiny_corpus_docs["train"] + tiny_corpus_docs["val"]
    source = open_source("hf:parquet", hf_data_files=str(tiny_corpus_dir / "*.parquet"), val_docs=40)
    assert isinstance(source, HFStreamingSource)
    assert list(source.iter_documents("val")) == all_docs[:40]
    assert list(source.iter_documents("train")) == all_docs[40:]
    assert list(source.iter_documents("val", start_doc=33)) == all_docs[33:40]
    assert list(source.iter_documents("train", start_doc=100)) == all_docs[140:]
    d = source.describe()
    assert d["kind"] == "hf" and d["name"] == "parquet" and d["val_docs"] == 40


def test_hf_bad_input(tmp_path):
    write_parquet_files(tmp_path, [[1, 2]])
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "shard_00000.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        open_source("hf:parquet", hf_data_files=str(tmp_path / "*.parquet"))
    with pytest.raises(UserError, match="could not open"):
        open_source("hf:parquet", hf_data_files=str(tmp_path / "nothing-here-*.parquet"))
    with pytest.raises(UserError, match="give a dataset name"):
        open_source("hf:")


def test_demo_corpus(tmp_path):
    paths = write_demo_corpus(tmp_path / "a")
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in range(NUM_FILES)]
    chars = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"] and pf.num_row_groups >= 3
        texts = pf.read().column("text").to_pylist()
        assert all(isinstance(t, str) and t for t in texts)
        chars += sum(len(t) for t in texts)
    assert 1_500_000 < chars < 5_000_000
    # deterministic, and it reads through the ordinary parquet source
    again = write_demo_corpus(tmp_path / "b")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    source = open_source(str(tmp_path / "a"))
    assert source.num_documents("val") > 100
    # a re-run may replace its own files; other parquet files are left alone unless --force
    write_demo_corpus(tmp_path / "a")
    (tmp_path / "b" / MARKER).unlink()
    with pytest.raises(UserError, match="not a demo corpus"):
        write_demo_corpus(tmp_path / "b")
    write_demo_corpus(tmp_path / "b", force=True)
