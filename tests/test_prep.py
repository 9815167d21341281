"""The prep job: token stream, shard layout, manifest, byte-identity (workers, interruptions), bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from conftest import TINY_SHARD_TOKENS, raw_string_array, write_parquet_files

from nanochat_unsloth import cli
from nanochat_unsloth.common import UserError, sha256_file
from nanochat_unsloth.prep.job import STATE_NAME, PrepConfig, run_prep
from nanochat_unsloth.tokenizer import SPLIT_PATTERN, bos_id, load_checked_tokenizer, load_tokenizer
from nanochat_unsloth.shards.format import open_shard_tokens, read_shard_header
from nanochat_unsloth.shards.manifest import ShardManifest


def expected_stream(enc, docs) -> np.ndarray:
    """[bos] + encode_ordinary(doc), documents back to back in source order; non-strings skipped."""
    out = []
    for doc in docs:
        if isinstance(doc, str):
            out.append(bos_id(enc))
            out.extend(enc.encode_ordinary(doc))
    return np.array(out, dtype=np.uint16)


def split_tokens(shards_dir: Path, split: str) -> np.ndarray:
    m = ShardManifest.load(shards_dir)
    parts = [np.asarray(open_shard_tokens(shards_dir / s.file)) for s in m.shards_for(split)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def dir_bytes(shards_dir: Path) -> dict[str, bytes]:
    """Every file prep leaves behind (shards + manifest.json), by name."""
    return {p.name: p.read_bytes() for p in sorted(shards_dir.iterdir())}


def prep(tmp: Path, source, tokenizer_dir, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("shard_tokens", TINY_SHARD_TOKENS)
    return run_prep(PrepConfig(source=str(source), out_dir=tmp, tokenizer_dir=tokenizer_dir, progress=False, **kw))


# ---- the token stream and its files ------------------------------------------------------------


def test_shards_hold_bos_plus_encode_ordinary_in_source_order(tiny_shards_dir, tiny_tokenizer_dir, tiny_corpus_docs):
    enc = load_tokenizer(tiny_tokenizer_dir)
    bos = bos_id(enc)
    m = ShardManifest.load(tiny_shards_dir)
    m.verify(tiny_shards_dir, checksums=True)
    load_checked_tokenizer(tiny_tokenizer_dir, "the shards", m.tokenizer.sha256, m.tokenizer.vocab_size)
    assert m.tokenizer.sha256 == sha256_file(tiny_tokenizer_dir / "tokenizer.pkl")
    assert (m.tokenizer.vocab_size, m.tokenizer.bos_id) == (512, bos)
    assert m.shard_tokens == TINY_SHARD_TOKENS and m.source["kind"] == "parquet"
    for split in ("train", "val"):
        docs = tiny_corpus_docs[split]
        stream = split_tokens(tiny_shards_dir, split)
        assert np.array_equal(stream, expected_stream(enc, docs))
        entries = m.shards_for(split)
        assert [e.file for e in entries] == [f"{split}_{i:06d}.bin" for i in range(len(entries))]
        assert all(e.tokens == TINY_SHARD_TOKENS for e in entries[:-1]) and 0 < entries[-1].tokens <= TINY_SHARD_TOKENS
        for e in entries:  # documents = documents that START in the shard = its BOS tokens
            header = read_shard_header(tiny_shards_dir / e.file)
            assert (header.ntok, header.vocab_size, header.bos_id) == (e.tokens, 512, bos)
            assert e.documents == int(np.count_nonzero(np.asarray(open_shard_tokens(tiny_shards_dir / e.file)) == bos))
        assert sum(e.documents for e in entries) == len(docs)
        assert m.totals()[split] == {"tokens": len(stream), "documents": len(docs), "shards": len(entries)}
    assert len(m.shards_for("train")) >= 5  # documents span shards: the tests below cut through them
    assert set(p.name for p in tiny_shards_dir.iterdir()) == {"manifest.json"} | {s.file for s in m.shards}


def test_output_is_byte_identical_for_any_worker_count(tmp_path, tiny_shards_dir, tiny_corpus_dir, tiny_tokenizer_dir):
    reference = dir_bytes(tiny_shards_dir)  # workers=0
    r1 = prep(tmp_path / "w1", tiny_corpus_dir, tiny_tokenizer_dir, workers=1, batch_chars=50_000)
    r2 = prep(tmp_path / "w2", tiny_corpus_dir, tiny_tokenizer_dir, workers=2, batch_chars=3_000)
    assert r1.complete and r2.complete
    assert dir_bytes(tmp_path / "w1") == reference
    assert dir_bytes(tmp_path / "w2") == reference


def test_interrupted_then_resumed_is_byte_identical(tmp_path, tiny_shards_dir, tiny_corpus_dir, tiny_tokenizer_dir):
    reference = dir_bytes(tiny_shards_dir)
    out = tmp_path / "out"
    # one shard per run, every run with another batch size: cursors fall inside documents, on split
    # boundaries and on batch boundaries
    runs, cursors = 0, []
    while True:
        result = prep(out, tiny_corpus_dir, tiny_tokenizer_dir, stop_after_shards=1, batch_chars=997 * (runs % 5 + 1))
        runs += 1
        if result.complete:
            break
        assert not (out / "manifest.json").exists() and (out / STATE_NAME).exists()
        state = json.loads((out / STATE_NAME).read_text())
        assert len(state["shards"]) == runs
        cursors.append(state["cursor"])
        if runs == 2:
            # a crash after a shard was renamed but before the state recorded it, plus a stray temp file
            cursor_split = state["cursor"]["split"]
            n = len([s for s in state["shards"] if s["split"] == cursor_split])
            (out / f"{cursor_split}_{n:06d}.bin").write_bytes(b"half-written junk")
            (out / f".{cursor_split}_{n:06d}.bin.abc123.tmp").write_bytes(b"junk")
    assert any(c["offset"] > 0 for c in cursors)  # resumed inside a document
    assert {"split": "train", "doc": 0, "offset": 0} in cursors  # and at the val -> train boundary
    # the stop comes after the last shard too, so one final run only writes the manifest
    assert runs == len(ShardManifest.load(tiny_shards_dir).shards) + 1
    assert dir_bytes(out) == reference

    # with worker processes too: stop after 3 shards with 2 workers, finish with 1
    out2 = tmp_path / "out2"
    assert not prep(out2, tiny_corpus_dir, tiny_tokenizer_dir, workers=2, stop_after_shards=3, batch_chars=2_000).complete
    assert prep(out2, tiny_corpus_dir, tiny_tokenizer_dir, workers=1).complete
    assert dir_bytes(out2) == reference


def test_a_resume_refuses_shards_its_state_lists_but_that_are_gone(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir):
    """Shards deleted or cut short under a kept prep_state.json (an `rm *.bin` to start over): the resume
    trusts the state's list, so it must refuse rather than write a manifest naming files that are not there."""
    out = tmp_path / "out"
    assert not prep(out, tiny_corpus_dir, tiny_tokenizer_dir, stop_after_shards=2).complete
    whole = (out / "val_000001.bin").read_bytes()
    (out / "val_000001.bin").write_bytes(whole[:-2])  # one token short: the header no longer matches the size
    with pytest.raises(UserError, match=r"prep_state\.json lists val_000001\.bin as finished.*--force"):
        prep(out, tiny_corpus_dir, tiny_tokenizer_dir)
    (out / "val_000001.bin").unlink()
    with pytest.raises(UserError, match=r"prep_state\.json lists val_000001\.bin as finished.*--force"):
        prep(out, tiny_corpus_dir, tiny_tokenizer_dir)
    assert not (out / "manifest.json").exists()
    assert prep(out, tiny_corpus_dir, tiny_tokenizer_dir, force=True).complete


