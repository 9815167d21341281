"""Helpers for tests that run the train, prep and convert entry points on the tiny fixtures and check how
they refuse: a run from flags, its exit code, the one-line error, damaged bytes, a held lock, a read-only
directory.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

from nanochat_unsloth.cli import normalize_flags, run_main
from nanochat_unsloth.common import EXIT_USER_ERROR
from nanochat_unsloth.train.config import parse_train_args
from nanochat_unsloth.train.loop import train

from train_fixtures import TINY_TRAIN_ARGS


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
