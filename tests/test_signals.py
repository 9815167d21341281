"""A start-up stop on SIGINT/SIGTERM (`common.stop_on_signal`): exit 130 as Ctrl-C, but never inside an import
nor inside an `uninterruptible` block (unless an import hangs past the wait limit), a stop still put off ends at
`stop_if_pending`, a second signal while stopping changes nothing, and the store's set-asides are uninterruptible.

Each case but the last runs a small script in its own Python process (a signal handler is process-wide), which signals
itself at the moment under test; only the standard library and `nanochat_unsloth.common` are imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanochat_unsloth.common import EXIT_INTERRUPTED

SRC = Path(__file__).resolve().parents[1] / "src"

# The script: the handler installed, then `body` inside run_main, then a sleep where a signal that the body
# deferred lands (were it lost, "after" would be printed and the exit would be 0).
PROLOGUE = """
import os, signal, sys, time
sys.path[:0] = [{src!r}, {here!r}]
from nanochat_unsloth.common import run_main, stop_on_signal, uninterruptible

def main(argv):
    stop_on_signal(signal.SIGINT, signal.SIGTERM)
{body}
    time.sleep(20)  # a deferred signal lands here, a moment later (long only so a loaded machine cannot miss it)
    print("after", flush=True)  # never reached: the stop comes first

sys.exit(run_main(main, []))
"""


def run_script(tmp_path: Path, body: str, module: str | None = None) -> subprocess.CompletedProcess:
    if module is not None:
        (tmp_path / "slow_module.py").write_text(textwrap.dedent(module))
    script = tmp_path / "script.py"
    body = textwrap.indent(textwrap.dedent(body), "    ")
    script.write_text(PROLOGUE.format(src=str(SRC), here=str(tmp_path), body=body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


def test_a_signal_during_an_import_stops_after_the_import_not_inside_it(tmp_path):
    """The signal arrives while a module body runs: the module finishes importing whole (its last line runs,
    the name is bound), then the stop comes (exit 130), before the code after it runs to its end. A stop
    raised inside the import would skip the module's last line and the print."""
    proc = run_script(tmp_path, """
        import slow_module
        print("imported", slow_module.WHOLE, flush=True)
        """, module="""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here, inside the import
        WHOLE = True
        """)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stdout.split() == ["imported", "True"]
    assert proc.stderr.strip() == "interrupted"  # run_main's one line, no traceback


def test_a_signal_inside_an_uninterruptible_block_waits_for_its_end(tmp_path):
    proc = run_script(tmp_path, """
        with uninterruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            print("all moved", flush=True)
        """)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stdout.split() == ["all", "moved"]


def test_a_signal_elsewhere_stops_at_once_and_a_second_one_leaves_the_unwinding_alone(tmp_path):
    """A launcher forwards its own SIGTERM right after the one the process got: the second arrives while the
    first one's stop unwinds through a `finally`, which must still run to its end."""
    proc = run_script(tmp_path, """
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
            print("not stopped", flush=True)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
            print("cleaned up", flush=True)
        """)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stdout.split() == ["cleaned", "up"]
    assert proc.stderr.strip() == "interrupted"


def test_a_stop_still_put_off_when_the_step_loop_begins_ends_the_start_up_there(tmp_path):
    """Every process of a run stops in start-up alike: a stop put off by an import happens at `stop_if_pending`
    (StopRequest.install calls it), not at whatever the next re-sent signal meets, which could be the step loop's
    handler on one process (a save) and start-up on another (exit 130)."""
    proc = run_script(tmp_path, """
        import slow_module
        from nanochat_unsloth.common import stop_if_pending
        stop_if_pending()
        print("not stopped", flush=True)
        """, module="""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        """)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stdout == ""


def test_an_import_that_hangs_is_stopped_all_the_same_after_the_wait_limit(tmp_path):
    proc = run_script(tmp_path, """
        import nanochat_unsloth.common as common
        common._SIGNAL_WAIT_LIMIT_S = 0.5  # 30 s in a run
        import slow_module
        print("imported", flush=True)
        """, module="""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(15)  # hangs, as far as the stop can tell
        """)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("move", ["start_branch", "set_aside"])
def test_a_branch_or_a_run_is_set_aside_inside_one_uninterruptible_block(tmp_path, monkeypatch, move):
    """What moves together (checkpoints and log records) moves inside `uninterruptible()`: nothing has moved when
    the block opens, everything has when it closes."""
    import contextlib

    from nanochat_unsloth.checkpoint import store

    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"step_{step:06d}").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(3)))
    seen = []

    @contextlib.contextmanager
    def watched():
        seen.append(("open", (run / "step_000002").exists()))
        yield
        seen.append(("close", (run / "step_000002").exists()))

    monkeypatch.setattr(store, "uninterruptible", watched)
    if move == "start_branch":
        store.start_branch(run, 1, log=lambda line: None)
    else:
        store.set_aside(run)
    assert seen == [("open", True), ("close", False)]
