"""Trackers: nanochat's --run semantics, one-line refusals before the model is built, and the step metrics
really landing in tensorboard's event files, a wandb offline run and trackio's database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat_unsloth.common import UserError, run_main
from nanochat_unsloth.train import __main__ as train_main
from nanochat_unsloth.train.trackers import LOGS_DIR, PROJECT, resolve_trackers

from core_bundle import write_tiny_bundle
from tracker_files import tensorboard_scalars, trackio_metrics, wandb_history
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = make_train_base_dir(tmp_path_factory.mktemp("tracker_base"))
    write_tiny_bundle(base)
    return base


def test_tracker_choice_follows_nanochat_run_semantics():
    assert resolve_trackers("dummy", "") == []  # nanochat: 'dummy' logs nothing
    assert resolve_trackers("d20", "") == ["wandb"]  # nanochat: a named run goes to wandb
    assert resolve_trackers("d20", "tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert resolve_trackers("d20", "none") == []
    assert resolve_trackers("d20", "all") == ["wandb", "tensorboard", "trackio"]  # the test extra installs all three
    with pytest.raises(UserError, match="did you mean wandb"):
        resolve_trackers("d20", "wandbb")
    with pytest.raises(UserError, match="--run dummy"):
        resolve_trackers("dummy", "tensorboard")  # would log nothing, silently


@pytest.mark.parametrize("hidden, flags, package", [
    ("wandb", ["--run=d20"], "pip install wandb"),  # the README's command without wandb
    ("tensorboard", ["--run", "x", "--tracker", "tensorboard"], "pip install tensorboard"),
])
def test_an_uninstalled_tracker_is_refused_in_one_line_before_the_model_is_built(base, monkeypatch, capsys, hidden,
                                                                                  flags, package):
    monkeypatch.setitem(sys.modules, hidden, None)  # what importlib sees when the package is not installed
    code = run_main(train_main.main, TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "2",
                                                        "--model-tag", f"no_{hidden}", *flags])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and package in err and "[trackers]" in err, err
    assert "model:" not in out, "refused before the model is built"
    assert not (base / "runs" / f"no_{hidden}").exists() or not list((base / "runs" / f"no_{hidden}").iterdir())


def test_an_unknown_tracker_names_the_closest(base, capsys):
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--run", "x", "--tracker", "tensorbord"]
    code = run_main(train_main.main, args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean tensorboard" in err, err


@pytest.mark.slow
def test_step_metrics_land_in_tensorboard_wandb_offline_and_trackio(base):
    """One real run (its own process: wandb and trackio keep process-wide state) with the three trackers and
    the CORE metric on; every step's metrics must be in each tracker's own files, under the run."""
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "4", "--eval-every", "2",
                              "--core-metric-every", "2", "--core-metric-max-per-task", "4", "--model-tag", "tracked",
                              "--run", "smoke", "--tracker", "tensorboard,wandb,trackio"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")  # no account, no network: wandb's offline run files
    proc = subprocess.run([sys.executable, "-m", "nanochat_unsloth.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = base / "runs" / "tracked"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    bpb = {e["step"]: e["val_bpb"] for e in evals if "val_bpb" in e}
    core = {e["step"]: e["core_metric"] for e in evals if "core_metric" in e}
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and sorted(bpb) == [0, 2, 4] and sorted(core) == [2, 4]

    # tensorboard stores float32: the logged doubles rounded to float32 must come back exactly
    tb = tensorboard_scalars(run / LOGS_DIR / PROJECT)
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert tb["train/loss"] == [(m["step"], f32(m["smooth_loss"])) for m in metrics]
    assert tb["train/lrm"] == [(m["step"], f32(m["lrm"])) for m in metrics]
    assert tb["val/bpb"] == [(s, f32(v)) for s, v in sorted(bpb.items())]
    assert tb["core_metric"] == [(s, f32(v)) for s, v in sorted(core.items())]

    # wandb keeps the doubles as JSON
    wb = wandb_history(run / LOGS_DIR / "wandb")
    assert [wb[m["step"]]["train/loss"] for m in metrics] == [m["smooth_loss"] for m in metrics]
    assert {s: wb[s]["val/bpb"] for s in bpb} == bpb
    assert {s: wb[s]["core_metric"] for s in core} == core
    assert "centered_results/tiny_mc" in wb[4]

    tr = trackio_metrics(run / LOGS_DIR / "trackio" / f"{PROJECT}.db", "smoke")
    assert [tr[m["step"]]["train/loss"] for m in metrics] == [m["smooth_loss"] for m in metrics]
    assert {s: tr[s]["core_metric"] for s in core} == core


def test_tensorboard_holds_each_step_once_after_a_rollback_and_a_resume(base):
    """A resume from an older checkpoint (a rollback, or --resume auto after a crash that logged steps past its
    last save) logs those steps again: tensorboard must show the branch the run is on, each step once, as
    metrics.jsonl does, not the abandoned values beside the new ones."""
    from run_helpers import run_train

    run_dir = base / "runs" / "tb_branch"
    flags = ("--num-iterations", "6", "--model-tag", "tb_branch", "--run", "tb", "--tracker", "tensorboard",
             "--save-every", "2", "--keep-last", "0")
    run_train(base, *flags, "--stop-after", "4")  # logs steps 0-3, saves 2 and 4
    run_train(base, *flags, "--resume", str(run_dir / "step_000002"), "--stop-after", "4")  # 2 and 3 again
    run_train(base, *flags, "--resume", "auto")  # 4 and 5
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    tb = tensorboard_scalars(run_dir / LOGS_DIR / PROJECT)
    # float32, as tensorboard stores them: the logged doubles rounded must come back exactly
    assert tb["train/raw_loss"] == [(m["step"], float(np.float32(m["loss"]))) for m in metrics]


@pytest.mark.slow
def test_two_processes_log_each_step_once_from_the_main_process(base):
    """Only the main process starts trackers (start_trackers) and Accelerate's log is the main process's
    alone: a 2-rank run leaves one event file with each step once."""
    from cpu_launch import launch_cpu_processes

    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "3", "--model-tag", "tb_two_ranks",
                              "--run", "tb", "--tracker", "tensorboard"]
    # "--": torchrun would take --run for its own --run-path (nanochat's README passes it the same way)
    out = launch_cpu_processes(2, "-m", "nanochat_unsloth.train", "--", *args)
    assert out.returncode == 0 and "x 2 procs" in out.stdout, out.stderr[-3000:]
    logdir = base / "runs" / "tb_two_ranks" / LOGS_DIR / PROJECT
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in tensorboard_scalars(logdir)["train/loss"]] == [0, 1, 2]


def test_train_loss_is_nanochats_debiased_smooth_loss(base):
    """nanochat's base_train logs the debiased EMA of the loss as "train/loss" (its step line's "loss:"), so a
    dashboard built on it must get that curve here too; the raw step loss goes beside it as train/raw_loss."""
    from run_helpers import run_train

    run_train(base, "--num-iterations", "3", "--model-tag", "tb_loss", "--run", "tb", "--tracker", "tensorboard")
    run_dir = base / "runs" / "tb_loss"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tb = tensorboard_scalars(run_dir / LOGS_DIR / PROJECT)
    f32 = lambda x: float(np.float32(x))  # noqa: E731  tensorboard stores float32
    assert tb["train/loss"] == [(m["step"], f32(m["smooth_loss"])) for m in metrics]
    assert tb["train/raw_loss"] == [(m["step"], f32(m["loss"])) for m in metrics]
    assert metrics[1]["smooth_loss"] != metrics[1]["loss"], "the two curves must differ for this test to tell them apart"
    # and beside every record (train, val), nanochat's progress keys: the step as a value, the FLOPs of the steps
    # before it (FLOPs per token x tokens per step x step) and the training time
    assert all(v == s for s, v in tb["step"]) and {m["step"] for m in metrics} <= {s for s, _ in tb["step"]}
    per_step = max(v / s for s, v in tb["total_training_flops"] if s)
    assert per_step > 0 and all(v == f32(per_step * s) for s, v in tb["total_training_flops"])
    assert len(tb["total_training_time"]) == len(tb["step"])
