"""A start-up stop on SIGINT/SIGTERM (`common.stop_on_signal`): exit 130 as Ctrl-C, but never inside an import
nor inside an `uninterruptible` block, and a second signal while stopping changes nothing.

Each case runs a small script in its own Python process (a signal handler is process-wide), which signals
itself at the moment under test; only the standard library and `nanochat_unsloth.common` are imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
