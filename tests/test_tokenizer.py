"""The tokenizer: nanochat-compatible tokenizer.pkl, token_bytes.pt, training semantics and the CLI."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import pytest
import tiktoken
import torch
from conftest import killed_at, raw_string_array, watch_file_ops, write_parquet_files

from nanochat_unsloth import cli
from nanochat_unsloth.common import UserError
from nanochat_unsloth.prep import tokenizer_cli
from nanochat_unsloth.prep.sources import open_source
from nanochat_unsloth.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    bos_id,
    compute_token_bytes,
    load_checked_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

TEXT = "Hello, world! It's 2024: Grüße, 你好世界 🌍\n\n  def f(x):\n\treturn x ** 2  # done"


def test_pickle_is_a_tiktoken_encoding_with_specials_after_merges(tiny_tokenizer_dir):
    with open(tiny_tokenizer_dir / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)  # exactly what nanochat's RustBPETokenizer.from_directory does
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == 512
    assert enc._pat_str == SPLIT_PATTERN
    n_merges = enc.n_vocab - len(SPECIAL_TOKENS)
    assert [enc.encode_single_token(s) for s in SPECIAL_TOKENS] == list(range(n_merges, enc.n_vocab))
    assert bos_id(enc) == n_merges
    # every id below the specials is a mergeable token, the 256 single bytes among them
    assert {enc.decode_single_token_bytes(i) for i in range(n_merges)} >= {bytes([b]) for b in range(256)}
    ids = enc.encode_ordinary(TEXT)
    assert enc.decode(ids) == TEXT
    assert max(ids) < n_merges  # ordinary text never yields a special token
    assert enc.encode("<|bos|>x", allowed_special="all")[0] == bos_id(enc)


def test_token_bytes_are_raw_byte_lengths(tiny_tokenizer_dir):
    enc = load_tokenizer(tiny_tokenizer_dir)
    token_bytes = torch.load(tiny_tokenizer_dir / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (enc.n_vocab,)
    n_merges = enc.n_vocab - len(SPECIAL_TOKENS)
    assert token_bytes[n_merges:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert token_bytes[:n_merges].tolist() == [len(enc.decode_single_token_bytes(i)) for i in range(n_merges)]
    assert int(token_bytes[:n_merges].min()) >= 1
    # raw lengths (not decode-then-encode) make any text's tokens sum to its exact UTF-8 size,
    # even where a token holds only part of a multi-byte character
    ids = enc.encode_ordinary(TEXT)
    assert int(token_bytes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert torch.equal(compute_token_bytes(enc), token_bytes)


def test_training_is_deterministic_and_checks_vocab_size(tiny_corpus_docs):
    docs = tiny_corpus_docs["train"][:60]
    a = pickle.dumps(train_tokenizer(iter(docs), 300))
    b = pickle.dumps(train_tokenizer(iter(docs), 300))
    assert a == b
    with pytest.raises(UserError, match="--vocab-size 100"):
        train_tokenizer(iter(docs), 100)


def test_save_refuses_a_different_tokenizer_unless_forced(tmp_path, tiny_corpus_docs):
    docs = tiny_corpus_docs["train"][:60]
    first, second = train_tokenizer(iter(docs), 300), train_tokenizer(iter(docs), 320)
    save_tokenizer(first, tmp_path)
    save_tokenizer(first, tmp_path)  # the same one again: fine
    before = (tmp_path / "tokenizer.pkl").read_bytes()
    with pytest.raises(UserError, match="--force"):
        save_tokenizer(second, tmp_path)
    assert (tmp_path / "tokenizer.pkl").read_bytes() == before  # nothing written
    save_tokenizer(second, tmp_path, force=True)
    assert load_tokenizer(tmp_path).n_vocab == 320
    assert torch.load(tmp_path / "token_bytes.pt").shape == (320,)
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="nanochat-unsloth tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot be unpickled"):
        load_tokenizer(tmp_path)


def test_text_iterator_crops_and_stops_like_nanochat(tiny_corpus_dir, tiny_corpus_docs):
    source = open_source(str(tiny_corpus_dir))
    stats = {"docs": 0, "chars": 0, "skipped": 0}
    got = list(tokenizer_cli.text_iterator(source, max_chars=1_000, doc_cap=150, stats=stats))
    train = tiny_corpus_docs["train"]
    # cropped to doc_cap; the document that passes max_chars is still yielded, then it stops
    expected, n = [], 0
    for doc in train:
        expected.append(doc[:150])
        n += len(doc[:150])
        if n > 1_000:
            break
    assert got == expected and stats["chars"] == n


@pytest.mark.parametrize("max_chars, doc_cap", [(10**9, 10_000), (1_000, 150), (5_000, 10**9)])
def test_the_reading_bar_counts_the_real_characters(tiny_corpus_dir, capsys, max_chars, doc_cap):
    """Its total is what will be read: the corpus when smaller than --max-chars (not --max-chars), else the
    characters up to the document that passes it."""
    source = open_source(str(tiny_corpus_dir))
    stats = {"docs": 0, "chars": 0, "skipped": 0}
    planned = tokenizer_cli.planned_chars(source, max_chars, doc_cap)
    for _ in tokenizer_cli.text_iterator(source, max_chars=max_chars, doc_cap=doc_cap, stats=stats):
        pass
    assert planned == stats["chars"]
    assert "tokenizer: reading: 100%" in capsys.readouterr().err.split("\r")[-1]


def test_tokenizer_cli(tmp_path, tiny_corpus_dir, capsys):
    base = tmp_path / "base"
    args = ["tokenizer", "--data", str(tiny_corpus_dir), "--base-dir", str(base), "--vocab_size=300"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "round trip ok" in out and "Training time" in out
    enc = load_tokenizer(base / "tokenizer")
    assert enc.n_vocab == 300
    pkl = (base / "tokenizer" / "tokenizer.pkl").read_bytes()
    assert cli.main(args) == 0  # same request again: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    # a different request would replace it: refused up front (before training), unless --force
    assert cli.main(args[:-1] + ["--vocab-size", "320"]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert (base / "tokenizer" / "tokenizer.pkl").read_bytes() == pkl
    assert cli.main(args[:-1] + ["--vocab-size", "320", "--force"]) == 0
    assert load_tokenizer(base / "tokenizer").n_vocab == 320
    # the replaced one is kept (the shards made with it need it back), its training record with it
    assert (base / "tokenizer" / "previous_1" / "tokenizer.pkl").read_bytes() == pkl
    assert load_tokenizer(base / "tokenizer" / "previous_1").n_vocab == 300
    assert (base / "tokenizer" / "previous_1" / "tokenizer_meta.json").exists()
    assert "kept the tokenizer being replaced" in capsys.readouterr().out


def test_tokenizer_cli_refuses_vocab_over_uint16(tmp_path, tiny_corpus_dir, capsys):
    rc = cli.main(["tokenizer", "--data", str(tiny_corpus_dir), "--base-dir", str(tmp_path), "--vocab-size", "70000"])
    assert rc == 2
    assert "65,536" in capsys.readouterr().err
    assert not (tmp_path / "tokenizer").exists()


# ---- rows that do not decode, sources without text ----------------------------------------------


def test_undecodable_rows_are_skipped_and_a_source_without_text_is_refused(tmp_path, tiny_corpus_docs, capsys):
    docs = tiny_corpus_docs["train"][:40]
    broken = [b"\xff\xfe not utf-8", b"caf\xe9", None]  # stray bytes, latin-1, a null
    data = tmp_path / "data"
    write_parquet_files(data, [raw_string_array(docs[:20] + broken + docs[20:]), docs[:5]])
    base = tmp_path / "base"
    assert cli.main(["tokenizer", "--data", str(data), "--base-dir", str(base), "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert f"({len(docs):,} documents" in out and "3 null/non-text/undecodable rows skipped" in out, out
    assert load_tokenizer(base / "tokenizer").n_vocab == 300

    def refused(data_dir, pattern: str) -> None:
        empty = tmp_path / f"base_{data_dir.name}"
        code = cli.main(["tokenizer", "--data", str(data_dir), "--base-dir", str(empty), "--vocab-size", "300"])
        err = capsys.readouterr().err.strip().split("\n")[-1]  # after the reading bar's line
        assert code == 2 and err.startswith("error: ") and re.search(pattern, err), err
        assert not (empty / "tokenizer").exists() or not any((empty / "tokenizer").iterdir()), "nothing saved"

    no_text = tmp_path / "no_text"
    write_parquet_files(no_text, [raw_string_array(broken * 3), docs[:5]])
    refused(no_text, r"no text in its train split \(9 rows, all null, non-text or not valid UTF-8\)")
    binary = tmp_path / "binary"  # once it trained on 0 documents and exited 0
    write_parquet_files(binary, [[d.encode() for d in docs], [d.encode() for d in docs[:5]]])
    refused(binary, r"shard_00000\.parquet: its 'text' column holds binary, not strings")


# ---- tokenizer.pkl + token_bytes.pt: one set, checked where read, repaired by a re-run -------------


def tokenizer_state(tok_dir: Path, pairs: dict[str, tuple[bytes, bytes]]) -> str:
    """What a reader finds (nanochat and we load tokenizer.pkl first): 'none' without tokenizer.pkl, else the
    name of the pair it holds; a tokenizer.pkl beside another's token_bytes.pt fails the test."""
    if not (tok_dir / "tokenizer.pkl").exists():
        return "none"
    found = ((tok_dir / "tokenizer.pkl").read_bytes(), (tok_dir / "token_bytes.pt").read_bytes())
    for name, pair in pairs.items():
        if found == pair:
            return name
    raise AssertionError("tokenizer.pkl beside another tokenizer's token_bytes.pt")


