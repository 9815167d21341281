"""The RustBPE tokenizer: train with `rustbpe`, run with `tiktoken`, stored the way nanochat stores it.

`<base>/tokenizer/tokenizer.pkl` is a pickled `tiktoken.Encoding` (what nanochat's
`RustBPETokenizer.from_directory` unpickles): the learned merges first, then nanochat's 9 special
tokens. `<base>/tokenizer/token_bytes.pt` holds, per token id, how many bytes of text the token
stands for (0 for specials); bits-per-byte evaluation divides by it.

The two files are one pair: they are written as a set (`common.atomic_file_set`), and the tensor in
token_bytes.pt carries the sha256 of the tokenizer.pkl it belongs to as an attribute
(`tokenizer_sha256`), which torch.load (weights_only too) restores and nanochat ignores. Every reader
refuses a pair that does not match; a token_bytes.pt without the attribute (nanochat's own, or ours
from before) is checked by its length against the vocab size.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from pathlib import Path
from typing import Iterable

import tiktoken

from nanochat_unsloth.common import UserError, atomic_file_set, fsync_dir, fsync_tree, sha256_file

TOKENIZER_PKL = "tokenizer.pkl"
TOKEN_BYTES_PT = "token_bytes.pt"
PAIR_ATTR = "tokenizer_sha256"  # on the token_bytes tensor: the sha256 of its tokenizer.pkl
PREVIOUS = "previous"  # tokenizer/previous_N/: a tokenizer that --force replaced, kept
ENCODING_NAME = "rustbpe"  # nanochat's name for the Encoding; kept so the pickles are alike

# nanochat's special tokens, in nanochat's order: they get the ids right after the merges.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the only one pretraining uses
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
BOS = SPECIAL_TOKENS[0]

# GPT-4's split regex with numbers grouped by at most 2 digits instead of 3 (nanochat's choice: fewer
# vocabulary slots spent on numbers at small vocab sizes). Must match nanochat exactly.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the specials


def train_tokenizer(text_iter: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Learn `vocab_size - 9` byte-level BPE tokens with rustbpe, then append the 9 special tokens."""
    import rustbpe  # only training needs it

    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: it must cover the 256 bytes and {len(SPECIAL_TOKENS)} "
            f"special tokens (at least {MIN_VOCAB})"
        )
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(text_iter), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    first_special = len(mergeable_ranks)
    return tiktoken.Encoding(
        name=ENCODING_NAME,
        pat_str=trainer.get_pattern(),
        mergeable_ranks=mergeable_ranks,
        special_tokens={name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)},
    )


def bos_id(enc: tiktoken.Encoding) -> int:
    try:
        return enc.encode_single_token(BOS)
    except KeyError:
        raise UserError(f"tokenizer {enc.name!r} has no {BOS} token; train one with `nanochat-unsloth tokenizer`") from None


def compute_token_bytes(enc: tiktoken.Encoding):
    """int32 tensor [n_vocab]: the byte length of each token's raw bytes, 0 for special tokens.

    We count the token's own bytes, not `len(decode([id]).encode())` as nanochat does: a token that
    holds part of a multi-byte character decodes to U+FFFD (3 bytes) there, so nanochat slightly
    over-counts; with raw bytes the lengths of a text's tokens sum to exactly its UTF-8 length.
    """
    import torch

    specials = set(enc.special_tokens_set)
    special_ids = {enc.encode_single_token(s) for s in specials}
    lengths = []
    for token_id in range(enc.n_vocab):
        if token_id in special_ids:
            lengths.append(0)
            continue
        try:
            lengths.append(len(enc.decode_single_token_bytes(token_id)))
        except KeyError:  # an id no token uses (never for rustbpe: ranks are contiguous)
            lengths.append(0)
    return torch.tensor(lengths, dtype=torch.int32)


def token_bytes_file(enc: tiktoken.Encoding, pkl_sha256: str) -> bytes:
    """token_bytes.pt's bytes for `enc`, linked to the tokenizer.pkl whose sha256 is `pkl_sha256`."""
    import torch

    table = compute_token_bytes(enc)
    setattr(table, PAIR_ATTR, pkl_sha256)  # pickled with the tensor (torch keeps a tensor's __dict__)
    buf = io.BytesIO()
    torch.save(table, buf)
    return buf.getvalue()