def test_an_unreadable_state_file_is_refused_naming_force_which_clears_it(tmp_path, tiny_corpus_dir,
                                                                         tiny_tokenizer_dir):
    """A prep_state.json that is not JSON (a file system that kept the name but lost the data in a crash)."""
    out = tmp_path / "out"
    assert not prep(out, tiny_corpus_dir, tiny_tokenizer_dir, stop_after_shards=1).complete
    (out / STATE_NAME).write_text('{"shards": [')
    with pytest.raises(UserError, match=r"unreadable prep_state\.json; pass --force"):
        prep(out, tiny_corpus_dir, tiny_tokenizer_dir)
    assert prep(out, tiny_corpus_dir, tiny_tokenizer_dir, force=True).complete


def test_rerun_of_a_finished_prep_is_a_no_op(tmp_path, tiny_shards_dir, tiny_corpus_dir, tiny_tokenizer_dir):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards_dir, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = prep(out, tiny_corpus_dir, tiny_tokenizer_dir)
    assert result.complete and result.already_done and result.shards_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # a shard lost since: caught by the cheap size/header check
    (out / "train_000001.bin").unlink()
    with pytest.raises(UserError, match=r"train_000001\.bin.*--force"):
        prep(out, tiny_corpus_dir, tiny_tokenizer_dir)
    assert prep(out, tiny_corpus_dir, tiny_tokenizer_dir, force=True).shards_written > 0
    assert dir_bytes(out) == dir_bytes(tiny_shards_dir)


