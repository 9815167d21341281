"""Launched workers stop with their launcher (train/launcher.py): SIGTERM when it dies, and an exit after the
grace period when the worker is blocked past it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


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
