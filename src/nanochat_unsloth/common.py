"""Small pieces every stage shares: the base dir, user-facing errors, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line and exits 2.

    The message must name the offending file/flag and say how to fix it.
    """


def get_base_dir(base_dir: str | os.PathLike | None = None) -> Path:
    """nanochat's convention: --base-dir, else $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    if base_dir:
        path = Path(base_dir)
    elif os.environ.get("NANOCHAT_BASE_DIR"):
        path = Path(os.environ["NANOCHAT_BASE_DIR"])
    else:
        path = Path.home() / ".cache" / "nanochat"
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only if the block succeeds.

    A crash leaves at most a `.tmp` file behind, never a half-written `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f"{suffix}.tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions a plain open() would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(final: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e}); it is corrupt, re-create it") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
