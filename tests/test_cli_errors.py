"""Bad input and a failing disk are one line naming the flag or file, never a traceback: out-of-range flags,
Ctrl-C during start-up, a full disk in prep, a read-only base dir or convert target.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nanochat_unsloth.cli import run_main
from nanochat_unsloth.common import EXIT_INTERRUPTED

from train_fixtures import make_train_base_dir
from run_helpers import run_train, train_cli, one_line_error, read_only


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("integrity_base"))


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


def test_a_model_tag_that_is_a_path_is_refused_before_anything_is_written(base, capsys):
    """--model_tag names the run's directory under <base>/runs/: a path there (another run's step directory, whose
    pruning would delete this run with it, or a place outside runs/) is one line, and no directory is made."""
    before = sorted(p.name for p in (base / "runs").iterdir()) if (base / "runs").exists() else []
    for tag in ("d20/step_000100", "../elsewhere", "..", ".hidden", str(base / "abs")):
        code = train_cli(base, "--num-iterations", "1", "--model_tag", tag)
        assert f"--model_tag {tag!r}: must be a plain name" in one_line_error(capsys, code), tag
    after = sorted(p.name for p in (base / "runs").iterdir()) if (base / "runs").exists() else []
    assert after == before and not (base / "elsewhere").exists() and not (base / "abs").exists()


def test_ctrl_c_during_start_up_is_one_line(base, capsys, monkeypatch):
    from nanochat_unsloth.train import loop

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "train", interrupted)
    assert train_cli(base, "--num-iterations", "1") == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert err == "interrupted"


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


def test_convert_module_run_alone_refuses_the_import_in_one_line(tmp_path, capsys):
    """convert/ sits below train/, where the import from nanochat lives: its own `main`, without the import the
    top-level CLI hands it, checks the flags and then names the command that runs the import."""
    from nanochat_unsloth.convert.cli import main as convert_main

    code = run_main(convert_main, ["--from-nanochat", str(tmp_path / "nc"), "--out", str(tmp_path / "runs" / "x")])
    err = one_line_error(capsys, code)
    assert "run it as `nanochat-unsloth convert --from-nanochat DIR --out RUN_DIR`" in err, err
    assert not (tmp_path / "runs").exists()
