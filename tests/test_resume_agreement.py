"""--resume on several ranks: every rank verifies and chooses a checkpoint on its own reads, and the ranks must
agree. Here each of 2 gloo ranks (a real Accelerate MULTI_CPU state) is shown its own copy of a run, as ranks
whose reads differ would see it: one copy's newest checkpoint is damaged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from nanochat_unsloth.checkpoint import store as ckpt

from cpu_launch import exit_without_finalization, free_port, spawn_ranks
from run_helpers import flip_bytes, run_train
from train_fixtures import make_train_base_dir

WORLD_SIZE = 2


def _worker(rank, port, cases_file, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD_SIZE
    results = []
    for run_dirs, resume in json.loads(Path(cases_file).read_text()):
        try:
            path, meta = ckpt.find_resume_agreed(accelerator, Path(run_dirs[rank]), resume, log=lambda _: None)
            results.append(["ok", Path(path).name, meta.step])
        except ckpt.UserError as e:
            results.append(["refused", str(e)])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    exit_without_finalization()


@pytest.mark.slow
def test_ranks_that_would_resume_different_checkpoints_all_refuse_in_one_line(tmp_path):
    base = make_train_base_dir(tmp_path / "base")
    run_train(base, "--num-iterations", "4", "--model-tag", "good", "--save-every", "1", "--stop-after", "2")
    good = base / "runs" / "good"
    damaged = base / "runs" / "damaged"  # what a rank whose read of step 2 fails sees: step 2 skipped
    shutil.copytree(good, damaged)
    flip_bytes(damaged / "step_000002" / "model.safetensors", 2000, 8)
    assert [s for s, _ in ckpt.list_checkpoints(good)] == [1, 2]
    cases = [
        [[str(good), str(good)], "auto"],  # the same reads: the same checkpoint, no refusal
        [[str(good), str(damaged)], "auto"],  # rank 1 alone would fall back to step 1
        [[str(good), str(damaged)], str(damaged / "step_000002")],  # fails on both: rank 0's line
        [[str(good), str(damaged)], "step_000002"],  # fails on rank 1 only: refused on rank 0 as well
    ]
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    spawn_ranks(_worker, WORLD_SIZE, (free_port(), str(cases_file), str(tmp_path)), timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    same, apart, both_bad, one_bad = zip(*ranks)
    assert same == (["ok", "step_000002", 2],) * 2
    # every rank raises the same line, which names each rank's choice
    assert apart[0] == apart[1] and apart[0][0] == "refused", apart
    assert "the ranks chose different checkpoints" in apart[0][1]
    assert f"rank 0: step 2 at {(good / 'step_000002').resolve()}" in apart[0][1]
    assert f"rank 1: step 1 at {(damaged / 'step_000001').resolve()}" in apart[0][1]
    assert "\n" not in apart[0][1]
    assert both_bad[0] == both_bad[1] and "sha256 does not match" in both_bad[0][1] and "(rank" not in both_bad[0][1]
    assert one_bad[0] == one_bad[1] and one_bad[0][0] == "refused", one_bad
    assert one_bad[0][1].startswith("(rank 1) ") and "sha256 does not match" in one_bad[0][1]
