"""Nothing silently wrong, nothing lost (issue 15): verified data, early refusals, one writer per run,
resume anywhere, one-line errors. Each test reproduces one defect of the issue on the tiny fixtures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanochat_unsloth.cli import normalize_flags, run_main
from nanochat_unsloth.common import EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USER_ERROR, UserError
from nanochat_unsloth.shards.format import HEADER_BYTES, write_shard
from nanochat_unsloth.shards.manifest import ShardManifest
from nanochat_unsloth.checkpoint import store as ckpt
from nanochat_unsloth.train.config import parse_train_args
from nanochat_unsloth.train.loop import train

from conftest import write_parquet_files
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("integrity_base"))


@pytest.fixture
def own_base(tmp_path) -> Path:
    """A base dir this test may damage."""
    return make_train_base_dir(tmp_path / "own")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model gets built: the refusal must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was built before the refusal")
    from nanochat_unsloth.train import loop

    monkeypatch.setattr(loop, "build_model", refuse)


def run_train(base: Path, *extra: str) -> dict:
    return train(parse_train_args(normalize_flags(TINY_TRAIN_ARGS + ["--base-dir", str(base), *extra])))


def train_cli(base: Path, *extra: str) -> int:
    from nanochat_unsloth.train.__main__ import main

    return run_main(main, TINY_TRAIN_ARGS + ["--base-dir", str(base), *extra])


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def flip_bytes(path: Path, offset: int, n: int) -> None:
    """Same size, other bytes: what bit rot or a stray write does."""
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        raw[i] ^= 0x01
    path.write_bytes(bytes(raw))


def hold_lock_in_another_process(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from nanochat_unsloth.common import hold_lock; "
            "lock = hold_lock(sys.argv[1], 'x', 'y'); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# ---- 1. checksums are verified: shards at start-up, checkpoints on load --------------------------


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

    # 8. --resume auto falls back to the newest checkpoint that verifies, and says which one it skipped
    result = run_train(base, "--num-iterations", "4", "--model-tag", "rot", "--save-every", "1", "--resume", "auto")
    assert result["start_step"] == 1
    assert "--resume auto: skipping step_000002" in capsys.readouterr().out
    # none verifies: refused, never a silent start from step 0 over the damaged run
    for _, step_dir in ckpt.list_checkpoints(run_dir):
        flip_bytes(step_dir / "model.safetensors", 2000, 8)
    with pytest.raises(UserError, match="no checkpoint in .* verifies"):
        run_train(base, "--num-iterations", "4", "--model-tag", "rot", "--resume", "auto")


# ---- 2. a val split too small is refused at prep and at start-up, not at the final eval ----------


def test_prep_refuses_a_too_small_val_split(tmp_path, tiny_corpus_docs, tiny_tokenizer_dir, capsys):
    from nanochat_unsloth.prep.prep_cli import main as prep_main

    args = ["--tokenizer-dir", str(tiny_tokenizer_dir), "--workers", "0", "--quiet", "--shard-tokens", "5000"]
    data = tmp_path / "data"
    write_parquet_files(data, [tiny_corpus_docs["train"][:40], [""]])  # an empty val document: 1 token (BOS)
    code = run_main(prep_main, ["--source", str(data), "--out", str(tmp_path / "a"), *args])
    err = one_line_error(capsys, code)
    assert "val split holds 1 tokens" in err and "--val-files" in err and "deletes" in err
    assert not (tmp_path / "a" / "train_000000.bin").exists(), "refused before tokenizing train"
    code = run_main(prep_main, ["--source", str(data), "--out", str(tmp_path / "b"), "--max-val-tokens", "100", *args])
    assert "--max-val-tokens 100 is below --min-val-tokens" in one_line_error(capsys, code)


@pytest.mark.parametrize("extra, match", [
    (("--device-batch-size", "8", "--max-seq-len", "1024", "--total-batch-size", "8192"),
     "the val split is too short"),
    (("--max-seq-len", "4096", "--device-batch-size", "16", "--total-batch-size", str(16 * 4096)),
     "train split is too short"),
    (("--eval-tokens", "32"), "--eval_tokens 32 is less than one val batch"),
])
def test_data_too_small_for_the_flags_is_refused_before_the_model(base, no_model, extra, match):
    with pytest.raises(UserError, match=match):
        run_train(base, "--num-iterations", "1", "--model-tag", "small", *extra)


# ---- 3. a torn last line of metrics.jsonl no longer blocks --resume auto -------------------------


def test_torn_last_metrics_line_is_dropped_on_resume_and_exit_codes(base, capsys):
    # 7. (through the CLI) stopped early exits 3, not 0: `train && convert` must not go on; finished exits 0
    assert train_cli(base, "--num-iterations", "3", "--model-tag", "torn", "--stop-after", "2") == EXIT_STOPPED
    metrics = base / "runs" / "torn" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 2, "loss": 3.1')  # the disk filled up mid-append
    assert train_cli(base, "--num-iterations", "3", "--model-tag", "torn", "--resume", "auto") == 0
    assert "dropping its torn last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1, 2]


# ---- 4. one writer per run tag; workers stop with their launcher; one prep per --out -------------


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


def test_a_worker_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    """The loop calls stop_with_parent() in launched workers; SIGTERM then saves and exits (see the loop)."""
    marker = tmp_path / "worker"
    worker = ("import signal, sys, time; from pathlib import Path; "
              "from nanochat_unsloth.train.launcher import launched_by_launcher, stop_with_parent; "
              "m = Path(sys.argv[1]); "
              "signal.signal(signal.SIGTERM, lambda *a: (m.write_text('sigterm'), sys.exit(0))); "
              "assert launched_by_launcher() and stop_with_parent(); m.write_text('ready'); time.sleep(60)")
    launcher = ("import os, subprocess, sys, time; "
                "env = {**os.environ, 'LOCAL_RANK': '0'}; "  # what torchrun sets in its workers
                "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], env=env); "
                "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", launcher, worker, str(marker)])
    try:
        deadline = time.time() + 60
        while not (marker.exists() and marker.read_text() == "ready"):
            assert time.time() < deadline, "the worker never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # kill -9 the launcher: no chance to stop its workers itself
        proc.wait()
        while marker.read_text() != "sigterm":
            assert time.time() < deadline, "the orphaned worker was not told to stop"
            time.sleep(0.05)
    finally:
        proc.kill()


def test_a_worker_blocked_past_sigterm_exits_after_the_grace_period(tmp_path):
    """A worker stuck in a collective never runs its SIGTERM handler; the watchdog thread ends it anyway."""
    marker = tmp_path / "worker"
    # the handler only sets a flag (as the loop's does) and the main thread stays in a foreign call that
    # ignores it, as a worker blocked in a collective whose peers died would
    worker = ("import ctypes, signal, sys; from pathlib import Path; "
              "from nanochat_unsloth.train.launcher import exit_when_orphaned, stop_with_parent; "
              "m = Path(sys.argv[1]); signal.signal(signal.SIGTERM, lambda *a: m.write_text('sigterm')); "
              "stop_with_parent(); exit_when_orphaned(grace_s=1.0, poll_s=0.05); m.write_text('ready'); "
              "libc = ctypes.CDLL(None)\nwhile True: libc.sleep(100)")
    launcher = ("import subprocess, sys, time; "
                "w = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); print(w.pid, flush=True); "
                "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", launcher, worker, str(marker)], stdout=subprocess.PIPE, text=True)
    worker_pid = int(proc.stdout.readline())
    try:
        deadline = time.time() + 60
        while not (marker.exists() and marker.read_text() == "ready"):
            assert time.time() < deadline, "the worker never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
        while Path(f"/proc/{worker_pid}").exists() and "Z" not in Path(f"/proc/{worker_pid}/stat").read_text().split()[2]:
            assert time.time() < killed_at + 30, "the blocked worker outlived its launcher"
            time.sleep(0.05)
        assert marker.read_text() == "sigterm", "SIGTERM came first, and did not stop it"
        assert time.time() - killed_at >= 1.0, "it waited out the grace period for a graceful stop"
    finally:
        proc.kill()
        try:
            os.kill(worker_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- 5. resume onto another world size (the multi-process half is in test_multiprocess_loop.py) --


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


# ---- 6. one line instead of a traceback, and no silent acceptance -------------------------------


BAD_FLAGS = [
    ("--depth", "0"), ("--depth", "-1"), ("--max_seq_len", "0"), ("--max_seq_len", "-64"), ("--seed", "-1"),
    ("--eval_tokens", "-1"), ("--matrix_lr", "-0.02"), ("--embedding_lr", "nan"), ("--warmup_ratio", "5"),
    ("--device_batch_size", "0"), ("--save_every", "0"), ("--keep_last", "-3"), ("--profile_step", "-2"),
]


def test_out_of_range_flags_are_one_line_errors(base, capsys):
    for flag, value in BAD_FLAGS:
        code = train_cli(base, "--num-iterations", "1", flag, value)
        err = one_line_error(capsys, code)
        assert f"{flag} {value}" in err or f"{flag} {float(value)}" in err, err
    code = train_cli(base, "--num-iterations", "1", "--warmup_ratio", "0.6", "--warmdown_ratio", "0.6")
    assert "sum <= 1" in one_line_error(capsys, code)


def test_ctrl_c_during_start_up_is_one_line(base, capsys, monkeypatch):
    from nanochat_unsloth.train import loop

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "train", interrupted)
    assert train_cli(base, "--num-iterations", "1") == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert err == "interrupted"


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
        with pytest.raises(UserError, match=r"\.step_000002\.tmp: cannot write: .*earlier checkpoints are kept"):
            run_train(base, "--num-iterations", "2", "--model-tag", "full", "--resume", "auto")
        assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1]
        assert not (run_dir / ".step_000002.tmp").exists(), "the partial save is removed, giving the space back"


def test_full_disk_in_prep_is_one_line_naming_the_shard(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir, monkeypatch,
                                                       capsys):
    from nanochat_unsloth.prep.prep_cli import main as prep_main
    from nanochat_unsloth.shards import format as shard_format

    class FullDisk:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shard_format, "open", FullDisk, raising=False)
    out = tmp_path / "shards"
    code = run_main(prep_main, ["--source", str(tiny_corpus_dir), "--out", str(out), "--tokenizer-dir",
                                str(tiny_tokenizer_dir), "--workers", "0", "--quiet"])
    err = one_line_error(capsys, code)
    assert f"{out / 'val_000000.bin'}: cannot write: no space left on the disk" in err


def read_only(monkeypatch, directory: Path, patch_target, attr: str):
    """Make `directory` read-only: chmod, or (as root, where chmod does not stop writes) a patched call."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return
    real = getattr(patch_target, attr)

    def refuse(*a, **k):
        target = Path(k.get("dir") or (a[0] if a else ""))
        if str(target).startswith(str(directory)):
            raise OSError(errno.EROFS, "Read-only file system", str(target))
        return real(*a, **k)
    monkeypatch.setattr(patch_target, attr, refuse)


