"""The `nanochat-unsloth` console script: one sub-command per stage.

Each sub-command lives in its stage's package as a module with `main(argv) -> int`, except `convert`, whose
two directions live on two floors (the export in convert/, the import, which builds a run's state, in train/)
and meet here, above both.
Flags accept nanochat's underscore spellings (`--device_batch_size=32`) as well as dashes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanochat_unsloth.common import normalize_flags, run_main  # noqa: F401  (re-exported: the CLI's helpers)

# sub-command -> (module with main(argv), or module:function, one-line help)
COMMANDS = {
    "tokenizer": ("nanochat_unsloth.prep.tokenizer_cli", "train the RustBPE tokenizer on parquet text"),
    "prep": ("nanochat_unsloth.prep.prep_cli", "tokenize a corpus into uint16 token shards"),
    "train": ("nanochat_unsloth.train.__main__", "pretrain the GPT (also: accelerate launch -m nanochat_unsloth.train)"),
    "eval": ("nanochat_unsloth.eval.cli", "train/val bits-per-byte and samples of a checkpoint"),
    "convert": ("nanochat_unsloth.cli:convert", "checkpoints to/from nanochat's base_checkpoints layout"),
    "demo-data": ("nanochat_unsloth.prep.demo_data", "write the built-in demo corpus as parquet"),
    "demo": ("nanochat_unsloth.demo", "the whole pipeline on the built-in demo corpus"),
}


def convert(argv: list[str]) -> int:
    """`nanochat-unsloth convert`: convert/cli.py parses and exports; the import from nanochat is train/'s."""
    from nanochat_unsloth.convert import cli as convert_cli
    from nanochat_unsloth.train.import_nanochat import import_from_nanochat

    return convert_cli.main(argv, import_from_nanochat=import_from_nanochat)


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
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    return run_main(getattr(importlib.import_module(module), function or "main"), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
