"""`nanochat-unsloth prep`: tokenize a corpus into uint16 token shards + manifest.json (resumable).

Across hosts: `prep --part I --parts N` on each host (I = 0 .. N-1), then `prep merge PART_DIR ...` on one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nanochat_unsloth.common import FlagParser, get_base_dir
from nanochat_unsloth.prep.job import MIN_VAL_TOKENS, PARTS_DIR, PrepConfig, run_prep, summary_line
from nanochat_unsloth.prep.sources import add_source_args


def default_part_dir(base: Path, part: int, parts: int) -> Path:
    """Where `prep --part I --parts N` writes without --out, and where `prep merge` looks without arguments."""
    return base / PARTS_DIR / f"part_{part:03d}_of_{parts:03d}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["merge"]:
        from nanochat_unsloth.prep.merge import main as merge_main

        return merge_main(argv[1:])
    parser = FlagParser(prog="nanochat-unsloth prep", description=__doc__.splitlines()[0],
                        epilog="`nanochat-unsloth prep merge --help`: join the outputs of --part/--parts")
    parser.add_argument("--base-dir", default=None, help="default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    add_source_args(parser, default_help=" (default: <base>/base_data)")
    parser.add_argument("--out", default=None, help="shard directory (default: <base>/shards; with --parts: "
                                                   f"<base>/{PARTS_DIR}/part_III_of_NNN)")
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
                        help="DELETE the shards, manifest and progress in --out (of this or another prep, complete or "
                             "not) and prep from scratch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")
    parser.add_argument("--stop-after-shards", type=int, default=None, metavar="N",
                        help="stop after writing N shards, as an interruption would (the same command without it "
                             "continues); for testing resumption")
    parser.add_argument("--part", type=int, default=0, metavar="I",
                        help="tokenize only part I (from 0) of --parts: a contiguous 1/N of each split's rows "
                             "(parquet sources); then `prep merge` the parts (default 0)")
    parser.add_argument("--parts", type=int, default=1, metavar="N",
                        help="split the prep into N parts, e.g. one per host (default 1: the whole prep)")
    args = parser.parse_args(argv)

    base = get_base_dir(args.base_dir)
    config = PrepConfig(
        source=args.source or str(base / "base_data"),
        out_dir=Path(args.out) if args.out else (
            base / "shards" if args.parts == 1 else default_part_dir(base, args.part, args.parts)),
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
        part=args.part,
        parts=args.parts,
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