def test_max_tokens_caps_train_only(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir, tiny_corpus_docs):
    enc = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path / "capped"
    r = prep(out, tiny_corpus_dir, tiny_tokenizer_dir, max_tokens=12_345)
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    assert np.array_equal(train, expected_stream(enc, tiny_corpus_docs["train"])[:12_345])
    assert np.array_equal(val, expected_stream(enc, tiny_corpus_docs["val"]))
    m = r.manifest
    assert [e.tokens for e in m.shards_for("train")] == [5_000, 5_000, 2_345]
    assert m.totals()["train"]["documents"] == int(np.count_nonzero(train == bos_id(enc)))
    assert m.source["max_tokens"] == 12_345
    # a separate cap for val; an exact multiple of the shard size leaves no empty shard
    out2 = tmp_path / "capped2"
    r2 = prep(out2, tiny_corpus_dir, tiny_tokenizer_dir, max_tokens=10_000, max_val_tokens=2_777, workers=2, batch_chars=3_000)
    assert [e.tokens for e in r2.manifest.shards_for("train")] == [5_000, 5_000]
    assert [e.tokens for e in r2.manifest.shards_for("val")] == [2_777]
    # capped and interrupted: same bytes
    out3 = tmp_path / "capped3"
    while not prep(out3, tiny_corpus_dir, tiny_tokenizer_dir, max_tokens=10_000, max_val_tokens=2_777, stop_after_shards=1).complete:
        pass
    assert dir_bytes(out3) == dir_bytes(out2)


def test_null_and_undecodable_rows_are_skipped_and_counted(tmp_path, tiny_tokenizer_dir):
    enc = load_tokenizer(tiny_tokenizer_dir)
    words = [f"document number {i} says " + "hello world " * (i % 7 + 1) for i in range(120)]
    train_a = [None if i % 9 == 4 else w for i, w in enumerate(words[:60])]
    # a file with rows that are not valid UTF-8 (a lone continuation byte, a truncated sequence, latin-1)
    train_b = ["good one", b"\x80 stray", "good two", b"cut \xe2\x82", b"caf\xe9"]
    val = [None] + words[60:] + [None]
    data = tmp_path / "data"
    write_parquet_files(data, [train_a, raw_string_array(train_b), val], rows_per_group=5)
    out = tmp_path / "shards"
    r = prep(out, data, tiny_tokenizer_dir, shard_tokens=1_000, workers=1)  # bytes rows cross to a worker
    n_null_train = sum(x is None for x in train_a)
    assert r.skipped_rows == {"train": n_null_train + 3, "val": 2}
    assert r.manifest.source["skipped_rows"] == {"train": n_null_train + 3, "val": 2}
    assert np.array_equal(split_tokens(out, "train"), expected_stream(enc, train_a + train_b))
    assert np.array_equal(split_tokens(out, "val"), expected_stream(enc, val))
    assert r.manifest.totals()["train"]["documents"] == 60 - n_null_train + 2
    # the count is part of the output, so it too must not depend on where runs were interrupted
    out2 = tmp_path / "shards2"
    while not prep(out2, data, tiny_tokenizer_dir, shard_tokens=1_000, stop_after_shards=1, batch_chars=300).complete:
        pass
    assert dir_bytes(out2) == dir_bytes(out)


