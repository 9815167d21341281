"""Checkpoints and resume, nothing silently wrong and nothing lost: a damaged checkpoint is refused, a torn
metrics line does not block a resume, a full disk keeps the earlier checkpoints, and a resume restores the
step's numerics exactly or refuses to change them without --force."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from nanochat_unsloth.cli import run_main
from nanochat_unsloth.common import EXIT_STOPPED, UserError
from nanochat_unsloth.checkpoint import store as ckpt

from run_helpers import flip_bytes, one_line_error, run_train, train_cli
from train_fixtures import make_train_base_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("integrity_base"))


# ---- checksums are verified when a checkpoint is loaded -------------------------------------------


def test_damaged_checkpoint_is_refused_by_eval_and_convert_and_skipped_by_resume_auto(base, capsys):
    from nanochat_unsloth.convert.cli import main as convert_main
    from nanochat_unsloth.eval.cli import main as eval_main

    run_train(base, "--num-iterations", "4", "--model-tag", "rot", "--save-every", "1", "--stop-after", "2")
    run_dir = base / "runs" / "rot"
    newest = run_dir / "step_000002"
    meta = json.loads((newest / "meta.json").read_text())
    assert set(meta["sha256"]) == set(meta["files"]) and "model.safetensors" in meta["sha256"]
    flip_bytes(newest / "model.safetensors", (newest / "model.safetensors").stat().st_size - 400, 64)
    capsys.readouterr()

    code = run_main(eval_main, [str(newest), "--split-tokens", "128", "--device", "cpu"])
    assert "model.safetensors: sha256 does not match" in one_line_error(capsys, code)
    code = run_main(convert_main, [str(newest), "--base-dir", str(base / "nanochat_out")])
    assert "model.safetensors: sha256 does not match" in one_line_error(capsys, code)
    assert not (base / "nanochat_out" / "base_checkpoints").exists()

    # --resume auto falls back to the newest checkpoint that verifies, and says which one it skipped
    result = run_train(base, "--num-iterations", "4", "--model-tag", "rot", "--save-every", "1", "--resume", "auto")
    assert result["start_step"] == 1
    assert "--resume auto: skipping step_000002" in capsys.readouterr().out
    # none verifies: refused, never a silent start from step 0 over the damaged run
    for _, step_dir in ckpt.list_checkpoints(run_dir):
        flip_bytes(step_dir / "model.safetensors", 2000, 8)
    with pytest.raises(UserError, match="no checkpoint in .* verifies"):
        run_train(base, "--num-iterations", "4", "--model-tag", "rot", "--resume", "auto")


# ---- a torn last line of metrics.jsonl does not block --resume auto -------------------------------


def test_torn_last_metrics_line_is_dropped_on_resume_and_exit_codes(base, capsys):
    # (through the CLI) stopped early exits 3, not 0: `train && convert` must not go on; finished exits 0
    assert train_cli(base, "--num-iterations", "3", "--model-tag", "torn", "--stop-after", "2") == EXIT_STOPPED
    metrics = base / "runs" / "torn" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 2, "loss": 3.1')  # the disk filled up mid-append
    assert train_cli(base, "--num-iterations", "3", "--model-tag", "torn", "--resume", "auto") == 0
    assert "dropping its torn last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1, 2]


# ---- resume onto another world size (the multi-process half is in test_multiprocess_loop.py) -----


def test_resume_checks_batch_settings_not_the_world_size():
    from nanochat_unsloth.train.config import TrainConfig
    from nanochat_unsloth.checkpoint.meta import RunMeta
    from nanochat_unsloth.checkpoint.resume import check_resume_compatible

    cfg = TrainConfig(device_batch_size=2)
    meta = RunMeta(train_config=cfg.to_dict(), world_size=8, grad_accum=1)
    check_resume_compatible(meta, cfg)  # 8 GPUs -> this run's count: the loader keeps each step's tokens
    with pytest.raises(UserError, match="device_batch_size=2 \\(now 1\\).*--force"):
        check_resume_compatible(meta, TrainConfig(device_batch_size=1))
    check_resume_compatible(meta, TrainConfig(device_batch_size=1, force=True))


def test_force_resumes_onto_another_device_batch_size_with_a_notice(base, capsys):
    run_train(base, "--num-iterations", "2", "--model-tag", "newb", "--stop-after", "1")
    with pytest.raises(UserError, match="device_batch_size"):
        run_train(base, "--num-iterations", "2", "--model-tag", "newb", "--resume", "auto", "--device-batch-size", "1")
    result = run_train(base, "--num-iterations", "2", "--model-tag", "newb", "--resume", "auto",
                       "--device-batch-size", "1", "--force")
    assert result["start_step"] == 1 and result["final_step"] == 2
    assert "device batch size 2 (now 1)" in capsys.readouterr().out


# ---- a full disk during a save is one line, not a traceback --------------------------------------


def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_earlier_ones(base, monkeypatch):
    from accelerate import Accelerator

    run_train(base, "--num-iterations", "2", "--model-tag", "full", "--stop-after", "1")
    real = Accelerator.save_state
    run_dir = base / "runs" / "full"
    torch_save_full = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4246")
    for failure in (OSError(errno.ENOSPC, "No space left on device"), torch_save_full):

        def save_state(self, output_dir=None, **kw):
            real(self, output_dir, **kw)
            raise failure
        monkeypatch.setattr(Accelerator, "save_state", save_state)
        with pytest.raises(UserError, match=r"step 2 was not saved: .*runs/full: cannot write: .*step_000001, is kept"):
            run_train(base, "--num-iterations", "2", "--model-tag", "full", "--resume", "auto")
        assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1]
        assert not (run_dir / ".step_000002.tmp").exists(), "the partial save is removed, giving the space back"


def test_a_save_the_disk_has_no_room_for_is_refused_before_anything_is_written(base, monkeypatch):
    # a disk with less room than the newest checkpoint takes is refused up front, on every rank alike, with
    # nothing written (rather than failing mid-way, after the space of a partial checkpoint is taken)
    import shutil
    from collections import namedtuple

    from accelerate import Accelerator

    run_train(base, "--num-iterations", "3", "--model-tag", "room", "--stop-after", "1")
    run_dir = base / "runs" / "room"
    need = sum(p.stat().st_size for p in (run_dir / "step_000001").rglob("*") if p.is_file())
    real_usage, usage = shutil.disk_usage, namedtuple("usage", "total used free")
    writes = []
    monkeypatch.setattr(Accelerator, "save_state", lambda self, *a, **kw: writes.append(a))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(*real_usage(path)[:2], need - 1))
    with pytest.raises(UserError, match=r"step 2 was not saved: .*runs/room: cannot write: no space left on the disk"
                                        r".*step_000001, is kept"):
        run_train(base, "--num-iterations", "3", "--model-tag", "room", "--resume", "auto", "--stop-after", "2")
    assert writes == [] and not list(run_dir.glob(".step_*"))
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1]
    # room for exactly one more checkpoint is enough
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(*real_usage(path)[:2], need))
    result = run_train(base, "--num-iterations", "3", "--model-tag", "room", "--resume", "auto")
    assert result["start_step"] == 1 and [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1, 3]


def test_a_killed_saves_leftover_of_another_step_is_removed_by_the_next_save(base):
    # a save cut short by kill -9 (a scheduler's kill after its SIGTERM grace, mid stop-save at an odd step)
    # leaves its temporary dir; the resumed run saves other steps, so only a sweep of every one gives it back
    run_train(base, "--num-iterations", "3", "--model-tag", "debris", "--stop-after", "1")
    run_dir = base / "runs" / "debris"
    leftover = run_dir / ".step_000007.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    result = run_train(base, "--num-iterations", "3", "--model-tag", "debris", "--resume", "auto", "--stop-after", "2")
    assert result["start_step"] == 1
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1, 2]
    assert not leftover.exists()


def test_a_failed_stop_save_exits_2_in_one_line_saying_what_is_kept_and_how_to_go_on(base, monkeypatch, capsys):
    from accelerate import Accelerator

    assert train_cli(base, "--num-iterations", "3", "--model-tag", "nospace", "--stop-after", "1") == EXIT_STOPPED
    run_dir = base / "runs" / "nospace"
    real = Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        real(self, output_dir, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    capsys.readouterr()
    # the stop's save fails: not exit 3 ("saved, continue"), so `train && convert` stops too
    code = train_cli(base, "--num-iterations", "3", "--model-tag", "nospace", "--resume", "auto", "--stop-after", "2")
    err = one_line_error(capsys, code)
    assert err.startswith(f"error: step 2 was not saved: {run_dir}"), err
    assert "no space left on the disk" in err and "--keep_last 2" in err, err
    assert "step_000001, is kept: continue from it with --resume auto" in err, err
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1] and not list(run_dir.glob(".step_*"))
    monkeypatch.undo()
    # once there is room, --resume auto picks the newest complete checkpoint and finishes the run
    assert train_cli(base, "--num-iterations", "3", "--model-tag", "nospace", "--resume", "auto") == 0
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1, 3]


# ---- FP8 delayed-scaling history and the loss EMA survive a resume ------------------------------


def test_fp8_scaling_state_and_loss_ema_resume_exactly(base, monkeypatch):
    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))  # torch._scaled_mm runs on the CPU
    # delayed scaling at the tiny batch too
    flags = ("--fp8", "--fp8-scaling", "delayed", "--num-iterations", "4", "--eval-tokens", "0")
    run_train(base, *flags, "--model-tag", "fp8_straight")
    # cut after step 3: delayed scaling is on from there (the zero-initialised lm_head and c_proj leave some
    # gradient amaxes at zero for the first steps), so the resumed step 3 must scale from the saved history
    run_train(base, *flags, "--model-tag", "fp8_cut", "--stop-after", "3")
    state = ckpt.load_meta(base / "runs" / "fp8_cut" / "step_000003").fp8_scaling[0]
    assert state[2::3] == [1.0] * (len(state) // 3), "every layer's delayed scaling is active at the cut"
    run_train(base, *flags, "--model-tag", "fp8_cut", "--resume", "auto")

    def records(tag):
        lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["smooth_loss"]) for r in map(json.loads, lines)]
    assert records("fp8_cut") == records("fp8_straight")

    # another FP8 scaling is another step's numerics: refused on --resume, unless --force
    run_train(base, *flags, "--model-tag", "fp8_mode", "--stop-after", "2")
    dynamic = [f if f != "delayed" else "dynamic" for f in flags]
    with pytest.raises(UserError, match=r"--fp8_scaling=delayed \(now dynamic\).*--force"):
        run_train(base, *dynamic, "--model-tag", "fp8_mode", "--resume", "auto")
    run_train(base, *dynamic, "--model-tag", "fp8_mode", "--resume", "auto", "--force")


def test_resume_guards_the_numerics_fields_and_reads_old_checkpoints():
    """fp8_scaling, loss_chunk_mb, compile and lean_checkpoint are guarded like the step math. A checkpoint
    written before they existed (no such keys, kernels "unsloth") counts as having their defaults."""
    from nanochat_unsloth.checkpoint.meta import RunMeta
    from nanochat_unsloth.checkpoint.resume import RESUME_GUARDED_FIELDS, check_resume_compatible
    from nanochat_unsloth.train.config import TrainConfig

    assert {"fp8_scaling", "loss_chunk_mb", "compile", "lean_checkpoint"} <= set(RESUME_GUARDED_FIELDS)
    old = TrainConfig().to_dict()
    for name in ("fp8_scaling", "loss_chunk_mb", "compile", "lean_checkpoint"):
        del old[name]
    old["kernels"] = "unsloth"
    meta = RunMeta(train_config=old)
    check_resume_compatible(meta, TrainConfig(kernels="fused"))  # the defaults: resumes
    for change in ({"fp8_scaling": "dynamic"}, {"loss_chunk_mb": 512.0}, {"compile": "none"},
                   {"lean_checkpoint": "torch"}):
        (name, value), = change.items()
        with pytest.raises(UserError, match=rf"--{name}=.* \(now {value}\).*--force"):
            check_resume_compatible(meta, TrainConfig(**change))
        check_resume_compatible(meta, TrainConfig(**change, force=True))