def save_tokenizer(enc: tiktoken.Encoding, tokenizer_dir: str | Path, force: bool = False,
                   extra: dict[str, bytes] | None = None) -> tuple[Path, Path]:
    """Write tokenizer.pkl and token_bytes.pt as one set (plus `extra` files, e.g. the CLI's record of how it
    was trained); refuse to replace a different tokenizer unless `force`.

    tokenizer.pkl is the key of the set: a kill leaves the old pair, or no tokenizer.pkl (a re-run of
    `nanochat-unsloth tokenizer` then writes a new one), never a tokenizer.pkl beside another's table.
    """
    tokenizer_dir = Path(tokenizer_dir)
    pkl_path, bytes_path = tokenizer_dir / TOKENIZER_PKL, tokenizer_dir / TOKEN_BYTES_PT
    data = pickle.dumps(enc)
    if pkl_path.exists() and not force and pkl_path.read_bytes() != data:
        raise UserError(
            f"{pkl_path}: a different tokenizer is already there (shards and checkpoints made with it would no "
            "longer match); pass --force to replace it, or use another --base-dir"
        )
    files = {TOKEN_BYTES_PT: token_bytes_file(enc, hashlib.sha256(data).hexdigest()), **(extra or {}),
             TOKENIZER_PKL: data}
    write_tokenizer_files(tokenizer_dir, files)
    return pkl_path, bytes_path


def write_tokenizer_files(tokenizer_dir: str | Path, files: dict[str, bytes], log=print) -> None:
    """Write {name: bytes} into tokenizer_dir as one set, tokenizer.pkl (which must be among them) last. A
    different tokenizer.pkl there (replaced with --force) is kept first (`keep_replaced_tokenizer`)."""
    keep_replaced_tokenizer(Path(tokenizer_dir), files[TOKENIZER_PKL], log)
    names = [n for n in files if n != TOKENIZER_PKL] + [TOKENIZER_PKL]
    with atomic_file_set(tokenizer_dir, names) as staged:
        for name in names:
            staged[name].write_bytes(files[name])


def keep_replaced_tokenizer(tokenizer_dir: Path, new_pkl: bytes, log=print) -> Path | None:
    """Copy the tokenizer that a different tokenizer.pkl is about to replace into tokenizer_dir/previous_N/.
    The shards and checkpoints of that base dir were made with it, and their resumes ask for it back by sha256;
    `--force` (which in `convert` also means "overwrite the checkpoint") must not make that impossible. Copied,
    not moved: the old set stays in place until the new one replaces it as one set. None if nothing differs."""
    pkl = tokenizer_dir / TOKENIZER_PKL
    old_pkl = pkl.read_bytes() if pkl.exists() else new_pkl
    if old_pkl == new_pkl:
        return None
    n = 1
    while (tokenizer_dir / f"{PREVIOUS}_{n}").exists():
        n += 1
    aside, tmp = tokenizer_dir / f"{PREVIOUS}_{n}", tokenizer_dir / f".{PREVIOUS}_{n}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed copy left
    tmp.mkdir()
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file():  # the pair and the record of how it was made
            shutil.copy2(path, tmp / path.name)
    fsync_tree(tmp)
    tmp.rename(aside)
    fsync_dir(tokenizer_dir)
    old_sha = hashlib.sha256(old_pkl).hexdigest()
    log(f"kept the tokenizer being replaced (sha256 {old_sha[:12]}) in {aside}: the shards and checkpoints made "
        "with it need it back")
    return aside


