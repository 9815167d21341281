"""Small pieces every stage shares: the base dir, user-facing errors, atomic writes, one-time notices, a stop on
SIGINT/SIGTERM that never lands inside an import or a set of moves."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line and exits 2.

    The message must name the offending file/flag and say how to fix it.
    """


EXIT_DIVERGED = 1  # a non-finite loss, gradient norm or weights: the step was not applied, nothing of it saved
EXIT_USER_ERROR = 2  # bad input, refused with one line
EXIT_STOPPED = 3  # stopped early (SIGINT/SIGTERM, --stop_after): a checkpoint is saved, resume with --resume auto
EXIT_INTERRUPTED = 130  # 128 + SIGINT: SIGINT or SIGTERM before anything could be saved (during start-up)


class Diverged(Exception):
    """The run diverged: a non-finite loss, gradient norm or weights. Raised before the state is changed
    or written, so the newest checkpoint is still the last good one; the training CLI exits EXIT_DIVERGED."""


# errnos that mean "this disk or directory cannot take the write", not a bug
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
# torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer, not an OSError
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# safetensors reports one as its own SafetensorError (neither OSError nor RuntimeError), naming the errno
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def is_disk_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in str(e)
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILURES)


def errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    m = _OS_ERROR_IN_TEXT.search(str(e))
    return int(m.group(1)) if m else None


def disk_failure_message(path: str | os.PathLike, e: BaseException) -> str:
    """One line naming the path: no space, a file-size limit, read-only, no permission, or another I/O
    error, and what to do."""
    code = errno_of(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        why, fix = "no space left on the disk", "free space there or choose another directory"
    elif code == errno.EFBIG:
        why, fix = ("a file grew past a file-size limit (ulimit -f, or the file system's largest file)",
                    "raise the limit or choose another directory")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why, fix = f"not writable ({os.strerror(code)})", "make it writable or choose another directory"
    elif code is not None:
        why, fix = f"{os.strerror(code)} (errno {code})", "check the disk, or choose another directory"
    else:
        why, fix = f"the write failed ({str(e).splitlines()[0][:120]}), most likely a full disk", \
            "free space there or choose another directory"
    return f"{path}: cannot write: {why}; {fix}"


def absolute_path(path: str | os.PathLike) -> Path:
    """`path` made absolute without resolving symlinks (`..` is taken by name, as a shell's `cd` does).

    `<base>/runs` or `<base>/runs/<tag>` may be a link to another disk: the base dir above them is still
    the one the user named, where tokenizer/ and shards/ are, not the parent of the link's target.
    """
    return Path(os.path.abspath(Path(path).expanduser()))


def get_base_dir(base_dir: str | os.PathLike | None = None) -> Path:
    """nanochat's convention: --base-dir, else $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    if base_dir:
        path = Path(base_dir)
    elif os.environ.get("NANOCHAT_BASE_DIR"):
        path = Path(os.environ["NANOCHAT_BASE_DIR"])
    else:
        path = Path.home() / ".cache" / "nanochat"
    return make_dirs(absolute_path(path), "--base-dir")


def make_dirs(path: Path, flag: str = "") -> Path:
    """mkdir -p, with a full disk or a read-only file system as one line naming `flag` (when given)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_failure(e):
            raise UserError(disk_failure_message(path, e) + (f" ({flag})" if flag else "")) from None
        raise
    return path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only if the block succeeds.

    A crash leaves at most a `.tmp` file behind, never a half-written `final`.
    A full disk or a read-only directory becomes a UserError naming `final`.
    """
    final = Path(final)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f"{suffix}.tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp)
        # mkstemp creates 0600; give the final file the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except (OSError, RuntimeError) as e:
        if not is_disk_failure(e):
            raise
        raise UserError(disk_failure_message(final, e)) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_file_set(directory: str | os.PathLike, names: Sequence[str],
                    stale: Sequence[str] = ()) -> Iterator[dict[str, Path]]:
    """Write files that readers take as one set (nanochat's model_N.pt + meta_N.json, tokenizer.pkl +
    token_bytes.pt): after a crash or a kill at any point, the old set or no set, never old beside new.

    The block writes each of `names` to the path yielded for it, in a staging dir inside `directory` (the
    same filesystem, so what follows are renames). The LAST name is the key, the file a reader looks for
    first (nanochat lists model_*.pt, and loads tokenizer.pkl before token_bytes.pt). Once every file is
    written and synced, the old key is removed (from here until it lands again, readers see no set), then
    `stale` (old files the new set has no counterpart for), then the others are renamed into place and the
    key last. The staging dir is removed; one left by a kill is removed by the next write of the same key.
    A full disk or a read-only directory becomes a UserError naming the key's path.
    """
    directory = Path(directory)
    key = directory / names[-1]
    staging = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f".{names[-1]}.*.staging.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{names[-1]}.", suffix=".staging.tmp", dir=directory))
        staged = {name: staging / name for name in names}
        yield staged
        for path in staged.values():
            _fsync_file(path)
        key.unlink(missing_ok=True)
        fsync_dir(directory)  # the key's removal is on disk before any new file lands
        for name in stale:
            (directory / name).unlink(missing_ok=True)
        for name in names:
            os.replace(staged[name], directory / name)
        fsync_dir(directory)
    except (OSError, RuntimeError) as e:
        if not is_disk_failure(e):
            raise
        raise UserError(disk_failure_message(key, e)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


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


class FileLock:
    """An advisory exclusive lock on a file, held until `release()` or until this process exits.

    The kernel drops the lock however the holder dies, so a stale lock file never blocks a later job.
    The file holds the holder's pid for the refusal message, and is removed on release (after checking,
    on taking it, that the path still names the locked file, so a removal cannot admit two holders).
    """

    def __init__(self, path: str | os.PathLike, what: str, fix: str):
        self.path = Path(path)
        while True:
            try:
                f = open(self.path, "a+")
            except OSError as e:
                if is_disk_failure(e):
                    raise UserError(disk_failure_message(self.path, e)) from None
                raise
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip() or "?"
                f.close()
                raise UserError(f"{self.path}: {what} is in use by another process (pid {pid}); {fix}") from None
            if self._still_named(f):
                break
            f.close()  # the holder before us removed it on release: lock the new file
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def _still_named(self, f) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


def hold_lock(path: str | os.PathLike, what: str, fix: str) -> FileLock:
    """Take the lock on `path` or refuse with one line naming the holder's pid and `fix`."""
    return FileLock(path, what, fix)


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


