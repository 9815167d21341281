"""Shards are verified before the model is built: checksums against the manifest, token ids below the
vocab size, and a moved or copied base dir that re-preps as complete only if its checksums match.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from nanochat_unsloth.common import UserError
from nanochat_unsloth.shards.format import HEADER_BYTES, write_shard
from nanochat_unsloth.shards.manifest import ShardManifest

from train_fixtures import make_train_base_dir
from run_helpers import run_train, flip_bytes


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("integrity_base"))


@pytest.fixture
def own_base(tmp_path) -> Path:
    """A base dir this test may damage."""
    return make_train_base_dir(tmp_path / "own")


def test_flipped_shard_tokens_are_refused_before_the_model(own_base, no_model):
    shard = own_base / "shards" / "train_000001.bin"
    flip_bytes(shard, HEADER_BYTES + 1000, 100)  # 50 tokens, low bit: still valid ids, same size
    with pytest.raises(UserError, match=r"train_000001.bin: sha256 does not match the manifest"):
        run_train(own_base, "--num-iterations", "1")


def test_token_id_beyond_the_vocab_is_refused_before_the_model(own_base, no_model):
    shards = own_base / "shards"
    manifest = ShardManifest.load(shards)
    entry = manifest.shards_for("train")[0]
    tokens = np.fromfile(shards / entry.file, dtype="<u2", offset=HEADER_BYTES)
    tokens[123] = 400  # vocab is 265; the manifest's checksum is updated, so only the id check can catch it
    tok = manifest.tokenizer
    entry.sha256 = write_shard(shards / entry.file, tokens, tok.vocab_size, tok.bos_id).sha256
    manifest.save(shards)
    with pytest.raises(UserError, match=r"train_000000.bin: holds token id 400, not below .* vocab size 265"):
        run_train(own_base, "--num-iterations", "1")


def test_moved_base_dir_reprep_is_complete_and_verifies_checksums(tmp_path, tiny_base_dir, tiny_shards_dir):
    from nanochat_unsloth.prep.job import PrepConfig, run_prep
    from conftest import TINY_SHARD_TOKENS

    moved = tmp_path / "moved"
    shutil.copytree(tiny_base_dir, moved, ignore=shutil.ignore_patterns("runs"))

    def prep():
        return run_prep(PrepConfig(source=str(moved / "base_data"), out_dir=moved / "shards",
                                   tokenizer_dir=moved / "tokenizer", workers=0, shard_tokens=TINY_SHARD_TOKENS,
                                   progress=False))
    assert prep().already_done
    flip_bytes(moved / "shards" / "train_000001.bin", HEADER_BYTES + 10, 100)
    with pytest.raises(UserError, match=r"train_000001.bin: sha256 does not match.*--force to delete"):
        prep()