def load_tokenizer(tokenizer_dir: str | Path) -> tiktoken.Encoding:
    """Unpickle `<tokenizer_dir>/tokenizer.pkl` (as nanochat does) and check it is a usable Encoding."""
    pkl_path = Path(tokenizer_dir) / TOKENIZER_PKL
    if not pkl_path.exists():
        raise UserError(f"{pkl_path}: tokenizer not found; run `nanochat-unsloth tokenizer` first (same --base-dir)")
    try:
        with open(pkl_path, "rb") as f:
            enc = pickle.load(f)
    except Exception as e:  # truncated or foreign pickle
        raise UserError(f"{pkl_path}: cannot be unpickled ({type(e).__name__}: {e}); re-run `nanochat-unsloth tokenizer`") from None
    if not isinstance(enc, tiktoken.Encoding):
        raise UserError(f"{pkl_path}: holds a {type(enc).__name__}, not a tiktoken.Encoding; re-run `nanochat-unsloth tokenizer`")
    return enc


def load_checked_tokenizer(tokenizer_dir: str | Path, owner: str, sha256: str | None = None,
                           vocab_size: int | None = None, fix: str = "pass the --base-dir it was made with"
                           ) -> tuple[tiktoken.Encoding, str]:
    """The tokenizer of `tokenizer_dir` and its sha256, refused with one line naming tokenizer.pkl when it is
    not the one `owner` (shards, a checkpoint) was made with: another sha256 (when recorded) or vocab size;
    and refused naming token_bytes.pt when that is not tokenizer.pkl's pair (`check_token_bytes`)."""
    pkl_path = Path(tokenizer_dir) / TOKENIZER_PKL
    enc = load_tokenizer(tokenizer_dir)
    actual = sha256_file(pkl_path)
    if sha256 is not None and actual != sha256:
        raise UserError(f"{pkl_path}: sha256 {actual[:12]} is not the tokenizer of {owner} ({sha256[:12]}); {fix}")
    if vocab_size is not None and enc.n_vocab != vocab_size:
        raise UserError(f"{pkl_path}: {enc.n_vocab} tokens, but the vocab_size of {owner} is {vocab_size}; {fix}")
    check_token_bytes(tokenizer_dir, enc, actual)
    return enc, actual


def token_bytes_mismatch(tokenizer_dir: str | Path, enc: tiktoken.Encoding, pkl_sha256: str) -> str | None:
    """Why token_bytes.pt is not tokenizer.pkl's pair (one phrase), or None when it is."""
    path = Path(tokenizer_dir) / TOKEN_BYTES_PT
    if not path.exists():
        return "not found"
    import torch

    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file
        return f"cannot be read ({type(e).__name__})"
    if not isinstance(table, torch.Tensor) or table.ndim != 1:
        return "is not a 1-D tensor of byte counts"
    linked = getattr(table, PAIR_ATTR, None)
    if linked is not None and linked != pkl_sha256:
        return (f"was written for another tokenizer.pkl (sha256 {str(linked)[:12]}, this one's is "
                f"{pkl_sha256[:12]})")
    if table.numel() != enc.n_vocab:
        return f"has {table.numel()} entries for tokenizer.pkl's {enc.n_vocab} tokens"
    return None


def check_token_bytes(tokenizer_dir: str | Path, enc: tiktoken.Encoding, pkl_sha256: str) -> None:
    """Refuse, in one line, a token_bytes.pt that is not the pair of tokenizer.pkl (`pkl_sha256`): its
    bits per byte would be silently wrong, or fail on an index."""
    why = token_bytes_mismatch(tokenizer_dir, enc, pkl_sha256)
    if why is not None:
        raise UserError(f"{Path(tokenizer_dir) / TOKEN_BYTES_PT}: {why}, so it is not the pair of "
                        f"{TOKENIZER_PKL} (a `tokenizer` run killed between its writes, or a file copied from elsewhere); re-run "
                        "`nanochat-unsloth tokenizer` with the same flags, which rewrites it from tokenizer.pkl")


def load_token_bytes(tokenizer_dir: str | Path, device="cpu"):
    """int32 [vocab]: bytes per token, 0 for specials (the weights of bits-per-byte). Check the pair first
    (`load_checked_tokenizer` does)."""
    path = Path(tokenizer_dir) / TOKEN_BYTES_PT
    if not path.exists():
        raise UserError(f"{path}: not found; run `nanochat-unsloth tokenizer` first (same --base-dir)")
    import torch

    # load to host, then move: Accelerate's MULTI_CPU device is "cpu:0", which map_location rejects
    return torch.load(path, map_location="cpu").to(device)