def test_force_replaces_the_pair_as_one_set_wherever_it_is_killed(tmp_path, tiny_corpus_docs, monkeypatch):
    docs = tiny_corpus_docs["train"][:60]
    encodings = {"old": train_tokenizer(iter(docs), 300), "new": train_tokenizer(iter(docs), 320)}
    pairs = {}
    for name, enc in encodings.items():
        save_tokenizer(enc, tmp_path / name)
        pairs[name] = tuple((tmp_path / name / f).read_bytes() for f in ("tokenizer.pkl", "token_bytes.pt"))
    tok = tmp_path / "tokenizer"

    # every point a kill can land: the old pair, no tokenizer.pkl, or the new pair; never a mix
    save_tokenizer(encodings["old"], tok)
    seen = []
    with monkeypatch.context() as m:
        watch_file_ops(m, lambda: seen.append(tokenizer_state(tok, pairs)))
        save_tokenizer(encodings["new"], tok, force=True)
    seen.append(tokenizer_state(tok, pairs))
    assert seen[0] == "old" and seen[-1] == "new" and "none" in seen, seen

    # an error at each of those points: no staging dir left, and writing again completes the new pair
    for k in range(len(seen) - 1):
        save_tokenizer(encodings["old"], tok, force=True)
        with killed_at(monkeypatch, k):
            save_tokenizer(encodings["new"], tok, force=True)
        assert tokenizer_state(tok, pairs) in ("old", "none") and not list(tok.glob(".*.tmp"))
        save_tokenizer(encodings["new"], tok, force=True)
        assert tokenizer_state(tok, pairs) == "new"
    # a kill -9 leaves its staging dir: the next write removes it
    leftover = tok / ".tokenizer.pkl.abc123.staging.tmp"
    leftover.mkdir()
    (leftover / "tokenizer.pkl").write_bytes(b"half")
    save_tokenizer(encodings["new"], tok, force=True)
    assert not leftover.exists()


