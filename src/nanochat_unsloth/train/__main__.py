"""`python -m nanochat_unsloth.train ...` or `accelerate launch --config_file accelerate_config.yaml -m nanochat_unsloth.train ...`"""

from __future__ import annotations

import sys

from nanochat_unsloth.cli import run_main


def main(argv: list[str]) -> int:
    from nanochat_unsloth.train.config import parse_train_args
    from nanochat_unsloth.train.loop import NonFiniteLoss, train

    cfg = parse_train_args(argv)
    try:
        train(cfg)
    except NonFiniteLoss:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, None))