def test_hf_source_prep_offline_and_resumable(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir, tiny_corpus_docs):
    enc = load_tokenizer(tiny_tokenizer_dir)
    all_docs = tiny_corpus_docs["train"] + tiny_corpus_docs["val"]
    kw = dict(hf_data_files=str(tiny_corpus_dir / "*.parquet"), val_docs=30)
    out = tmp_path / "hf"
    r = prep(out, "hf:parquet", tiny_tokenizer_dir, **kw)
    assert r.manifest.source["kind"] == "hf"
    assert np.array_equal(split_tokens(out, "val"), expected_stream(enc, all_docs[:30]))
    assert np.array_equal(split_tokens(out, "train"), expected_stream(enc, all_docs[30:]))
    out2 = tmp_path / "hf2"
    assert not prep(out2, "hf:parquet", tiny_tokenizer_dir, stop_after_shards=3, **kw).complete
    assert prep(out2, "hf:parquet", tiny_tokenizer_dir, **kw).complete
    assert dir_bytes(out2) == dir_bytes(out)


def test_a_streamed_source_changed_since_the_prep_began_is_not_resumed(tmp_path, tiny_corpus_docs, tiny_tokenizer_dir):
    """A resume skips the rows the interrupted run counted: if the dataset changed in between (a new revision
    upstream; here the local files the stream reads), those are other rows, and the resume would join two
    versions' documents (one cut mid-document) into shards nothing flags. Refused, naming --force."""
    docs = tiny_corpus_docs["train"]
    data = tmp_path / "data"
    write_parquet_files(data, [docs[:120], docs[120:]])
    kw = dict(hf_data_files=str(data / "*.parquet"), val_docs=30)
    out = tmp_path / "out"
    assert not prep(out, "hf:parquet", tiny_tokenizer_dir, stop_after_shards=3, **kw).complete
    write_parquet_files(data, [docs[:120][::-1], docs[120:]])  # the same files, rewritten with other rows
    with pytest.raises(UserError, match=r"another version of the data.*--force"):
        prep(out, "hf:parquet", tiny_tokenizer_dir, **kw)
    assert not (out / "manifest.json").exists()
    assert prep(out, "hf:parquet", tiny_tokenizer_dir, force=True, **kw).complete


# ---- bad input ---------------------------------------------------------------------------------


def test_a_source_without_train_text_is_refused(tmp_path, tiny_tokenizer_dir, tiny_corpus_docs):
    data = tmp_path / "data"
    write_parquet_files(data, [raw_string_array([b"\xff", None, b"caf\xe9"] * 4), tiny_corpus_docs["val"]])
    with pytest.raises(UserError, match=r"its train split holds no text \(12 row\(s\) skipped, all null, "
                                        r"non-text or not valid UTF-8\)"):
        prep(tmp_path / "out", data, tiny_tokenizer_dir)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_tokenizer(tmp_path, tiny_corpus_dir):
    with pytest.raises(UserError, match=r"tokenizer\.pkl: tokenizer not found; run `nanochat-unsloth tokenizer`"):
        prep(tmp_path / "out", tiny_corpus_dir, tmp_path / "no_tokenizer")
    assert not (tmp_path / "out").exists()


