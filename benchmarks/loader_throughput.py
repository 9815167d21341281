"""TokenShardLoader throughput per rank, from the page cache, on CPU.

    .venv/bin/python benchmarks/loader_throughput.py [--tokens 50_000_000] [--B 32] [--T 2048]

Writes a random shard set to a temp dir, reads every file once so it sits in the page cache, then times
`next(loader)` over one epoch of rank 0's windows for (world_size 1, rank 0) and (world_size 8, rank 0). Tokens counted = B*T per batch,
the tokens a training step sees. The training loop needs far less than this: a GPU step takes milliseconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import make_shard_dir

from nanochat_unsloth.shards.loader import TokenShardLoader


def bench(root: Path, B: int, T: int, world_size: int, repeats: int) -> list[float]:
    """tokens/s of each of `repeats` passes over one epoch of this rank's windows, each with a fresh loader
    (fresh memmaps, so every window's pages are mapped anew as in training, where each is read once)."""
    rates = []
    for _ in range(repeats):
        loader = TokenShardLoader(root, "train", B, T, rank=0, world_size=world_size)
        batches = loader.num_windows // world_size
        t0 = time.perf_counter()
        for _ in range(batches):
            x, y = next(loader)
        rates.append(batches * B * T / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--shard-tokens", type=int, default=10_000_000)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        root = Path(tmp)
        make_shard_dir(root, args.tokens, args.shard_tokens)
        print(f"{args.tokens:,} tokens in {args.shard_tokens:,}-token shards, B={args.B} T={args.T}, "
              f"one epoch of rank 0's windows x {args.repeats} repeats")
        for world_size in (1, 8):
            rates = bench(root, args.B, args.T, world_size, args.repeats)
            print(f"world_size {world_size} rank 0: median {np.median(rates) / 1e6:,.0f}M tok/s, "
                  f"min {min(rates) / 1e6:,.0f}M, max {max(rates) / 1e6:,.0f}M  "
                  f"(runs: {', '.join(f'{r / 1e6:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
