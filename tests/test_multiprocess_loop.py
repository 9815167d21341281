"""The training loop on 2 real gloo processes (torchrun + Accelerate MULTI_CPU) equals 1 process, and a
2-process run resumes on 1 process bit-identically.

`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15, without an mpirun
hostfile), so tests launch through torchrun with ACCELERATE_USE_CPU=true and check the world size the
loop printed.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.checkpoint import store as ckpt

from cpu_launch import is_alive, launch_cpu_processes, signal_after_line, start_cpu_processes
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("mp_train_base"))


def _train(base: Path, nproc: int, tag: str, *extra: str):
    # --force: if a stalled launch is retried (cpu_launch), a fresh run whose first attempt already saved a
    # checkpoint starts over instead of being refused; a resume is unaffected
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "6", "--model-tag", tag, "--force", *extra]
    args[args.index("--total-batch-size") + 1] = "128"  # 2 x 32 tokens x 2 micro-batches per step
    out = launch_cpu_processes(nproc, "-m", "nanochat_unsloth.train", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    accum = 2 // nproc
    assert f"x {nproc} procs x {accum} accum" in out.stdout, out.stdout[-2000:]
    return out


def _metrics(base: Path, tag: str) -> list[dict]:
    lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _resume_from(base: Path, source: str, tag: str, step: int) -> None:
    """Start run `tag` as `source` stood at step `step`: that checkpoint and the metrics log (whose later records
    `--resume auto` sets aside, as after any crash past a save)."""
    run = base / "runs" / tag
    run.mkdir(parents=True)
    shutil.copytree(base / "runs" / source / ckpt.step_dir_name(step), run / ckpt.step_dir_name(step))
    shutil.copy(base / "runs" / source / "metrics.jsonl", run / "metrics.jsonl")


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_exactly(base):
    """A 2-process run equals a 1-process run step for step; its mid-run checkpoint resumes exactly on 2
    processes and on 1 (a node lost). The straight 2-process run saves at step 3 on its way (--save-every 3), and
    both resumes start from that checkpoint: a second 2-process launch only to write it would cost as much as the
    straight run. A 2-process run's stop is the SIGTERM test's below (and --stop-after's exit through the launcher,
    tests/test_deepspeed.py's ZeRO-3 run)."""
    # 7 val windows of 2 x 32 (+1): 2 processes score them as 4 + 3 and a padding batch, not 3 + 3
    _train(base, 1, "one", "--eval-tokens", "448")
    _train(base, 2, "two", "--save-every", "3", "--eval-tokens", "448")
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "two")] == [3, 6]
    _resume_from(base, "two", "two_resumed", 3)
    _train(base, 2, "two_resumed", "--resume", "auto")
    # a 2-process run continued on 1 process (a node lost): the step-3 checkpoint of the 2-process run
    _resume_from(base, "two", "moved", 3)
    out = _train(base, 1, "moved", "--resume", "auto")
    assert "2 process(es) x 1 accumulation -> 1 x 2: the same tokens in every step" in out.stdout, out.stdout[-2000:]

    one = [m["loss"] for m in _metrics(base, "one")]
    assert len(one) == 6
    # Bitwise, not approximately: 1 process x 2 micro-steps accumulates backward(loss / 2) twice, and
    # DDP averages 2 processes' backward(loss) as g0/2 + g1/2: the same sums (halving is exact). Muon's
    # bf16 Newton-Schulz amplifies any rounding difference, so "close" would hide little and prove less.
    assert [m["loss"] for m in _metrics(base, "two")] == one
    assert [m["loss"] for m in _metrics(base, "two_resumed")] == one
    assert [m["loss"] for m in _metrics(base, "moved")] == one
    # the same val tokens on 1 and 2 processes: per-token losses are bitwise equal (equal weights, equal rows),
    # only the fp32 sum of 448 of them is ordered differently, a relative error below 448 x 2^-24 (< 3e-5)
    val = {tag: [json.loads(x)["val_bpb"] for x in (base / "runs" / tag / "eval.jsonl").read_text().splitlines()]
           for tag in ("one", "two")}
    assert len(val["one"]) == len(val["two"]) == 1 and val["two"][0] == pytest.approx(val["one"][0], rel=3e-5)
    want = ckpt.load_model_state_dict(base / "runs" / "one" / ckpt.step_dir_name(6))
    for tag in ("two", "two_resumed", "moved"):
        got = ckpt.load_model_state_dict(base / "runs" / tag / ckpt.step_dir_name(6))
        for name in want:
            assert torch.equal(got[name], want[name]), (tag, name)


def _start_endless_run(base: Path, tag: str):
    """2 gloo ranks under torchrun, training until stopped."""
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "100000", "--model-tag", tag, "--force"]
    return start_cpu_processes(2, "-m", "nanochat_unsloth.train", *args)


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_within_60s_and_is_named(base):
    launcher = _start_endless_run(base, "killed")
    _, err, elapsed, _ = signal_after_line(launcher, "step 00001/", signal.SIGKILL, rank=1, timeout=90)
    # the launcher sees the dead worker, stops the survivor (blocked in a collective with it) and names
    # the failed rank; the survivor never trains on alone
    assert launcher.returncode != 0
    assert elapsed < 60, elapsed
    assert "rank      : 1 (local_rank: 1)" in err and "exitcode  : -9" in err, err[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_once_and_stops_every_rank(base):
    """SIGTERM to torchrun alone (a spot instance going away): it forwards the signal, every rank finishes its
    step, the checkpoint is written once and verifies, and no worker outlives the launcher."""
    launcher = _start_endless_run(base, "term")
    out, err, elapsed, workers = signal_after_line(launcher, "step 00002/", signal.SIGTERM, timeout=90)
    assert elapsed < 60, elapsed
    saved = ckpt.list_checkpoints(base / "runs" / "term")
    assert len(saved) == 1, (saved, out[-2000:], err[-3000:])
    assert f"stopped after step {saved[0][0]} of 100000" in out, out[-2000:]
    ckpt.load_meta(saved[0][1])  # every file's sha256 verifies
    time.sleep(2)
    assert not [pid for pid in workers if is_alive(pid)], "a worker outlived the launcher"
