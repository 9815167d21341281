"""One writer per run tag and per prep --out: a second one is refused with the holder's pid.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nanochat_unsloth.common import UserError

from train_fixtures import make_train_base_dir
from run_helpers import run_train, hold_lock_in_another_process


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("integrity_base"))


def test_a_second_run_of_the_same_tag_is_refused_with_the_holders_pid(base, no_model):
    run_dir = base / "runs" / "locked"
    run_dir.mkdir(parents=True)
    holder = hold_lock_in_another_process(run_dir / ".lock")
    try:
        with pytest.raises(UserError, match=rf"run tag 'locked' is in use by another process \(pid {holder.pid}\)"):
            run_train(base, "--num-iterations", "1", "--model-tag", "locked")
    finally:
        holder.kill()
        holder.wait()


def test_a_second_prep_into_the_same_out_is_refused_with_the_holders_pid(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir):
    from nanochat_unsloth.prep.job import LOCK_NAME, PrepConfig, run_prep

    out = tmp_path / "shards"
    out.mkdir()
    holder = hold_lock_in_another_process(out / LOCK_NAME)
    try:
        with pytest.raises(UserError, match=rf"--out {out} is in use by another process \(pid {holder.pid}\)"):
            run_prep(PrepConfig(source=str(tiny_corpus_dir), out_dir=out, tokenizer_dir=tiny_tokenizer_dir, workers=0,
                                progress=False))
    finally:
        holder.kill()
        holder.wait()
