"""`python -m nanochat_unsloth.train ...` or `accelerate launch --config_file accelerate_config.yaml -m nanochat_unsloth.train ...`

Exit codes: 0 finished (the final checkpoint is saved); 1 stopped by a non-finite loss, gradient norm or weights
(nothing of the diverged step saved); 2 refused (bad flags or data, a failed write: one line); 3 stopped early
by SIGINT/SIGTERM or --stop_after, after saving a checkpoint (continue with --resume auto); 130 SIGINT or
SIGTERM during start-up, before the step loop (nothing saved).
"""

from __future__ import annotations

import signal
import sys

from nanochat_unsloth.common import EXIT_DIVERGED, EXIT_STOPPED, Diverged, run_main, stop_on_signal


def main(argv: list[str]) -> int:
    # until the step loop installs its graceful stop (which then stays, so that a signal while the process
    # exits cannot kill it), SIGINT and SIGTERM stop the start-up: nothing to save yet
    stop_on_signal(signal.SIGINT, signal.SIGTERM)
    from nanochat_unsloth.train.config import parse_train_args
    from nanochat_unsloth.train.loop import train

    try:
        result = train(parse_train_args(argv))
    except Diverged:
        return EXIT_DIVERGED
    return EXIT_STOPPED if "stopped_at" in result else 0


if __name__ == "__main__":
    sys.exit(run_main(main, None))
