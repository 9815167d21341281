"""Never lose a good checkpoint: diverged weights, rollbacks, a horizon behind the step, other shards, failed
writes, double signals. Each test reproduces one way a run was lost (2026-12-05), on the tiny fixtures."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.cli import run_main
from nanochat_unsloth.common import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_STOPPED, UserError, sha256_file
from nanochat_unsloth.shards.manifest import ShardManifest
from nanochat_unsloth.checkpoint import store as ckpt
from nanochat_unsloth.checkpoint.meta import RunMeta

from run_helpers import one_line_error, run_train, train_cli
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("safety_base"))


def steps_of(run_dir: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(run_dir)]


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def all_finite(step_dir: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(step_dir / ckpt.MODEL_FILE).values())


def poison(step_dir: Path) -> None:
    """A NaN in the weights, with meta.json's sizes and sha256 to match: what a diverged run saved before."""
    from safetensors.torch import load_file, save_file

    path = step_dir / ckpt.MODEL_FILE
    state = load_file(path)
    state[sorted(state)[0]].view(-1)[0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    meta = json.loads((step_dir / ckpt.META_NAME).read_text())
    meta["files"][ckpt.MODEL_FILE], meta["sha256"][ckpt.MODEL_FILE] = path.stat().st_size, sha256_file(path)
    (step_dir / ckpt.META_NAME).write_text(json.dumps(meta))


# ---- 1. a non-finite step is never applied, never saved, never prunes a good checkpoint ----------


def test_a_non_finite_gradient_stops_before_the_update_and_the_good_checkpoints_stay(base, capsys):
    run_dir = base / "runs" / "diverge"
    run_train(base, "--num-iterations", "8", "--model-tag", "diverge", "--save-every", "2", "--stop-after", "4")
    # AdamW steps of 1e37 blow the embedding up to ~1e37; the next gradient through it is NaN while its loss
    # is still finite (2026-12-05: `grad norm: nan` beside a raw loss of 6.02)
    code = train_cli(base, "--num-iterations", "8", "--model-tag", "diverge", "--resume", "auto", "--force",
                     "--embedding-lr", "1e37", "--save-every", "1", "--keep-last", "2")
    out = capsys.readouterr().out
    assert code == EXIT_DIVERGED, out[-2000:]
    saved = ckpt.list_checkpoints(run_dir)
    assert 4 in [s for s, _ in saved], "the last checkpoint of the good LRs is kept"
    for step, step_dir in saved:
        assert all_finite(step_dir), f"step {step} holds NaN or inf"
    newest = saved[-1][1]
    assert f"the update was not applied. Stopping: the last good checkpoint, {newest}, is kept" in out, out[-2000:]
    assert ckpt.find_resume(run_dir, "auto", log=lambda _: None)[0] == newest


def test_non_finite_weights_are_never_saved_nor_prune(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(accelerator, run_dir, 1, RunMeta(), keep_last=1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ckpt.NonFiniteWeights, match=r"step 2: the weights hold NaN or inf \(weight\); not saved"):
        ckpt.save_checkpoint(accelerator, run_dir, 2, RunMeta(), keep_last=1)
    assert steps_of(run_dir) == [1], "nothing written, nothing pruned"
    assert not (run_dir / ".step_000002.tmp").exists()


def test_every_file_of_a_new_checkpoint_is_on_disk_before_the_older_one_is_pruned(tmp_path, monkeypatch):
    """A machine that dies after a save (a preempted VM, a power cut) keeps what was fsynced: the older
    checkpoint's removal must not reach the disk before the new one's files (each rank's shards, in a
    sub-directory as DCP and DeepSpeed write them), its directories and its rename do."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(accelerator, run_dir, 1, RunMeta(), keep_last=1)
    synced, at_prune = [], []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree
    final = run_dir / ckpt.step_dir_name(2)

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path, final.exists()))
        real_fsync(fd)

    def rmtree(path, *a, **k):
        if Path(path).name == ckpt.step_dir_name(1):
            at_prune.append(list(synced))
        real_rmtree(path, *a, **k)

    def write_state(out: Path):
        (out / "dcp").mkdir()
        for rank in range(2):
            (out / "dcp" / f"__{rank}_0.distcp").write_bytes(os.urandom(256))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ckpt.save_checkpoint(accelerator, run_dir, 2, RunMeta(), keep_last=1, models=[model], write_state=write_state)
    assert steps_of(run_dir) == [2] and len(at_prune) == 1
    tmp = run_dir / f".{final.name}.tmp"
    before = {p.relative_to(tmp).as_posix() for p, _ in at_prune[0] if p.is_relative_to(tmp)}
    want = {p.relative_to(final).as_posix() for p in final.rglob("*")} | {"."}
    assert want <= before, sorted(want - before)
    assert any(p == run_dir and renamed for p, renamed in at_prune[0]), "the rename is not on disk before the prune"


def test_eval_convert_and_resume_refuse_non_finite_weights(base, tmp_path, capsys):
    from nanochat_unsloth.cli import convert as convert_main
    from nanochat_unsloth.eval.cli import main as eval_main

    run_train(base, "--num-iterations", "4", "--model-tag", "nanw", "--save-every", "1", "--stop-after", "2")
    run_dir = base / "runs" / "nanw"
    code = run_main(convert_main, [str(run_dir / "step_000001"), "--base-dir", str(tmp_path / "nc")])
    assert code == 0, capsys.readouterr().err
    poison(run_dir / "step_000002")
    nanochat_model = next((tmp_path / "nc" / "base_checkpoints").rglob("model_000001.pt"))
    state = torch.load(nanochat_model)
    next(iter(state.values())).view(-1)[0] = float("inf")
    torch.save(state, nanochat_model)
    capsys.readouterr()

    for cli, argv in ((eval_main, [str(run_dir), "--split-tokens", "128", "--device", "cpu"]),
                      (convert_main, [str(run_dir), "--base-dir", str(tmp_path / "nc2")]),
                      (eval_main, [str(nanochat_model), "--split-tokens", "128", "--device", "cpu",
                                   "--base-dir", str(base)]),
                      (convert_main, ["--from-nanochat", str(nanochat_model.parent), "--out", str(tmp_path / "imp")])):
        err = one_line_error(capsys, run_main(cli, argv))
        assert "the weights hold NaN or inf" in err, err
    assert not (tmp_path / "nc2").exists() and not (tmp_path / "imp").exists()
    # --resume auto passes over it to the newest finite checkpoint, saying so; named, it is refused
    assert run_train(base, "--num-iterations", "4", "--model-tag", "nanw", "--resume", "auto",
                     "--stop-after", "2")["start_step"] == 1
    assert "--resume auto: skipping step_000002" in capsys.readouterr().out
    poison(run_dir / "step_000002")
    with pytest.raises(UserError, match="the weights hold NaN or inf"):
        run_train(base, "--num-iterations", "4", "--model-tag", "nanw", "--resume", str(run_dir / "step_000002"))


# ---- 2. a horizon at or behind the checkpoint's step ----------------------------------------------


def test_a_horizon_at_or_behind_the_checkpoint_is_refused_and_a_finished_run_is_left_alone(base, capsys):
    run_train(base, "--num-iterations", "8", "--model-tag", "horizon", "--stop-after", "6")
    capsys.readouterr()
    for horizon in ("4", "6"):  # behind: negative LR multipliers; at: a "finished" run without its warm-down
        # (--stop-after bounds the run where the refusal is missing: a horizon behind never ends)
        code = train_cli(base, "--num-iterations", horizon, "--model-tag", "horizon", "--resume", "auto", "--force",
                         "--stop-after", "9")
        err = one_line_error(capsys, code)
        assert f"step_000006 is at step 6, and --num_iterations {horizon} gives a horizon of {horizon} steps" in err
    code = train_cli(base, "--num-iterations", "8", "--model-tag", "horizon", "--resume", "auto", "--stop-after", "5")
    assert "--stop_after 5 is not after the checkpoint's step 6" in one_line_error(capsys, code)
    assert steps_of(base / "runs" / "horizon") == [6]
    # the run finished at its own horizon: resuming it again trains nothing, refuses nothing
    assert train_cli(base, "--num-iterations", "8", "--model-tag", "horizon", "--resume", "auto") == 0
    assert train_cli(base, "--num-iterations", "8", "--model-tag", "horizon", "--resume", "auto") == 0
    assert "the run is already complete (step 8 of 8); nothing to do" in capsys.readouterr().out
    assert steps_of(base / "runs" / "horizon") == [6, 8]
    assert logged_steps(base / "runs" / "horizon" / "metrics.jsonl") == list(range(8))


# ---- 3. a resume from an older step starts a new branch --------------------------------------------


def test_a_rollback_moves_the_abandoned_branch_aside_and_prunes_only_its_own(base, capsys):
    run_dir = base / "runs" / "rollback"
    run_train(base, "--num-iterations", "12", "--model-tag", "rollback", "--save-every", "2", "--stop-after", "8",
              "--keep-last", "0")
    assert steps_of(run_dir) == [2, 4, 6, 8]
    capsys.readouterr()
    run_train(base, "--num-iterations", "12", "--model-tag", "rollback", "--save-every", "2", "--keep-last", "2",
              "--force", "--resume", str(run_dir / "step_000004"), "--stop-after", "5")
    out = capsys.readouterr().out
    assert steps_of(run_dir) == [4, 5], "the abandoned 6 and 8 no longer count, so 2 goes and 4 stays"
    (aside,) = (run_dir / ckpt.ABANDONED_DIR).iterdir()
    assert ("continuing from step 4: moved what an abandoned branch left after it (step_000006, step_000008, "
            "4 metrics.jsonl record(s))") in out
    assert str(aside) in out
    assert steps_of(aside) == [6, 8] and logged_steps(aside / "metrics.jsonl") == [4, 5, 6, 7]
    assert logged_steps(run_dir / "metrics.jsonl") == [0, 1, 2, 3, 4]
    # --resume auto follows the branch it is on
    assert run_train(base, "--num-iterations", "12", "--model-tag", "rollback", "--resume", "auto",
                     "--stop-after", "7")["start_step"] == 5
    assert logged_steps(run_dir / "metrics.jsonl") == list(range(7))


def test_a_stop_during_the_last_step_saves_the_final_checkpoint_and_its_resume_says_how_to_score_it(base, capsys,
                                                                                                  monkeypatch):
    """SIGTERM during the last step: the final checkpoint is saved and the evaluation after it skipped (the
    weights first, within a scheduler's grace period). `--resume auto` then finds the run complete and does
    nothing, and says that its final val bpb never ran and which command scores it."""
    from nanochat_unsloth.train import loop

    step_fn = loop.optimizer_step

    def signalled_in_the_last_step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        if args[6] == 3:  # the step index of a 4-step run's last update
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "optimizer_step", signalled_in_the_last_step)
    flags = ("--num-iterations", "4", "--model-tag", "last_step")
    assert train_cli(base, *flags) == EXIT_STOPPED
    monkeypatch.undo()
    run_dir = base / "runs" / "last_step"
    assert steps_of(run_dir) == [4] and not (run_dir / "eval.jsonl").exists()
    capsys.readouterr()
    assert train_cli(base, *flags, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "the run is already complete (step 4 of 4)" in out
    assert f"its final val evaluation never ran (stopped during its last step); score it with `nanochat-unsloth eval " \
           f"{run_dir} --step 4`" in out
    # a run that evaluated its end says nothing more
    assert train_cli(base, "--num-iterations", "2", "--model-tag", "evaluated") == 0
    capsys.readouterr()
    assert train_cli(base, "--num-iterations", "2", "--model-tag", "evaluated", "--resume", "auto") == 0
    assert "never ran" not in capsys.readouterr().out


def test_a_resume_with_a_lower_keep_last_is_refused_before_it_prunes_what_the_run_kept(base, capsys):
    """A run kept every checkpoint (--keep_last 0); its stop says "continue with --resume auto", and that
    command without --keep_last 0 (default 2) pruned all but two of them at its first save. A lower
    --keep_last on a resume of the tag's own run is refused unless --force; a resume into another tag prunes
    only that tag's checkpoints, so it is not."""
    run_dir = base / "runs" / "keep_all"
    flags = ("--num-iterations", "8", "--model-tag", "keep_all", "--save-every", "1")
    run_train(base, *flags, "--keep-last", "0", "--stop-after", "3")
    assert steps_of(run_dir) == [1, 2, 3]
    assert "continue with --resume auto --keep_last 0 " in capsys.readouterr().out  # the command that is not refused
    code = train_cli(base, *flags, "--resume", "auto", "--stop-after", "4")
    err = one_line_error(capsys, code)
    assert ("the run was started with --keep_last 0 (keep every checkpoint), and --keep_last 2 would delete "
            "the checkpoints it kept") in err and "pass --keep_last 0" in err and "--force" in err, err
    assert steps_of(run_dir) == [1, 2, 3], "nothing pruned"
    run_train(base, *flags, "--resume", "auto", "--keep-last", "0", "--stop-after", "4")
    assert steps_of(run_dir) == [1, 2, 3, 4]
    run_train(base, "--num-iterations", "8", "--model-tag", "keep_fork", "--resume", str(run_dir / "step_000004"),
              "--stop-after", "5")
    assert steps_of(run_dir) == [1, 2, 3, 4] and steps_of(base / "runs" / "keep_fork") == [5]
    run_train(base, *flags, "--resume", "auto", "--force", "--stop-after", "5")
    assert steps_of(run_dir) == [4, 5], "--force prunes to the lower --keep_last"


# ---- 4. the shards a checkpoint trained on ----------------------------------------------------------


def test_a_resume_onto_other_shards_is_refused_unless_forced(base, tmp_path, capsys):
    run_train(base, "--num-iterations", "8", "--model-tag", "shards", "--stop-after", "2")
    # other text, the same tokenizer, the same token counts: only the shards' contents differ
    other = make_train_base_dir(tmp_path / "other", seed=1) / "shards"
    assert ShardManifest.load(other).tokenizer == ShardManifest.load(base / "shards").tokenizer
    capsys.readouterr()
    code = train_cli(base, "--num-iterations", "8", "--model-tag", "shards", "--resume", "auto", "--shards", str(other))
    err = one_line_error(capsys, code)
    assert f"step_000002 was trained on other shards than those in {other}" in err and "--force" in err
    code = train_cli(base, "--num-iterations", "8", "--model-tag", "shards", "--resume", "auto", "--shards", str(other),
                     "--force", "--stop-after", "3")
    assert code == EXIT_STOPPED
    assert f"--force: continuing {base / 'runs' / 'shards' / 'step_000002'} on other shards" in capsys.readouterr().out
    # each checkpoint records the shards it trained on
    meta = ckpt.load_meta(base / "runs" / "shards" / "step_000002")
    assert meta.shards_sha256 == ShardManifest.load(base / "shards").fingerprint()
    meta = ckpt.load_meta(base / "runs" / "shards" / "step_000003")
    assert meta.shards_sha256 == ShardManifest.load(other).fingerprint()


# ---- 5. a failed write is one line, exit 2, and leaves no partial directory -------------------------


def test_a_file_size_limit_during_the_save_is_one_line_and_removes_the_partial_dir(base, capsys):
    run_dir = base / "runs" / "efbig"
    run_train(base, "--num-iterations", "8", "--model-tag", "efbig", "--stop-after", "2")
    model_bytes = (run_dir / "step_000002" / ckpt.MODEL_FILE).stat().st_size
    capsys.readouterr()
    # a limit below the model file: safetensors' write fails with EFBIG (Python ignores SIGXFSZ) and raises
    # its own SafetensorError, neither OSError nor RuntimeError
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (model_bytes // 2, hard))
    try:
        code = train_cli(base, "--num-iterations", "8", "--model-tag", "efbig", "--resume", "auto", "--stop-after", "3")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = one_line_error(capsys, code)
    assert f"step 3 was not saved: {run_dir}: cannot write: a file grew past a file-size limit" in err
    assert "the newest checkpoint, step_000002, is kept: continue from it with --resume auto" in err
    assert steps_of(run_dir) == [2]
    assert not (run_dir / ".step_000003.tmp").exists(), "the partial save is removed, giving the space back"


# ---- 6. signals: a second one does not abandon the save; one during start-up is 130 -----------------


def _start(args: list[str], stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nanochat_unsloth.train", *TINY_TRAIN_ARGS, *args], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """The lines read up to and including the first that contains `text`."""
    deadline, lines = time.time() + timeout, []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.time() < deadline, f"no line with {text!r}"
    raise AssertionError(f"the process ended before a line with {text!r}: {''.join(lines)[-2000:]}")


def test_a_second_signal_does_not_abandon_the_graceful_stop(base):
    # 16 micro-batches a step: each signal below lands while the process is still finishing its step or saving
    proc = _start(["--base-dir", str(base), "--num-iterations", "100000", "--model-tag", "twice",
                   "--total-batch-size", "1024"], stderr=subprocess.STDOUT)
    try:
        _wait_for_line(proc, "step 00001/")
        # the worker's own SIGTERM, the launcher's forwarded one (scancel, systemd), then a Ctrl-C
        proc.send_signal(signal.SIGTERM)
        _wait_for_line(proc, "[signal 15] finishing this step")
        proc.send_signal(signal.SIGTERM)
        _wait_for_line(proc, "[signal 15] already stopping")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, out[-2000:]
    saved = ckpt.list_checkpoints(base / "runs" / "twice")
    assert saved and f"saved {saved[-1][1]}" in out, out[-2000:]
    assert all_finite(saved[-1][1]) and (saved[-1][1] / ckpt.META_NAME).exists()


def test_sigterm_during_start_up_exits_130_with_one_line(base, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(base / "tokenizer", own / "tokenizer")
    (own / "shards").mkdir()
    os.mkfifo(own / "shards" / "manifest.json")  # start-up blocks reading it until the test lets it go
    proc = _start(["--base-dir", str(own), "--num-iterations", "2"])
    try:
        _wait_for_line(proc, "cpu bf16 GEMMs")  # printed just before the shards' manifest is read
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert err.strip() == "interrupted", err[-2000:]


def test_a_resume_from_another_runs_checkpoint_sets_this_tags_run_aside_not_prunes_it(base, capsys):
    """`--resume <another tag's step dir>` starts this tag over from there: the tag's own checkpoints and
    records are another run's, so they need --force and move to previous_N/, instead of being pruned by the
    new run's saves and their records mixed into its metrics."""
    src, dst = base / "runs" / "fork_src", base / "runs" / "fork_dst"
    run_train(base, "--num-iterations", "6", "--model-tag", "fork_src", "--save-every", "2", "--stop-after", "4")
    run_train(base, "--num-iterations", "6", "--model-tag", "fork_dst", "--stop-after", "1")
    assert steps_of(dst) == [1] and logged_steps(dst / "metrics.jsonl") == [0]
    fork = ["--num-iterations", "6", "--model-tag", "fork_dst", "--keep-last", "1", "--resume", str(src / "step_000004")]
    with pytest.raises(UserError, match="already holds checkpoints.*--force"):
        run_train(base, *fork)
    assert steps_of(dst) == [1]
    run_train(base, *fork, "--force")
    assert steps_of(dst / "previous_0") == [1], "the tag's own run is kept, aside"
    assert logged_steps(dst / "previous_0" / "metrics.jsonl") == [0]
    assert steps_of(dst) == [6] and logged_steps(dst / "metrics.jsonl") == [4, 5]


def test_a_stop_whose_console_is_gone_still_saves(base):
    """`python -m nanochat_unsloth.train ... | tee log` and Ctrl-C: the terminal's SIGINT ends tee too, so the lines
    the graceful stop prints go to a pipe nobody reads. The save must not die of the broken pipe."""
    proc = _start(["--base-dir", str(base), "--num-iterations", "100000", "--model-tag", "no_console",
                   "--total-batch-size", "1024"])
    try:
        _wait_for_line(proc, "step 00001/")
        proc.stdout.close()  # tee is gone
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    saved = ckpt.list_checkpoints(base / "runs" / "no_console")
    assert saved and all_finite(saved[-1][1]), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
