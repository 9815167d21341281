"""Training workers stop when the launcher that started them dies.

`torchrun` / `accelerate launch` kill their workers when one fails, but a `kill -9` of the launcher itself
leaves them running: orphans that keep training and writing checkpoints into the run directory a restarted
job then shares. On Linux the kernel can deliver a signal to a process when its parent dies
(prctl PR_SET_PDEATHSIG); we ask for SIGTERM, which the loop already turns into "finish the step, save,
exit". Only workers of a launcher ask: a run started from a shell must survive a closed terminal under nohup.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
# set by torchrun (and so by `accelerate launch`) in every worker's environment; read, never set, by us
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
ORPHAN_GRACE_S = 300.0  # a d20 checkpoint saves in seconds; a much larger model's in well under this


def launched_by_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def stop_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent exits. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the parent died before the prctl: nobody will send the signal
        os.kill(os.getpid(), sig)
    return True


def exit_when_orphaned(grace_s: float = ORPHAN_GRACE_S, poll_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process `grace_s` after its parent (the launcher) exits."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(grace_s)
        print(f"pid {os.getpid()}: the launcher exited {grace_s:.0f}s ago and this worker has not stopped "
              "(blocked in a collective?); exiting", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread
