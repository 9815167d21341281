"""TokenShardLoader: content, rank partitioning, world-size invariance, epochs, val, resume, errors."""

from __future__ import annotations

import json
import pickle
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from tqdm import tqdm

from nanochat_unsloth.common import UserError
from nanochat_unsloth.shards.format import write_shard
from nanochat_unsloth.shards.loader import TokenShardLoader
from nanochat_unsloth.shards.manifest import ShardEntry, ShardManifest, TokenizerFingerprint

VOCAB, BOS, TOK_SHA = 50000, 49999, "ab" * 32
B, T = 2, 5  # window = 11 tokens


def make_shards(root, train_sizes=(37, 100, 5, 200, 64), val_sizes=(40, 33), seed=0):
    """Write a shard dir with random tokens; return (dir, {split: concatenated stream})."""
    rng = np.random.default_rng(seed)
    entries, streams = [], {}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        parts = []
        for i, n in enumerate(sizes):
            tokens = rng.integers(0, VOCAB, size=n, dtype=np.uint16)
            info = write_shard(root / f"{split}_{i:06d}.bin", tokens, VOCAB, BOS)
            entries.append(ShardEntry(file=info.file, split=split, tokens=info.tokens, documents=1, sha256=info.sha256))
            parts.append(tokens)
        streams[split] = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    fp = TokenizerFingerprint(sha256=TOK_SHA, vocab_size=VOCAB, bos_id=BOS)
    ShardManifest(tokenizer=fp, source={"kind": "test"}, shard_tokens=256, shards=entries).save(root)
    return root, streams


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path)


def window_of(stream, g, b=B, t=T):
    n = b * t + 1
    return stream[g * n : (g + 1) * n].astype(np.int64)


def key(batch):
    """A hashable identity of a batch: its whole window."""
    x, y = batch
    return tuple(x.flatten().tolist()) + (int(y.flatten()[-1]),)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def step_windows(shards_dir, world_size, grad_accum, steps, split="train"):
    """Per optimizer step, the multiset of windows all ranks read together."""
    loaders = [TokenShardLoader(shards_dir, split, B, T, r, world_size, grad_accum) for r in range(world_size)]
    out = []
    for _ in range(steps):
        out.append(Counter(key(b) for ld in loaders for b in take(ld, grad_accum)))
    return out


# ---- content ---------------------------------------------------------------------------------
def test_content_matches_stream_including_shard_boundaries(shards):
    d, streams = shards
    stream = streams["train"]
    ld = TokenShardLoader(d, "train", B, T)
    n = B * T + 1
    assert ld.num_windows == len(stream) // n == 36
    assert ld.tokens_per_epoch == 36 * n
    assert (ld.vocab_size, ld.bos_id) == (VOCAB, BOS)
    # shard boundaries at 37, 137, 142, 342: windows 3, 12 and 31 straddle them; window 12 spans three shards
    boundaries = np.cumsum([37, 100, 5, 200])
    spanning = {g for g in range(36) for b in boundaries if g * n < b < (g + 1) * n}
    assert {3, 12, 31} <= spanning
    for g in range(36):
        x, y = next(ld)
        w = window_of(stream, g)
        assert x.shape == y.shape == (B, T)
        assert x.dtype == torch.int32 and y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        np.testing.assert_array_equal(x.numpy().ravel(), w[:-1])
        np.testing.assert_array_equal(y.numpy().ravel(), w[1:])
        assert ld.epoch == 0


