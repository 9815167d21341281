"""`nanochat-unsloth tokenizer`: nanochat's scripts.tok_train on our sources.

Trains rustbpe on the train split (each document cropped to --doc-cap characters, stopping once
--max-chars characters were fed), saves <base>/tokenizer/{tokenizer.pkl, token_bytes.pt}, then
checks a round trip and prints the token length statistics.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from typing import Iterator

import numpy as np

from nanochat_unsloth.common import FlagParser, UserError, get_base_dir, read_json, sha256_file
from nanochat_unsloth.prep.sources import Source, add_source_args, open_source
from nanochat_unsloth.tokenizer import (
    SPECIAL_TOKENS,
    TOKEN_BYTES_PT,
    TOKENIZER_PKL,
    load_tokenizer,
    save_tokenizer,
    token_bytes_file,
    token_bytes_mismatch,
    train_tokenizer,
    write_tokenizer_files,
)
from nanochat_unsloth.shards.format import check_vocab_fits

TRAIN_META = "tokenizer_meta.json"  # our addition to the directory: how tokenizer.pkl was made

# Covers what tends to break a byte-level BPE: digits, contractions, punctuation runs, multi-byte text.
SANITY_TEXT = """Hello there, world! A quick test.
Numbers: 7, 42, 1234567 and 3.14159
Contractions: we're, they'll, I've, don't
Symbols: ~!@#$%^&*()[]{}<>?/\\|
Unicode: Grüße, こんにちは, Ελληνικά 🚀✨"""


def planned_chars(source: Source, max_chars: int, doc_cap: int) -> int | None:
    """The characters `text_iterator` will feed, before it feeds any: known for a parquet source (each row's
    length read from its column, one pass that stops where --max-chars does), None for a stream."""
    lengths = getattr(source, "text_lengths", None)
    if lengths is None:
        return None
    total = 0
    for row_group in lengths("train"):
        fed = total + np.cumsum(np.minimum(row_group, doc_cap))
        past = np.flatnonzero(fed > max_chars)
        if past.size:  # the document that passes max_chars is the last one fed
            return int(fed[past[0]])
        total = int(fed[-1]) if len(fed) else total
    return total


def text_iterator(source: Source, max_chars: int, doc_cap: int, stats: dict) -> Iterator[str]:
    """Train-split documents cropped to doc_cap; stop after the document that passes max_chars (as nanochat)."""
    from tqdm import tqdm

    nchars = 0
    # the bar's total is what will really be read: the corpus when it is smaller than --max-chars
    bar = tqdm(total=planned_chars(source, max_chars, doc_cap), unit="char", unit_scale=True,
               desc="tokenizer: reading", mininterval=1.0)
    try:
        for text in source.iter_documents("train"):
            if not isinstance(text, str):  # null, non-text or undecodable rows carry no text to learn from
                stats["skipped"] += 1
                continue
            text = text[:doc_cap]
            nchars += len(text)
            stats["docs"] += 1
            bar.update(len(text))
            yield text
            if nchars > max_chars:
                return
    finally:
        stats["chars"] = nchars
        bar.close()


def main(argv: list[str]) -> int:
    parser = FlagParser(prog="nanochat-unsloth tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", default=None, help="default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    add_source_args(parser, flag="--data", default_help=" (default: <base>/base_data)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="including the 9 special tokens (default 65,536)")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters (default 2B)")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters (default 10,000)")
    parser.add_argument("--force", action="store_true", help="replace an existing, different tokenizer")
    args = parser.parse_args(argv)

    check_vocab_fits(args.vocab_size, where=f"--vocab-size {args.vocab_size}")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise UserError("--max-chars and --doc-cap must be positive")
    base = get_base_dir(args.base_dir)
    tok_dir = base / "tokenizer"
    source = open_source(
        args.data or str(base / "base_data"),
        val_files=args.val_files,
        val_docs=args.val_docs,
        hf_config=args.hf_config,
        hf_data_files=args.hf_data_files,
        flag="--data",
    )
    request = {
        "source": source.describe(),
        "vocab_size": args.vocab_size,
        "max_chars": args.max_chars,
        "doc_cap": args.doc_cap,
    }
    pkl_path = tok_dir / TOKENIZER_PKL
    # Decide before training (which can take an hour): same request and pair intact -> nothing to do; same
    # request with a token_bytes.pt that is not the pickle's -> rewrite it from the pickle; any other
    # tokenizer already there -> refuse unless --force.
    if pkl_path.exists() and not args.force:
        meta = read_json(tok_dir / TRAIN_META) if (tok_dir / TRAIN_META).exists() else None
        pkl_sha = sha256_file(pkl_path)
        if meta and meta.get("request") == request and meta.get("sha256") == pkl_sha:
            enc = load_tokenizer(tok_dir)
            why = token_bytes_mismatch(tok_dir, enc, pkl_sha)
            if why is None:
                print(f"tokenizer: {pkl_path} was already trained with these settings; nothing to do")
                return 0
            write_tokenizer_files(tok_dir, {TOKEN_BYTES_PT: token_bytes_file(enc, pkl_sha),
                                            TOKENIZER_PKL: pkl_path.read_bytes()})
            print(f"tokenizer: {tok_dir / TOKEN_BYTES_PT} {why}; rewrote it from {pkl_path}")
            return 0
        raise UserError(
            f"{pkl_path}: a tokenizer is already there (made from other data or settings); pass --force to replace "
            "it (shards and checkpoints made with the old one will no longer match), or use another --base-dir"
        )

    print(f"max_chars: {args.max_chars:,}")
    print(f"doc_cap: {args.doc_cap:,}")
    print(f"vocab_size: {args.vocab_size:,}")
    print(f"data: {request['source']['description']}")
    stats = {"docs": 0, "chars": 0, "skipped": 0}
    t0 = time.time()
    enc = train_tokenizer(text_iterator(source, args.max_chars, args.doc_cap, stats), args.vocab_size)
    train_time = time.time() - t0
    print(f"Training time: {train_time:.2f}s ({stats['docs']:,} documents, {stats['chars']:,} characters"
          + (f", {stats['skipped']:,} null/non-text/undecodable rows skipped" if stats["skipped"] else "") + ")")
    if stats["docs"] == 0:  # a tokenizer of bare bytes would be saved, and shards made with it, from no text
        raise UserError(f"--data {request['source']['description']}: no text in its train split "
                        f"({stats['skipped']:,} rows, all null, non-text or not valid UTF-8); nothing was saved. "
                        "Point --data at documents in a string 'text' column")
    if enc.n_vocab < args.vocab_size:
        print(f"warning: the data only supported {enc.n_vocab - len(SPECIAL_TOKENS):,} merged tokens; "
              f"vocab size is {enc.n_vocab:,}, not {args.vocab_size:,}")

    # ---- sanity check, then save ----------------------------------------------------------------
    ids = enc.encode_ordinary(SANITY_TEXT)
    if enc.decode(ids) != SANITY_TEXT:
        raise RuntimeError("tokenizer round trip failed on the sanity text; the trained tokenizer is broken")
    # the record of the request goes in the same set as the pair, so a kill cannot leave it describing
    # another tokenizer.pkl than the one there
    train_meta = {"request": request, "sha256": hashlib.sha256(pickle.dumps(enc)).hexdigest(), "vocab_size": enc.n_vocab}
    pkl_path, bytes_path = save_tokenizer(
        enc, tok_dir, force=args.force,
        extra={TRAIN_META: (json.dumps(train_meta, indent=2, sort_keys=True) + "\n").encode()})
    print(f"Saved tokenizer encoding to {pkl_path}")
    print(f"Saved token_bytes to {bytes_path}")

    import torch

    token_bytes = torch.load(bytes_path)
    nonzero = token_bytes[token_bytes > 0].float()
    print(
        f"tokenizer: vocab {enc.n_vocab:,} ({len(SPECIAL_TOKENS)} special) | sanity text: {len(SANITY_TEXT)} chars -> "
        f"{len(ids)} tokens, round trip ok | token bytes min {int(nonzero.min())} max {int(nonzero.max())} "
        f"mean {nonzero.mean():.2f} std {nonzero.std():.2f} | sha256 {sha256_file(pkl_path)[:12]}"
    )
    return 0


if __name__ == "__main__":
    import sys

    from nanochat_unsloth.common import run_main

    sys.exit(run_main(main, None))
