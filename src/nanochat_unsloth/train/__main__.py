"""`python -m nanochat_unsloth.train ...` or `accelerate launch --config_file accelerate_config.yaml -m nanochat_unsloth.train ...`

Exit codes: 0 finished (the final checkpoint is saved); 1 stopped by a non-finite loss; 2 refused (bad
flags or data, one line); 3 stopped early by SIGINT/SIGTERM or --stop_after, after saving a checkpoint
(continue with --resume auto); 130 interrupted before anything was saved (Ctrl-C during start-up).
"""

from __future__ import annotations

import sys

from nanochat_unsloth.common import run_main
from nanochat_unsloth.common import EXIT_STOPPED


def main(argv: list[str]) -> int:
    from nanochat_unsloth.train.config import parse_train_args
    from nanochat_unsloth.train.loop import NonFiniteLoss, train

    cfg = parse_train_args(argv)
    try:
        result = train(cfg)
    except NonFiniteLoss:
        return 1
    return EXIT_STOPPED if "stopped_at" in result else 0


if __name__ == "__main__":
    sys.exit(run_main(main, None))