def test_epoch_wraps(shards):
    d, streams = shards
    ld = TokenShardLoader(d, "train", B, T)
    first = take(ld, ld.num_windows)
    again = take(ld, 3)
    assert ld.epoch == 1
    for a, b in zip(first[:3], again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    take(ld, ld.num_windows)
    assert ld.epoch == 2


# ---- ranks and world-size invariance ---------------------------------------------------------
def test_ranks_disjoint_and_cover_the_step(shards):
    d, _ = shards
    W, ga, steps = 3, 2, 8
    loaders = [TokenShardLoader(d, "train", B, T, r, W, ga) for r in range(W)]
    single = TokenShardLoader(d, "train", B, T, 0, 1, W * ga)
    for _ in range(steps):
        per_rank = [[key(b) for b in take(ld, ga)] for ld in loaders]
        flat = [k for ks in per_rank for k in ks]
        assert len(set(flat)) == len(flat)  # no window read twice within a step
        for i in range(W):
            for j in range(i + 1, W):
                assert not set(per_rank[i]) & set(per_rank[j])
        assert Counter(flat) == Counter(key(b) for b in take(single, W * ga))


def test_world_size_invariance(shards):
    d, _ = shards
    steps = 20  # 80 windows: wraps past the 36-window epoch twice
    ref = step_windows(d, 1, 4, steps)
    assert step_windows(d, 2, 2, steps) == ref
    assert step_windows(d, 4, 1, steps) == ref


# ---- val -------------------------------------------------------------------------------------
def test_val_finite_restartable_equal_counts(shards):
    d, streams = shards
    W = 2
    loaders = [TokenShardLoader(d, "val", B, T, r, W) for r in range(W)]
    nw = len(streams["val"]) // (B * T + 1)
    assert loaders[0].num_windows == nw == 6
    counts = {ld.batches_per_rank for ld in loaders}
    assert counts == {nw // W}
    runs = [[key(b) for b in ld] for ld in loaders]
    assert [len(r) for r in runs] == [nw // W] * W
    assert not set(runs[0]) & set(runs[1])
    # rank r reads windows r, r+W, ...
    for r, ks in enumerate(runs):
        for i, k in enumerate(ks):
            assert list(k[:-1]) == window_of(streams["val"], i * W + r)[:-1].tolist()
    with pytest.raises(StopIteration):
        next(loaders[0])
    assert [key(b) for b in loaders[0]] == runs[0]  # iter() restarts
    loaders[1].reset()
    assert key(next(loaders[1])) == runs[1][0]


def test_val_equal_counts_with_uneven_split(tmp_path):
    d, _ = make_shards(tmp_path, val_sizes=(11 * 7 + 3,))  # 7 windows over 3 ranks -> 3 each, 2 of them padding
    runs = [list(TokenShardLoader(d, "val", B, T, r, 3)) for r in range(3)]
    assert [len(r) for r in runs] == [3, 3, 3]
    padding = [[bool((y < 0).all()) for _, y in r] for r in runs]
    assert padding == [[False, False, False], [False, False, True], [False, False, True]]


# ---- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5, 36, 41])
def test_resume_continues_exactly(shards, k):
    d, _ = shards
    args = (d, "train", B, T, 1, 2, 3)
    orig = TokenShardLoader(*args)
    take(orig, k)
    state = pickle.loads(pickle.dumps(orig.state_dict()))
    assert all(isinstance(v, (int, str)) for v in state.values())
    restored = TokenShardLoader(*args)
    restored.load_state_dict(state)
    assert restored.epoch == orig.epoch
    for a, b in zip(take(orig, 12), take(restored, 12)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert restored.epoch == orig.epoch


def test_state_is_rank_independent(shards):
    """Accelerate saves the main process's state only; every rank must resume from it."""
    d, _ = shards
    r0, r1 = (TokenShardLoader(d, "train", B, T, r, 2, 2) for r in range(2))
    take(r0, 5)
    take(r1, 5)
    fresh = TokenShardLoader(d, "train", B, T, 1, 2, 2)
    fresh.load_state_dict(r0.state_dict())
    assert [key(b) for b in take(fresh, 6)] == [key(b) for b in take(r1, 6)]


def test_resume_val(shards):
    d, _ = shards
    orig = TokenShardLoader(d, "val", B, T)
    next(orig)
    restored = TokenShardLoader(d, "val", B, T)
    restored.load_state_dict(orig.state_dict())
    rest = [key(next(restored)) for _ in range(orig.batches_per_rank - 1)]
    assert rest == [key(next(orig)) for _ in range(orig.batches_per_rank - 1)]
    for ld in (orig, restored):
        with pytest.raises(StopIteration):
            next(ld)


# ---- errors ----------------------------------------------------------------------------------
def test_missing_dir_and_manifest(tmp_path):
    with pytest.raises(UserError, match="shard directory not found"):
        TokenShardLoader(tmp_path / "nope", "train", B, T)
    with pytest.raises(UserError, match="no manifest"):
        TokenShardLoader(tmp_path, "train", B, T)


def test_split_without_shards(tmp_path):
    d, _ = make_shards(tmp_path, val_sizes=())
    with pytest.raises(UserError, match="no val shards"):
        TokenShardLoader(d, "val", B, T)


def test_too_short(shards):
    d, streams = shards
    with pytest.raises(UserError, match=r"need 8,193 tokens for --device_batch_size 4 x --max_seq_len 2048.*have 406"):
        TokenShardLoader(d, "train", 4, 2048)
    # val has 6 windows: fine for 6 ranks, not for 7 (a rank would have nothing to evaluate)
    TokenShardLoader(d, "val", B, T, 5, 6)
    with pytest.raises(UserError, match="fewer than the 7 processes"):
        TokenShardLoader(d, "val", B, T, 0, 7)


def test_tokenizer_mismatch(shards):
    d, _ = shards
    TokenShardLoader(d, "train", B, T, tokenizer_sha256=TOK_SHA)
    with pytest.raises(UserError, match="tokenizer"):
        TokenShardLoader(d, "train", B, T, tokenizer_sha256="cd" * 32)


def test_truncated_shard(shards):
    d, _ = shards
    path = d / "train_000001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        TokenShardLoader(d, "train", B, T)
    TokenShardLoader(d, "val", B, T)  # the other split is not affected


def test_manifest_count_mismatch(shards):
    d, _ = shards
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["tokens"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="the manifest says 38"):
        TokenShardLoader(d, "train", B, T)


def test_checksum_only_when_asked(shards):
    d, _ = shards
    path = d / "train_000002.bin"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    TokenShardLoader(d, "train", B, T)
    with pytest.raises(UserError, match="sha256 does not match"):
        TokenShardLoader(d, "train", B, T, verify_checksums=True)


def test_the_checksum_pass_shows_a_bar_on_rank_0(shards, capsys, monkeypatch):
    d, streams = shards
    TokenShardLoader(d, "train", B, T, verify_checksums=True)
    assert capsys.readouterr().err == "", "no bar into a log file (stderr not a terminal)"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as in a terminal
    TokenShardLoader(d, "train", B, T, rank=0, world_size=2, verify_checksums=True)
    bar = capsys.readouterr().err.split("\r")[-1]
    # rank 0's share, every other shard from the first: shards 0, 2, 4 (header + 2 bytes a token)
    share = tqdm.format_sizeof(sum(1024 + 2 * n for n in (37, 5, 64)), divisor=1024)
    assert "checksums train (share 0 of 2): 100%" in bar and f"{share}/{share}" in bar, bar
    TokenShardLoader(d, "train", B, T, rank=1, world_size=2, verify_checksums=True)
    TokenShardLoader(d, "train", B, T)
    assert capsys.readouterr().err == "", "other ranks and a pass without checksums show none"


def test_token_id_past_the_vocab_is_one_line_when_read(tmp_path):
    """eval reads shards without checksumming them: a bad id must not become an IndexError in the model."""
    d, _ = make_shards(tmp_path)
    tokens = np.full(100, VOCAB, dtype=np.uint16)  # == vocab size: one past the last id
    write_shard(d / "train_000001.bin", tokens, VOCAB, BOS)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][1]["sha256"] = "stale"  # the checksum pass is what would catch it at a run's start
    (d / "manifest.json").write_text(json.dumps(m))
    loader = TokenShardLoader(d, "train", B, T)
    with pytest.raises(UserError, match=rf"train_000001.bin: holds token id {VOCAB}, not below the vocab size"):
        take(loader, loader.num_windows)


def test_state_mismatch(shards):
    d, _ = shards
    state = TokenShardLoader(d, "train", B, T, 0, 2, 2).state_dict()
    with pytest.raises(UserError, match=r"device batch size 2 \(now 3\).*--force"):
        TokenShardLoader(d, "train", 3, T, 0, 2, 2).load_state_dict(state)
    with pytest.raises(UserError, match=r"windows per step 4 \(now 2\)"):
        TokenShardLoader(d, "train", B, T, 0, 2, 1).load_state_dict(state)
    with pytest.raises(UserError, match=r"split 'train' vs 'val' now"):
        TokenShardLoader(d, "val", B, T, 0, 2, 2).load_state_dict(state)
    with pytest.raises(UserError, match="not a TokenShardLoader state"):
        TokenShardLoader(d, "train", B, T, 0, 2, 2).load_state_dict({"cursor": 3})


@pytest.mark.parametrize("old, new", [((2, 2), (4, 1)), ((1, 4), (2, 2)), ((4, 1), (1, 4))])
def test_resume_on_another_world_size_reads_the_same_step_tokens(shards, old, new):
    """(world_size, grad_accum) -> another split of the same K: every later step reads the same windows."""
    d, _ = shards
    (ws0, ga0), (ws1, ga1) = old, new
    before = [TokenShardLoader(d, "train", B, T, r, ws0, ga0) for r in range(ws0)]
    for ld in before:
        take(ld, 3 * ga0)  # 3 steps done
    after = [TokenShardLoader(d, "train", B, T, r, ws1, ga1) for r in range(ws1)]
    for ld in after:
        ld.load_state_dict(before[0].state_dict())
    assert "the same tokens in every step" in after[0].notice

    def next_steps(loaders, accum, n=5):  # the set of windows each step reads, over all ranks
        steps = []
        for _ in range(n):
            steps.append(sorted(key(b) for ld in loaders for b in take(ld, accum)))
        return steps
    assert next_steps(after, ga1) == next_steps(before, ga0)


def test_new_batch_layout_only_with_allow_and_a_notice(shards):
    d, _ = shards
    old = TokenShardLoader(d, "train", B, T, 0, 1, 2)
    take(old, 4)
    new = TokenShardLoader(d, "train", 1, T, 0, 1, 4)
    with pytest.raises(UserError, match="device batch size 2 \\(now 1\\)"):
        new.load_state_dict(old.state_dict())
    new.allow_new_layout = True
    new.load_state_dict(old.state_dict())
    assert new.cursor == 2 * 4 and "--force" in new.notice  # step 2 of the new layout


def test_new_layout_notice_says_how_many_tokens_are_read_again(shards):
    """--force with fewer tokens per step resumes at the same step, further back in the stream: the notice
    must say how far (here half of what was trained on is read a second time), not 'some tokens'."""
    d, streams = shards
    old = TokenShardLoader(d, "train", B, T, 0, 1, 4)  # 4 windows of 11 tokens per step
    take(old, 3 * 4)  # 3 steps: tokens [0, 132)
    new = TokenShardLoader(d, "train", B, T, 0, 1, 2)  # 2 windows per step
    new.allow_new_layout = True
    new.load_state_dict(old.state_dict())
    x, _ = next(new)
    assert x.flatten().tolist() == streams["train"][66:76].tolist()  # step 3 of the new layout: window 6
    assert "token 132" in new.notice and "token 66" in new.notice and "66 tokens read a second time" in new.notice
