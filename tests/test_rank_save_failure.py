"""A checkpoint save that fails on one rank of a multi-process run stops every rank in seconds, each with the
one-line error (exit 2), instead of leaving the others blocked in the save's next collective until the
process group's timeout. The failure is real: that rank's file-size limit (tests/rank_write_limit.py) fails its
own writes, as a full disk, a quota or a node-local path does. 2 gloo ranks under torchrun, DDP."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nanochat_unsloth.checkpoint import store as ckpt
from nanochat_unsloth.common import EXIT_USER_ERROR

from cpu_launch import signal_after_line, start_cpu_processes
from run_helpers import run_train
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

RUN = ["--num-iterations", "6", "--eval-tokens", "0"]
EXIT_WITHIN_S = 60  # from the failing save's step to every rank's exit; a process group's timeout is minutes


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Base dir with run `seed` stopped at step 2 (one process), which each test resumes on 2 ranks."""
    base = make_train_base_dir(tmp_path_factory.mktemp("rank_save_base"))
    run_train(base, *RUN, "--model-tag", "seed", "--stop-after", "2")
    return base


def _resume_with_a_write_limit(base: Path, tag: str, rank: int, limit: int) -> tuple[subprocess.Popen, str, str,
                                                                                    float]:
    """Run `tag` (the seed's step 2 copied) on 2 ranks, rank `rank` limited to `limit` bytes per file, to a stop
    at step 3 whose save fails. -> (launcher, stdout, stderr, seconds from the last step's line to the exit)."""
    run_dir = base / "runs" / tag
    run_dir.mkdir(parents=True)
    shutil.copytree(base / "runs" / "seed" / "step_000002", run_dir / "step_000002")
    shutil.copy(base / "runs" / "seed" / "metrics.jsonl", run_dir / "metrics.jsonl")
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), *RUN, "--model-tag", tag, "--resume", "auto",
                              "--stop-after", "3"]
    launcher = start_cpu_processes(2, "tests/rank_write_limit.py", str(rank), str(limit), str(run_dir.parent), "--",
                                   *args)
    # the step whose end saves as step 3; a launcher still blocked after EXIT_WITHIN_S is killed, failing the test
    out, err, elapsed, _ = signal_after_line(launcher, "step 00002/", None, timeout=EXIT_WITHIN_S)
    return launcher, out, err, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_save_that_fails_on_one_rank_stops_every_rank_with_the_one_line_error(base, rank):
    # rank 1 writes only its RNG state (random_states_1.pkl, a few KiB); rank 0 the model, optimizers and meta
    seed_model = base / "runs" / "seed" / "step_000002" / ckpt.MODEL_FILE
    limit = 1024 if rank == 1 else seed_model.stat().st_size // 2
    tag = f"limited_{rank}"
    launcher, out, err, elapsed = _resume_with_a_write_limit(base, tag, rank, limit)
    run_dir = base / "runs" / tag
    codes = {r: (run_dir.parent / f"exit_{r}").read_text() if (run_dir.parent / f"exit_{r}").exists() else None
             for r in (0, 1)}
    assert codes == {0: str(EXIT_USER_ERROR), 1: str(EXIT_USER_ERROR)}, (codes, err[-3000:])
    assert elapsed < EXIT_WITHIN_S, elapsed
    # every rank says the same one line (rank 0's is the one a user reads); no rank's traceback
    errors = {line for line in err.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, err[-3000:]
    error = errors.pop()
    # (torch.save reports the failed write in its own words, safetensors with its errno: EFBIG)
    assert error.startswith(f"error: step 3 was not saved: {run_dir}: cannot write: "), error
    assert "the newest checkpoint, step_000002, is kept: continue from it with --resume auto" in error, error
    # (torchrun prints its own traceback of the failed job; a worker's is prefixed with its rank)
    assert not [line for line in err.splitlines() if line.startswith("[rank") and "Traceback" in line], err[-3000:]
    # the earlier checkpoint is whole and nothing of the failed save is left
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    ckpt.verify_checkpoint(run_dir / "step_000002")
    assert not list(run_dir.glob(".step_*")), list(run_dir.glob(".step_*"))