def test_vocab_over_uint16_is_refused(tmp_path, tiny_corpus_dir):
    big = tiktoken.Encoding(name="big", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens={"<|bos|>": 70_000})
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.pkl").write_bytes(pickle.dumps(big))
    with pytest.raises(UserError, match=r"tokenizer\.pkl: vocab size 70,001 does not fit uint16.*--vocab-size 65536"):
        prep(tmp_path / "out", tiny_corpus_dir, tmp_path / "tok")
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_refused_through_prep(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(UserError, match="directory not found"):
        prep(tmp_path / "out", tmp_path / "missing", tiny_tokenizer_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.parquet files"):
        prep(tmp_path / "out", tmp_path / "empty", tiny_tokenizer_dir)
    write_parquet_files(tmp_path / "notext", [["a"], ["b"]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext" / "shard_00001.parquet")
    with pytest.raises(UserError, match="shard_00001.parquet: has no 'text' column"):
        prep(tmp_path / "out", tmp_path / "notext", tiny_tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_out_dir_of_another_tokenizer_or_source_is_refused_unless_force(
    tmp_path, tiny_shards_dir, tiny_corpus_dir, tiny_tokenizer_dir, tiny_corpus_docs
):
    from nanochat_unsloth.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path / "shards"
    shutil.copytree(tiny_shards_dir, out)
    before = dir_bytes(out)
    other_tok = tmp_path / "other_tok"
    save_tokenizer(train_tokenizer(iter(tiny_corpus_docs["train"]), 400), other_tok)
    with pytest.raises(UserError, match=r"another tokenizer.*--force"):
        prep(out, tiny_corpus_dir, other_tok)
    # the trainer's check on the same mismatch
    with pytest.raises(UserError, match="is not the tokenizer of the shards"):
        load_checked_tokenizer(other_tok, "the shards", ShardManifest.load(out).tokenizer.sha256)
    other_data = tmp_path / "other_data"
    write_parquet_files(other_data, [["one doc", "two docs"], ["val doc"]])
    with pytest.raises(UserError, match=r"another source.*--force"):
        prep(out, other_data, tiny_tokenizer_dir)
    with pytest.raises(UserError, match=r"other options.*--force"):
        prep(out, tiny_corpus_dir, tiny_tokenizer_dir, shard_tokens=4_000)
    assert dir_bytes(out) == before  # nothing touched
    # an unfinished prep of another source is protected the same way
    half = tmp_path / "half"
    prep(half, other_data, tiny_tokenizer_dir, shard_tokens=3, stop_after_shards=1)
    with pytest.raises(UserError, match=r"unfinished prep come from another source"):
        prep(half, tiny_corpus_dir, tiny_tokenizer_dir)
    # shards of unknown origin (no manifest, no state)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "train_000000.bin").write_bytes(b"?")
    with pytest.raises(UserError, match="origin is unknown"):
        prep(stray, tiny_corpus_dir, tiny_tokenizer_dir)
    # --force replaces them all
    r = prep(out, other_data, tiny_tokenizer_dir, force=True, min_val_tokens=1)
    assert r.complete and set(p.name for p in out.iterdir()) == {"manifest.json", "train_000000.bin", "val_000000.bin"}
    assert r.manifest.totals()["train"]["documents"] == 2


# ---- the command line --------------------------------------------------------------------------


def test_prep_cli(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir, tiny_shards_dir, capsys, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(tiny_tokenizer_dir, base / "tokenizer")
    args = ["prep", "--source", str(tiny_corpus_dir), "--base-dir", str(base), "--shard_tokens=5000", "--workers", "2", "--quiet"]
    assert cli.main(args + ["--stop-after-shards", "2"]) == 0
    assert "re-run the same command" in capsys.readouterr().out
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("prep: done") and "skipped" in out and "tok/s" in out
    assert dir_bytes(base / "shards") == dir_bytes(tiny_shards_dir)
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith("prep: already complete")
    # --force deletes and starts over, as the README says, even a complete prep of the same inputs; here
    # with a stray shard beyond the manifest (e.g. from an earlier, larger prep)
    n_files = len(dir_bytes(base / "shards"))
    (base / "shards" / "train_000099.bin").write_bytes(b"stray")
    assert cli.main(args + ["--workers", "0", "--force"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prep: done in") and f"(--force: first deleted the {n_files + 1} file(s)" in out, out
    assert dir_bytes(base / "shards") == dir_bytes(tiny_shards_dir)


def test_prep_cli_errors_are_one_line(tmp_path, tiny_corpus_dir, capsys):
    rc = cli.main(["prep", "--source", str(tiny_corpus_dir), "--base-dir", str(tmp_path), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nanochat-unsloth tokenizer" in err and len(err.splitlines()) == 1
