"""Launch a script or module as N CPU processes that Accelerate sees as one MULTI_CPU job, and find and signal
a launcher's workers (tests only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch_cpu_processes(nproc: int, *argv: str, timeout: int = 150,
                         accelerate_config: str | None = None) -> subprocess.CompletedProcess:
    """Run `python *argv` as `nproc` gloo ranks (one plain process when nproc == 1).

    Not `accelerate launch --cpu --num_processes N`: without --mpirun_hostfile, accelerate 1.15 starts ONE
    process for that (its simple_launcher), so a "2-process" test silently runs on one. torchrun plus
    ACCELERATE_USE_CPU=true gives N ranks and Accelerate's MULTI_CPU (DDP over gloo).
    `accelerate_config` (a DeepSpeed yaml, relative to the repo): `accelerate launch --config_file` it as it is;
    its launcher is torchrun's, and the run names gloo itself (train/deepspeed_zero.py).
    """
    cmd, env = _cpu_command(nproc, argv, accelerate_config)
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        if nproc == 1:
            raise
        # A multi-rank gloo job on a loaded 2-core machine has been seen to stall at start-up or shutdown
        # (a few in many full-suite runs; never reproduced alone). Say so loudly, keep the evidence, and
        # run it once more: a run that hangs deterministically still fails here.
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"cpu_launch_timeout_{os.getpid()}.log"
        log.write_text(f"{cmd}\n--- stdout ---\n{_text(e.stdout)}\n--- stderr ---\n{_text(e.stderr)}\n")
        print(f"warning: {nproc}-rank launch timed out after {timeout}s (output in {log}); retrying once",
              file=sys.stderr)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def start_cpu_processes(nproc: int, *argv: str, accelerate_config: str | None = None) -> subprocess.Popen:
    """`launch_cpu_processes` without waiting: the launcher, its stdout and stderr as pipes (text)."""
    cmd, env = _cpu_command(nproc, argv, accelerate_config)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cpu_command(nproc: int, argv, accelerate_config: str | None = None) -> tuple[list[str], dict]:
    # CPU ranks on a GPU machine too: where CUDA is visible, Accelerate (and DeepSpeed through it) would take the
    # GPUs, and a DeepSpeed config asked to run on the CPU is refused there
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    if accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / accelerate_config),
                "--num_processes", str(nproc), *argv], env
    if nproc == 1:
        return [sys.executable, *argv], env
    env["ACCELERATE_USE_CPU"] = "true"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv], env


def exit_without_finalization() -> None:
    """End a finished gloo rank now, skipping interpreter finalization.

    Seen about once in ten full-suite runs on the 2-core CI-sized machine: a rank that had written its
    results and destroyed its process group still died at exit with "terminate called without an active
    exception" (SIGABRT), which torch attributes to Gloo worker threads releasing tensors while the
    interpreter is torn down (pytorch/pytorch#179291). Call this only on the success path, after every
    result is on disk: an exception before it still fails the rank.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def free_port() -> int:
    """A free TCP port on loopback for a test's gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, nprocs: int, args: tuple, timeout: float = 120) -> None:
    """torch.multiprocessing's spawn of fn(rank, *args) with a deadline: ranks that hang in a mismatched
    collective are terminated, not waited on."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            raise TimeoutError(f"{fn.__name__}: the ranks did not finish in {timeout}s")


def descendants(root: int) -> list[int]:
    """Every live process below `root` (Linux /proc); torchrun starts each worker in a session of its own, so
    the parent chain, not the session, finds them."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The worker process with RANK=rank below the launcher."""
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def signal_after_line(launcher: subprocess.Popen, prefix: str, sig: int | None, rank: int | None = None,
                      ranks: int = 2, timeout: float = 120) -> tuple[str, str, float, list[int]]:
    """Read the launcher's stdout up to a line starting with `prefix` (every rank is past start-up), send `sig`
    to rank `rank`'s worker (or to the launcher itself when None; no signal when `sig` is None: the run is to
    end by itself) and wait for the launcher to exit.
    -> (stdout, all of it, stderr, seconds from the signal to the exit, the workers' pids). The launcher
    and its workers are killed if anything fails."""
    try:
        deadline = time.time() + 240
        before = []
        for line in launcher.stdout:
            before.append(line)
            if line.startswith(prefix):
                break
            assert time.time() < deadline, f"no {prefix!r} line in 240 s"
        else:
            raise AssertionError(f"the run ended before {prefix!r}: {launcher.stderr.read()[-3000:]}")
        workers = [rank_pid(launcher.pid, r) for r in range(ranks)]
        assert all(workers), f"workers not found: {workers}"
        if sig is not None:
            os.kill(launcher.pid if rank is None else workers[rank], sig)
        sent = time.time()
        out, err = launcher.communicate(timeout=timeout)
        return "".join(before) + out, err, time.time() - sent, workers
    finally:
        if launcher.poll() is None:
            for pid in [launcher.pid, *descendants(launcher.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