def test_read_only_base_dir_in_train_is_one_line_before_the_model(tmp_path, base, monkeypatch, no_model, capsys):
    import pathlib

    ro = base / "runs_ro_check"
    ro.mkdir()
    (base / "runs").mkdir(exist_ok=True)
    read_only(monkeypatch, base / "runs", pathlib.Path, "mkdir")
    try:
        code = train_cli(base, "--num-iterations", "1", "--model-tag", "ro")
        err = one_line_error(capsys, code)
        assert f"{base / 'runs' / 'ro'}: cannot write: not writable" in err
    finally:
        (base / "runs").chmod(0o755)


def test_read_only_target_in_convert_is_one_line(base, tmp_path, monkeypatch, capsys):
    import tempfile

    from nanochat_unsloth.convert.cli import main as convert_main

    run_train(base, "--num-iterations", "1", "--model-tag", "conv_ro", "--force")
    target = tmp_path / "nanochat"
    target.mkdir()
    read_only(monkeypatch, target, tempfile, "mkdtemp")  # convert stages its files in a temp dir
    try:
        code = run_main(convert_main, [str(base / "runs" / "conv_ro"), "--base-dir", str(target)])
        err = one_line_error(capsys, code)
        assert str(target) in err and "not writable" in err
    finally:
        target.chmod(0o755)


# ---- 9. a moved or copied base dir re-preps as complete ------------------------------------------


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


# ---- 10. FP8 delayed-scaling history and the loss EMA survive a resume ---------------------------


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