def fsync_tree(directory: Path) -> None:
    """Every file and directory under `directory`, and itself, on disk (whichever process wrote them)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_dir():
            fsync_dir(path)
        else:
            _fsync_file(path)
    fsync_dir(Path(directory))


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_NOTICES_SHOWN: set[str] = set()


def notice_once(message: str) -> None:
    """A fallback notice on stderr, once per process and message, from the main rank only (RANK is set
    by torchrun / accelerate launch)."""
    if message in _NOTICES_SHOWN:
        return
    _NOTICES_SHOWN.add(message)
    if os.environ.get("RANK", "0") == "0":
        print(f"notice: {message}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Signals before anything can be saved

_SIGNAL_RETRY_S = 0.2  # a signal that came at a bad moment is sent again this much later
_SIGNAL_WAIT_LIMIT_S = 30.0  # ... until this long after it first came: an import that hangs still stops


class _StartUpStop:
    """The state of `stop_on_signal`'s stop: asked for but put off (`pending`, since `since`), or under way;
    and how many `uninterruptible()` blocks are open."""
    blocks = 0
    pending = False
    since = 0.0
    stopping = False


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A stop asked for by a signal (`stop_on_signal`) waits until this block ends: for moves that belong
    together (a branch's checkpoints and its log records set aside), so that none is left half done."""
    _StartUpStop.blocks += 1
    try:
        yield
    finally:
        _StartUpStop.blocks -= 1


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (importlib's frames are on the stack while a module body runs)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def stop_on_signal(*signals: int) -> None:
    """Until a loop installs a handler that can save: `signals` stop the process as Ctrl-C does (run_main: one
    line, exit 130), but never in the middle of an import nor of an `uninterruptible` block; there the signal
    is sent again a moment later. A module whose import a KeyboardInterrupt cut short stays half imported, and
    the next use of it fails with another error than the stop (numpy's lazy submodules recurse until Python's
    limit: exit 1 and a traceback instead of 130). Once stopping, later signals are ignored: a launcher
    forwards its own SIGTERM right after the one the process got, which must not cut the unwinding short.
    A stop still put off when the step loop installs its own handler happens there (`stop_if_pending`), so
    that every process of a run stops in start-up alike, whatever the timing."""
    # The handler only writes the signal's number to a pipe (it may have interrupted code holding threading's
    # locks, so it starts no thread); one thread, started here, sends it again.
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    threading.Thread(target=_send_again, args=(read_fd,), name="stop-on-signal", daemon=True).start()

    def handle(signum, frame):
        if _StartUpStop.stopping:
            return
        now = time.monotonic()
        if not _StartUpStop.pending:
            _StartUpStop.pending, _StartUpStop.since = True, now
        if (_StartUpStop.blocks or _importing(frame)) and now - _StartUpStop.since < _SIGNAL_WAIT_LIMIT_S:
            with contextlib.suppress(BlockingIOError):  # a full pipe: sending again is queued already
                os.write(write_fd, bytes([signum]))
            return
        _StartUpStop.stopping = True
        raise KeyboardInterrupt

    for sig in signals:
        signal.signal(sig, handle)


def _send_again(read_fd: int) -> None:
    """For each signal number `stop_on_signal`'s handler writes: that signal again, _SIGNAL_RETRY_S later."""
    while signum := os.read(read_fd, 1):
        time.sleep(_SIGNAL_RETRY_S)
        os.kill(os.getpid(), signum[0])


def stop_if_pending() -> None:
    """Raise the stop that `stop_on_signal` put off, if there is one (exit 130, nothing saved)."""
    if _StartUpStop.pending and not _StartUpStop.stopping:
        _StartUpStop.stopping = True
        raise KeyboardInterrupt


# -----------------------------------------------------------------------------
# Running a sub-command


def normalize_flags(argv: list[str]) -> list[str]:
    """`--device_batch_size=32` -> `--device-batch-size=32`: argparse options are declared with dashes."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


class FlagParser(argparse.ArgumentParser):
    """argparse for every sub-command: no prefix abbreviations (`--num-iter` is a typo, not --num-iterations),
    and a bad flag is one line naming the closest real flag instead of the whole usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def known_flags(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            unknown = [a for a in message[len(prefix):].split() if a.startswith("-")]
            if unknown:
                raise UserError(unknown_flag_message(unknown[0], self.known_flags(), self.prog))
            raise UserError(f"{self.prog}: unexpected argument(s) {message[len(prefix):]}; see --help")
        raise UserError(f"{self.prog}: {message} (see --help)")


def unknown_flag_message(flag: str, known: list[str], prog: str = "") -> str:
    """`--num-iteration=5` -> "unknown flag --num-iteration; did you mean --num-iterations?" (one line)."""
    name = flag.partition("=")[0]
    # compare in one spelling: nanochat's --a_b and our --a-b are the same flag
    by_key = {k.replace("_", "-"): k for k in known}
    close = difflib.get_close_matches(name.replace("_", "-"), list(by_key), n=1, cutoff=0.6)
    hint = f"; did you mean {by_key[close[0]]}?" if close else "; see --help for the flags"
    return f"{prog + ': ' if prog else ''}unknown flag {name}{hint}"


def run_main(main, argv: list[str] | None) -> int:
    """Run a sub-command's main, turning UserError into one clear line and exit code 2.

    Ctrl-C (outside a loop that handles it) is one line and exit 130; a full disk or a read-only
    directory that no stage caught itself is still one line naming the path.
    """
    try:
        return main(normalize_flags(sys.argv[1:] if argv is None else argv)) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if not is_disk_failure(e):
            raise
        print(f"error: {disk_failure_message(e.filename or '?', e)}", file=sys.stderr)
        return EXIT_USER_ERROR
