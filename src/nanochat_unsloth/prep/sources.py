"""Where documents come from: a directory of parquet files in nanochat's layout, or a HF `datasets` stream.

A source has two splits, "train" and "val", each an ordered sequence of rows. `iter_documents` yields
the rows' `text` values as stored, so a row may be None or not a string (a string that is not valid
UTF-8 comes as its raw bytes): consumers skip and count those, and row numbers (what resuming counts
in) stay the same whether or not rows are bad.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Protocol

from nanochat_unsloth.common import UserError

SPLITS = ("train", "val")
TEXT_COLUMN = "text"
HF_PREFIX = "hf:"
DEFAULT_VAL_FILES = 1
DEFAULT_VAL_DOCS = 10_000


class Source(Protocol):
    def describe(self) -> dict:
        """JSON-able identity of the source: recorded in the manifest and compared on resume."""

    def iter_documents(self, split: str, start_doc: int = 0) -> Iterator[Any]:
        """The split's `text` values in order, starting at row `start_doc` (skipped cheaply)."""

    def num_documents(self, split: str) -> int | None:
        """Rows in the split when known without reading it (for progress bars), else None."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def text_values(column) -> list[Any]:
    """A pyarrow text column (Array or ChunkedArray) as Python values, a row that is not valid UTF-8 as its
    raw bytes (which consumers skip as non-text), instead of one UnicodeDecodeError for the whole batch.

    Arrow does not check UTF-8 when it reads a string column, so one bad record in a web dump would
    otherwise stop every run at the same row.
    """
    import pyarrow as pa

    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    values = []
    for raw in column.cast(binary).to_pylist():
        try:
            values.append(raw.decode("utf-8") if raw is not None else None)
        except UnicodeDecodeError:
            values.append(raw)
    return values


def is_text_type(arrow_type) -> bool:
    """string / large_string (/ string_view), or null (a column of only missing rows, skipped as such)."""
    import pyarrow as pa

    view = getattr(pa.types, "is_string_view", lambda t: False)
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or view(arrow_type)
            or pa.types.is_null(arrow_type))


# ---------------------------------------------------------------------------------------------------
# A directory of parquet files (nanochat's base_data layout)


def list_parquet_files(data_dir: Path) -> list[Path]:
    """nanochat's rule: every `*.parquet` in the directory, sorted by name (temp files are not *.parquet)."""
    return sorted(p for p in data_dir.iterdir() if p.name.endswith(".parquet") and p.is_file())


