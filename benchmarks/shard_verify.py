"""What verifying the shards at run start costs: sha256 + the max token id of every shard, one read.

    .venv/bin/python benchmarks/shard_verify.py [--tokens 100_000_000] [--shard-tokens 100_000_000 25_000_000]

Writes a random shard set to a temp dir per --shard-tokens value, then times `ShardManifest.verify(...,
checksums=True)` (what the training loop runs before building the model) from the page cache, median of
--repeats. The figure to extrapolate from is GB/s: a run's data is 2 bytes per token.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import make_shard_dir

from nanochat_unsloth.shards.manifest import ShardManifest


def time_verify(root: Path, repeats: int) -> list[float]:
    manifest = ShardManifest.load(root)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        manifest.verify(root, checksums=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--shard-tokens", type=int, nargs="+", default=[100_000_000, 25_000_000])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for shard_tokens in args.shard_tokens:
        with tempfile.TemporaryDirectory() as tmp:
            make_shard_dir(Path(tmp), args.tokens, shard_tokens)
            times = time_verify(Path(tmp), args.repeats)
        med = statistics.median(times)
        gb = 2 * args.tokens / 1e9
        print(f"{args.tokens:,} tokens in shards of {shard_tokens:,}: median {med:.2f}s "
              f"(range {min(times):.2f}-{max(times):.2f}s) = {gb / med:.2f} GB/s = {args.tokens / med / 1e6:.0f}M tok/s")


if __name__ == "__main__":
    main()
