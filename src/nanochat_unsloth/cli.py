"""The `nanochat-unsloth` console script: one sub-command per stage.

Each sub-command lives in its stage's package as a module with `main(argv) -> int`.
Flags accept nanochat's underscore spellings (`--device_batch_size=32`) as well as dashes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanochat_unsloth.common import (EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, disk_failure_message,
                                     is_disk_failure)

# sub-command -> (module with main(argv), one-line help)
COMMANDS = {
    "tokenizer": ("nanochat_unsloth.prep.tokenizer_cli", "train the RustBPE tokenizer on parquet text"),
    "prep": ("nanochat_unsloth.prep.prep_cli", "tokenize a corpus into uint16 token shards"),
    "train": ("nanochat_unsloth.train.__main__", "pretrain the GPT (also: accelerate launch -m nanochat_unsloth.train)"),
    "eval": ("nanochat_unsloth.eval.cli", "train/val bits-per-byte and samples of a checkpoint"),
    "convert": ("nanochat_unsloth.convert.cli", "checkpoints to/from nanochat's base_checkpoints layout"),
    "demo-data": ("nanochat_unsloth.prep.demo_data", "write the built-in demo corpus as parquet"),
    "demo": ("nanochat_unsloth.demo", "the whole pipeline on the built-in demo corpus"),
}


def normalize_flags(argv: list[str]) -> list[str]:
    """`--device_batch_size=32` -> `--device-batch-size=32`: argparse options are declared with dashes."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="nanochat-unsloth", description=__doc__.splitlines()[0])
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text, add_help=False)
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_main(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