class ParquetDirSource:
    """`shard_00000.parquet`, `shard_00001.parquet`, ...: the last `val_files` files are the val split."""

    def __init__(self, data_dir: str | Path, val_files: int = DEFAULT_VAL_FILES, flag: str = "--source"):
        import pyarrow.parquet as pq

        self.data_dir = Path(data_dir).expanduser().resolve()
        if not self.data_dir.is_dir():
            raise UserError(
                f"{flag} {self.data_dir}: directory not found; download FineWeb-Edu parquet files there "
                "(nanochat's `python -m nanochat.dataset -n N`) or make the demo corpus with "
                f"`nanochat-unsloth demo-data --out {self.data_dir}`"
            )
        files = list_parquet_files(self.data_dir)
        if not files:
            raise UserError(
                f"{flag} {self.data_dir}: no *.parquet files in it; put nanochat-layout parquet files "
                "(shard_00000.parquet, ...) there, or run `nanochat-unsloth demo-data --out DIR`"
            )
        if val_files < 1 or val_files >= len(files):
            raise UserError(
                f"--val-files {val_files}: {self.data_dir} has {len(files)} parquet file(s); the last --val-files of "
                f"them are the val split, so it must be between 1 and {len(files) - 1} (and at least 2 files are needed)"
            )
        self.val_files = val_files
        self.files = {"train": files[:-val_files], "val": files[-val_files:]}
        # Row-group row counts from each file's footer: they let a resumed run skip to a row without
        # reading any text, and they catch a foreign file before any work is done.
        self.row_groups: dict[Path, list[int]] = {}
        for path in files:
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:
                raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); remove or replace it") from None
            if TEXT_COLUMN not in meta.schema_arrow.names:
                raise UserError(
                    f"{path}: has no {TEXT_COLUMN!r} column (columns: {', '.join(meta.schema_arrow.names)}); "
                    f"every parquet file in {self.data_dir} must hold documents in a {TEXT_COLUMN!r} column"
                )
            kind = meta.schema_arrow.field(TEXT_COLUMN).type
            if not is_text_type(kind):
                raise UserError(
                    f"{path}: its {TEXT_COLUMN!r} column holds {kind}, not strings, so it has no text to train on; "
                    f"store the documents as a string column (e.g. decode binary values to UTF-8 first)"
                )
            self.row_groups[path] = [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]

    def num_documents(self, split: str) -> int:
        _check_split(split)
        return sum(sum(self.row_groups[p]) for p in self.files[split])

    def describe(self) -> dict:
        files = [(p.name, p.stat().st_size, sum(self.row_groups[p])) for p in self.files["train"] + self.files["val"]]
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        return {
            "kind": "parquet",
            "description": f"parquet dir {self.data_dir} ({len(self.files['train'])} train + "
            f"{len(self.files['val'])} val files)",
            "path": str(self.data_dir),
            "train_files": [p.name for p in self.files["train"]],
            "val_files": [p.name for p in self.files["val"]],
            "rows": {split: self.num_documents(split) for split in SPLITS},
            "files_sha256": digest,  # over (name, bytes, rows) of every file: a changed file changes it
        }

    def iter_documents(self, split: str, start_doc: int = 0) -> Iterator[Any]:
        import pyarrow.parquet as pq

        _check_split(split)
        to_skip = start_doc
        for path in self.files[split]:
            counts = self.row_groups[path]
            if to_skip >= sum(counts):  # the whole file lies before the start: do not even open it
                to_skip -= sum(counts)
                continue
            pf = pq.ParquetFile(path)
            for rg, nrows in enumerate(counts):
                if to_skip >= nrows:
                    to_skip -= nrows
                    continue
                texts = text_values(pf.read_row_group(rg, columns=[TEXT_COLUMN]).column(TEXT_COLUMN))
                yield from texts[to_skip:] if to_skip else texts
                to_skip = 0


    def text_lengths(self, split: str) -> Iterator[Any]:
        """Each row's text length in characters (0 for a null or non-string row), one numpy array per row
        group, without making Python strings: what a progress bar needs for its total."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        _check_split(split)
        for path in self.files[split]:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                column = pf.read_row_group(rg, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
                if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                    yield pc.utf8_length(column).fill_null(0).to_numpy()
                else:
                    yield np.zeros(len(column), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# A Hugging Face `datasets` stream


class HFStreamingSource:
    """`load_dataset(name, name=config, split="train", streaming=True)`; its first `val_docs` rows are val.

    `data_files` is passed through, so `hf:parquet` with `data_files="dir/*.parquet"` streams local
    files through the very same code (that is how the tests exercise this path offline).
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        data_files: str | list[str] | None = None,
        val_docs: int = DEFAULT_VAL_DOCS,
    ):
        if val_docs < 0:
            raise UserError(f"--val-docs {val_docs}: must be 0 or more")
        self.name, self.config, self.data_files, self.val_docs = name, config, data_files, val_docs
        ds = self._open()
        columns = ds.column_names
        if columns is None:  # features unknown until read: look at the first row
            first = next(iter(ds), None)
            columns = list(first) if first is not None else []
        if TEXT_COLUMN not in columns:
            raise UserError(
                f"--source hf:{name}: the dataset has no {TEXT_COLUMN!r} column (columns: {', '.join(columns) or 'none'}); "
                "use a dataset of documents in a 'text' column"
            )
        feature = (ds.features or {}).get(TEXT_COLUMN)
        dtype = getattr(feature, "dtype", "string")  # a Value's dtype; features unknown until read: checked later
        if dtype not in ("string", "large_string", "string_view", "null"):
            raise UserError(
                f"--source hf:{name}: its {TEXT_COLUMN!r} column holds {dtype}, not strings, so it has no text to "
                "train on; use a dataset of documents in a string 'text' column"
            )

    def _open(self):
        import datasets

        kwargs = {"split": "train", "streaming": True}
        if self.config:
            kwargs["name"] = self.config
        if self.data_files:
            kwargs["data_files"] = self.data_files
        try:
            return datasets.load_dataset(self.name, **kwargs)
        except Exception as e:  # not found, no network, bad config: all the user's to fix
            raise UserError(
                f"--source hf:{self.name}: could not open it with datasets.load_dataset ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); check the name, --hf-config and the network"
            ) from None

    def num_documents(self, split: str) -> int | None:
        _check_split(split)
        return self.val_docs if split == "val" else None

    def data_version(self) -> str | None:
        """Which version of the data the stream reads now: the sha256 of each resolved data file with what `datasets` itself
        tells versions by (a Hub file's commit, a local file's mtime, a remote one's ETag); None when `datasets`
        resolves no data files. Not part of the fingerprint (a finished prep stays finished when the dataset
        moves on upstream), but a resume compares it: rows skipped by count in another version are other rows."""
        import datasets

        try:
            builder = datasets.load_dataset_builder(self.name, name=self.config, data_files=self.data_files)
        except Exception as e:  # what load_dataset (which just worked) would also have met: the network
            raise UserError(f"--source hf:{self.name}: could not resolve its data files ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); check the network") from None
        files = (builder.config.data_files or {}).get("train")
        if files is None:
            return None
        version = [[str(f), *map(str, meta)] for f, meta in zip(files, files.origin_metadata)]
        return hashlib.sha256(json.dumps(version).encode()).hexdigest()  # a Hub dataset has thousands of files

    def describe(self) -> dict:
        label = f"hf:{self.name}" + (f" ({self.config})" if self.config else "")
        return {
            "kind": "hf",
            "description": f"{label}, streamed; first {self.val_docs:,} documents are val",
            "name": self.name,
            "config": self.config,
            "data_files": self.data_files,
            "val_docs": self.val_docs,
        }

    def iter_documents(self, split: str, start_doc: int = 0) -> Iterator[Any]:
        _check_split(split)
        # as arrow tables: rows that are not valid UTF-8 come as bytes instead of failing the batch
        ds = self._open().select_columns([TEXT_COLUMN]).with_format("arrow")
        if split == "val":
            if start_doc >= self.val_docs:
                return
            ds = ds.skip(start_doc).take(self.val_docs - start_doc)
        else:
            ds = ds.skip(self.val_docs + start_doc)
        for batch in ds.iter(batch_size=1024):
            yield from text_values(batch.column(TEXT_COLUMN))