def test_a_mixed_pair_is_refused_and_a_rerun_of_the_tokenizer_repairs_it(tmp_path, tiny_corpus_dir, tiny_corpus_docs,
                                                                         tiny_tokenizer_dir, capsys):
    base = tmp_path / "base"
    args = ["tokenizer", "--data", str(tiny_corpus_dir), "--base-dir", str(base), "--vocab_size=300"]
    assert cli.main(args) == 0
    tok = base / "tokenizer"
    good = (tok / "token_bytes.pt").read_bytes()
    other = tmp_path / "other"
    save_tokenizer(train_tokenizer(iter(tiny_corpus_docs["train"][:40]), 300), other)
    smaller = io.BytesIO()
    torch.save(torch.ones(290, dtype=torch.int32), smaller)
    mixes = {
        "same size, another tokenizer's": ((other / "token_bytes.pt").read_bytes(),
                                          r"was written for another tokenizer\.pkl"),
        "larger, another tokenizer's": ((tiny_tokenizer_dir / "token_bytes.pt").read_bytes(),
                                        r"was written for another tokenizer\.pkl"),
        "smaller, without the link (nanochat's own format)": (smaller.getvalue(),
                                                             r"has 290 entries for tokenizer\.pkl's 300 tokens"),
    }
    capsys.readouterr()
    for table, why in mixes.values():
        (tok / "token_bytes.pt").write_bytes(table)
        with pytest.raises(UserError, match=rf"token_bytes\.pt: {why}.*not the pair of tokenizer\.pkl.*re-run "):
            load_checked_tokenizer(tok, "the shards")  # what train, eval and convert call
        code = cli.main(["prep", "--base-dir", str(base), "--source", str(tiny_corpus_dir), "--workers", "0",
                         "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and re.search(rf"token_bytes\.pt: {why}", err), err
        assert not (base / "shards").exists() or not list((base / "shards").glob("*.bin"))
        # the same tokenizer command again rewrites the table from tokenizer.pkl (it said "nothing to do")
        assert cli.main(args) == 0
        assert "rewrote it from" in capsys.readouterr().out
        assert (tok / "token_bytes.pt").read_bytes() == good
        load_checked_tokenizer(tok, "the shards")
