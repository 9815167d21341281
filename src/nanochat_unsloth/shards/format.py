"""The token shard file: llm.c / modded-nanogpt's `.bin` convention, so their loaders read ours.

    header: 256 little-endian int32
        [0] = 20240520  magic
        [1] = 1         version
        [2] = number of tokens in the file
        [3] = vocab size of the tokenizer that made it   (our use of a free slot)
        [4] = BOS token id                                (our use of a free slot)
    body:   the tokens, little-endian uint16

The file size is therefore exactly 1024 + 2 * ntok bytes; anything else is truncated or foreign.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat_unsloth.common import UserError, atomic_path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 1 << 16  # uint16 tokens


@dataclass(frozen=True)
class ShardHeader:
    ntok: int
    vocab_size: int
    bos_id: int


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one written shard."""

    file: str
    tokens: int
    sha256: str


def check_vocab_fits(vocab_size: int, where: str = "tokenizer") -> None:
    if vocab_size > MAX_VOCAB:
        raise UserError(
            f"{where}: vocab size {vocab_size:,} does not fit uint16 token shards (max {MAX_VOCAB:,}); "
            f"train a tokenizer with --vocab-size {MAX_VOCAB} or less"
        )


def encode_header(ntok: int, vocab_size: int, bos_id: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2], header[3], header[4] = SHARD_MAGIC, SHARD_VERSION, ntok, vocab_size, bos_id
    return header.tobytes()


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, bos_id: int) -> ShardInfo:
    """Write one shard atomically (temp file, then rename) and return its size and checksum."""
    check_vocab_fits(vocab_size)
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    path = Path(path)
    digest = hashlib.sha256()
    header = encode_header(len(tokens), vocab_size, bos_id)
    body = tokens.tobytes()
    digest.update(header)
    digest.update(body)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(body)
    return ShardInfo(file=path.name, tokens=len(tokens), sha256=digest.hexdigest())


def read_shard_header(path: str | Path) -> ShardHeader:
    """Read and validate a shard's header against its size. UserError names the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path}: shard file is missing; re-run `nanochat-unsloth prep`") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path}: shorter than the {HEADER_BYTES}-byte shard header (truncated?); re-run prep")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise UserError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise UserError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    ntok = int(header[2])
    expected = HEADER_BYTES + 2 * ntok
    if size != expected:
        raise UserError(
            f"{path}: size {size:,} bytes but header says {ntok:,} tokens ({expected:,} bytes); "
            "the shard is truncated or corrupt, re-run prep"
        )
    return ShardHeader(ntok=ntok, vocab_size=int(header[3]), bos_id=int(header[4]))


def scan_shard(path: str | Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256 of the whole file, largest token id) in one read of the file."""
    digest = hashlib.sha256()
    max_token = -1
    with open(path, "rb") as f:
        digest.update(f.read(HEADER_BYTES))
        while block := f.read(chunk):  # chunk is even: blocks hold whole uint16 tokens
            digest.update(block)
            max_token = max(max_token, int(np.frombuffer(block, dtype="<u2").max()))
    return digest.hexdigest(), max_token


def open_shard_tokens(path: str | Path) -> np.memmap:
    """Memory-map a shard's tokens read-only, after validating the header."""
    header = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(header.ntok,))