# ---------------------------------------------------------------------------------------------------
# From command-line flags


def add_source_args(parser: argparse.ArgumentParser, flag: str = "--source", default_help: str = "") -> None:
    parser.add_argument(
        flag,
        default=None,
        help="a directory of parquet files in nanochat's layout, or hf:NAME for a Hugging Face dataset" + default_help,
    )
    parser.add_argument("--val-files", type=int, default=DEFAULT_VAL_FILES, help="parquet dir: the last K files are val (default 1)")
    parser.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS, help="hf: the first N documents are val (default 10,000)")
    parser.add_argument("--hf-config", default=None, help="hf: dataset config, e.g. sample-10BT")
    parser.add_argument("--hf-data-files", default=None, help="hf: data_files pattern, e.g. 'dir/*.parquet' with hf:parquet")


def open_source(
    spec: str,
    *,
    val_files: int = DEFAULT_VAL_FILES,
    val_docs: int = DEFAULT_VAL_DOCS,
    hf_config: str | None = None,
    hf_data_files: str | list[str] | None = None,
    flag: str = "--source",
) -> Source:
    """`hf:NAME` -> HFStreamingSource, anything else -> ParquetDirSource."""
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX):]
        if not name:
            raise UserError(f"{flag} {spec}: give a dataset name after 'hf:', e.g. hf:HuggingFaceFW/fineweb-edu")
        return HFStreamingSource(name, config=hf_config, data_files=hf_data_files, val_docs=val_docs)
    return ParquetDirSource(spec, val_files=val_files, flag=flag)
