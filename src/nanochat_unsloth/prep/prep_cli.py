"""`nanochat-unsloth prep`: tokenize a corpus into uint16 token shards + manifest.json (resumable)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nanochat_unsloth.common import FlagParser, get_base_dir
from nanochat_unsloth.prep.job import MIN_VAL_TOKENS, PrepConfig, run_prep, summary_line
from nanochat_unsloth.prep.sources import add_source_args


def main(argv: list[str]) -> int:
    parser = FlagParser(prog="nanochat-unsloth prep", description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", default=None, help="default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    add_source_args(parser, default_help=" (default: <base>/base_data)")
    parser.add_argument("--out", default=None, help="shard directory (default: <base>/shards)")
    parser.add_argument("--tokenizer-dir", default=None, help="directory of tokenizer.pkl (default: <base>/tokenizer)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: all CPUs); 0 tokenizes in this process")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on train tokens (default: all)")
    parser.add_argument("--max-val-tokens", type=int, default=None, help="cap on val tokens (default: all)")
    parser.add_argument("--min-val-tokens", type=int, default=MIN_VAL_TOKENS,
                        help="refuse a val split smaller than this, before tokenizing train "
                             f"(default {MIN_VAL_TOKENS:,}: one 2048-token sequence + 1)")
    parser.add_argument("--force", action="store_true",
                        help="DELETE the shards in --out (of another source/tokenizer/options) and prep from scratch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")
    parser.add_argument("--stop-after-shards", type=int, default=None, metavar="N",
                        help="stop after writing N shards, as an interruption would (the same command without it "
                             "continues); for testing resumption")
    args = parser.parse_args(argv)

    base = get_base_dir(args.base_dir)
    config = PrepConfig(
        source=args.source or str(base / "base_data"),
        out_dir=Path(args.out) if args.out else base / "shards",
        tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else base / "tokenizer",
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        max_tokens=args.max_tokens,
        max_val_tokens=args.max_val_tokens,
        min_val_tokens=args.min_val_tokens,
        val_files=args.val_files,
        val_docs=args.val_docs,
        hf_config=args.hf_config,
        hf_data_files=args.hf_data_files,
        force=args.force,
        progress=not args.quiet,
        stop_after_shards=args.stop_after_shards,
    )
    try:
        result = run_prep(config)
    except KeyboardInterrupt:
        print("\nprep: interrupted; finished shards are kept, re-run the same command to continue", file=sys.stderr)
        return 130
    print(summary_line(result, config.workers))
    return 0


if __name__ == "__main__":
    from nanochat_unsloth.common import run_main

    sys.exit(run_main(main, None))
