"""Shared fixtures: a tiny parquet corpus, a tiny trained tokenizer and a tiny prepped shard directory.

All three are session-scoped and live in one base dir laid out like nanochat's:
    <tiny_base_dir>/base_data/shard_0000{0,1,2}.parquet   (last file = val)
    <tiny_base_dir>/tokenizer/{tokenizer.pkl, token_bytes.pt}   vocab 512
    <tiny_base_dir>/shards/{manifest.json, train_*.bin, val_*.bin}   5,000 tokens per shard
Treat them as read-only; copy them (shutil.copytree) before changing anything.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

TINY_VOCAB = 512
TINY_SHARD_TOKENS = 5_000
TINY_ROWS_PER_GROUP = 16

# A few documents that exercise multi-byte text, digits and whitespace runs, plus an empty one.
_EXTRA_DOCS = [
    "Grüße aus Köln! Ein Beispiel mit Umlauten: äöü ÄÖÜ ß.",
    "日本語のテキスト、そして中文文本。混合 text with ASCII 123456.",
    "Emoji 🚀🌍✨ and symbols ∑∫√ ≤≥ in one line.\n\n\n   indented   spaces\t\ttabs",
    "",
    "Numbers: 0 1 22 333 4444 55555 3.14159 2,718,281 -42 1e10",
]


def tiny_documents() -> list[str]:
    """~300 documents (~130k characters): paragraphs of the pydoc help pages, and the extras above."""
    from pydoc_data.topics import topics

    docs, current = [], ""
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= 300:  # a document: consecutive paragraphs, at least 300 characters
                docs.append(current)
                current = ""
        if len(docs) >= 300:
            break
    docs = docs[:300]
    for i, extra in enumerate(_EXTRA_DOCS):  # spread them over train and val
        docs.insert(7 + i * 61, extra)
    return docs


def write_parquet_files(out_dir: Path, files: list[list], rows_per_group: int = TINY_ROWS_PER_GROUP) -> list[Path]:
    """files[i] -> out_dir/shard_0000i.parquet with a `text` column (values as given, None allowed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate(files):
        path = out_dir / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": rows}), path, row_group_size=rows_per_group)
        paths.append(path)
    return paths


def raw_string_array(values: list):
    """A pyarrow string array holding each value's bytes as they are, valid UTF-8 or not (None = null): a web
    dump's broken record. Neither this constructor nor parquet's writer or reader checks the UTF-8."""
    import numpy as np
    import pyarrow as pa

    raw = [v.encode() if isinstance(v, str) else v for v in values]
    offsets = np.cumsum([0] + [len(r or b"") for r in raw]).astype(np.int32)
    validity = pa.array([r is not None for r in raw], type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(raw), [validity, pa.py_buffer(offsets.tobytes()),
                                                         pa.py_buffer(b"".join(r or b"" for r in raw))])


class Killed(BaseException):
    """Raised where a kill could land: a BaseException, so no `except Exception` of the code under test
    takes it for an error it handles."""


def watch_file_ops(monkeypatch, before_each) -> None:
    """Call `before_each()` before every os.replace and os.unlink of this process (Path.unlink included):
    the points between which a kill can change what a reader of the directory sees."""
    import os

    real_replace, real_unlink = os.replace, os.unlink

    def replace(*args, **kwargs):
        before_each()
        return real_replace(*args, **kwargs)

    def unlink(*args, **kwargs):
        before_each()
        return real_unlink(*args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)


@contextlib.contextmanager
def killed_at(monkeypatch, k: int):
    """The block is killed (Killed raised) just before its k-th os.replace / os.unlink (counting from 0; the
    clean-up after it runs on); the test fails if it makes fewer."""
    count = [0]

    def kill_at_k():
        count[0] += 1
        if count[0] - 1 == k:
            raise Killed
    with monkeypatch.context() as m, pytest.raises(Killed):
        watch_file_ops(m, kill_at_k)
        yield


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_base")


@pytest.fixture(scope="session")
def tiny_corpus_docs() -> dict[str, list[str]]:
    """The tiny corpus's documents per split, in source order."""
    docs = tiny_documents()
    n_val = len(docs) // 6
    return {"train": docs[:-n_val], "val": docs[-n_val:]}


@pytest.fixture(scope="session")
def tiny_corpus_dir(tiny_base_dir, tiny_corpus_docs) -> Path:
    """<base>/base_data: 2 train parquet files + 1 val file, several row groups each."""
    train = tiny_corpus_docs["train"]
    half = len(train) // 2
    out = tiny_base_dir / "base_data"
    write_parquet_files(out, [train[:half], train[half:], tiny_corpus_docs["val"]])
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_base_dir, tiny_corpus_docs, tiny_corpus_dir) -> Path:
    """<base>/tokenizer: vocab 512 trained on the tiny corpus's train split."""
    from nanochat_unsloth.tokenizer import save_tokenizer, train_tokenizer

    enc = train_tokenizer(iter(tiny_corpus_docs["train"]), TINY_VOCAB)
    out = tiny_base_dir / "tokenizer"
    save_tokenizer(enc, out)
    return out


@pytest.fixture(scope="session")
def tiny_shards_dir(tiny_base_dir, tiny_corpus_dir, tiny_tokenizer_dir) -> Path:
    """<base>/shards: the tiny corpus prepped with the tiny tokenizer, 5,000 tokens per shard."""
    from nanochat_unsloth.prep.job import PrepConfig, run_prep

    out = tiny_base_dir / "shards"
    result = run_prep(PrepConfig(source=str(tiny_corpus_dir), out_dir=out, tokenizer_dir=tiny_tokenizer_dir,
                                 workers=0, shard_tokens=TINY_SHARD_TOKENS, progress=False))
    assert result.complete
    return out


@pytest.fixture
def fresh_notices(monkeypatch):
    """Each test sees fallback notices as a fresh process would: none shown yet, no lean choice cached,
    rank 0."""
    from nanochat_unsloth import common
    from nanochat_unsloth.model import memory

    monkeypatch.setattr(common, "_NOTICES_SHOWN", set())
    monkeypatch.setattr(memory, "_LEAN_IMPLS", {})
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model gets built: the refusal must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was built before the refusal")
    from nanochat_unsloth.train import loop

    monkeypatch.setattr(loop, "build_model", refuse)
