"""A tiny base dir for training-loop tests: a byte-level tokenizer and random-text shards.

Independent of the prep job on purpose: loop tests should fail only for loop bugs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import tiktoken
import torch

from nanochat_unsloth.common import sha256_file
from nanochat_unsloth.shards.format import write_shard
from nanochat_unsloth.shards.manifest import ShardEntry, ShardManifest, TokenizerFingerprint

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def byte_level_encoding() -> tiktoken.Encoding:
    """256 byte tokens + nanochat's 9 specials: vocab 265, BOS = 256."""
    ranks = {bytes([i]): i for i in range(256)}
    specials = {name: 256 + i for i, name in enumerate(SPECIALS)}
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=specials)


def make_train_base_dir(base: Path, train_tokens: int = 60_000, val_tokens: int = 8_000, shard_tokens: int = 25_000,
                        seed: int = 0) -> Path:
    """Write <base>/tokenizer and <base>/shards with synthetic 'documents' (BOS + bytes)."""
    enc = byte_level_encoding()
    tok_dir = base / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    with open(tok_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    token_bytes = torch.tensor([1] * 256 + [0] * len(SPECIALS), dtype=torch.int32)
    torch.save(token_bytes, tok_dir / "token_bytes.pt")

    rng = np.random.default_rng(seed)
    shards_dir = base / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    bos = 256
    # a learnable stream: documents of a repeated random "word" pattern, so loss can fall
    words = [rng.integers(97, 123, size=rng.integers(2, 7)) for _ in range(50)]

    def stream(n):
        out = []
        while len(out) < n:
            out.append(bos)
            for _ in range(rng.integers(5, 40)):
                out.extend(words[rng.integers(0, len(words))].tolist() + [32])
        return np.array(out[:n], dtype=np.uint16)

    entries = []
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        tokens = stream(n)
        for i, start in enumerate(range(0, n, shard_tokens)):
            chunk = tokens[start:start + shard_tokens]
            info = write_shard(shards_dir / f"{split}_{i:06d}.bin", chunk, enc.n_vocab, bos)
            entries.append(ShardEntry(file=info.file, split=split, tokens=info.tokens,
                                      documents=int((chunk == bos).sum()), sha256=info.sha256))
    manifest = ShardManifest(
        tokenizer=TokenizerFingerprint(sha256=sha256_file(tok_dir / "tokenizer.pkl"), vocab_size=enc.n_vocab,
                                       bos_id=bos),
        source={"kind": "synthetic", "description": "tests/train_fixtures.py"},
        shard_tokens=shard_tokens,
        shards=entries,
    )
    manifest.save(shards_dir)
    return base


# depth 2 -> n_embd 128, 1 head of 128; T=32, B=2; 2 micro-steps per step on one process
TINY_TRAIN_ARGS = [
    "--depth", "2", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128",
    "--eval-every", "-1", "--eval-tokens", "512", "--sample-every", "-1", "--kernels", "torch",
]
