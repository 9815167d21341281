"""Prep throughput: tokens/s of `prep` per worker vs bare tiktoken, and scaling from 1 to N workers.

    .venv/bin/python benchmarks/prep_throughput.py [--repeat 8] [--vocab-size 4096] [--max-workers N]

Self-contained: builds the demo corpus (repeated --repeat times, so process start-up does not
dominate) and a tokenizer trained on it in a temp dir. The baseline is
`enc.encode_ordinary_batch(texts, num_threads=1)` over the same documents, all in memory, on one
core: what one worker could do if reading parquet, moving tokens between processes and writing
shards cost nothing (a plain `encode_ordinary` loop is shown too: it skips the thread hop). Prep's tokens include the BOS per document; so do the baseline's.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from nanochat_unsloth.prep.demo_data import demo_documents
from nanochat_unsloth.prep.job import PrepConfig, run_prep
from nanochat_unsloth.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_corpus(out: Path, docs: list[str], files: int = 8, rows_per_group: int = 512) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    per_file = -(-len(docs) // files)
    for i in range(files):
        pq.write_table(pa.table({"text": docs[i * per_file:(i + 1) * per_file]}), out / f"shard_{i:05d}.parquet",
                       row_group_size=rows_per_group)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the demo corpus (default 8, ~18M chars)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trials", type=int, default=3, help="runs per setting; the best is reported (a shared machine only adds noise)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = list(demo_documents()) * args.repeat
        write_corpus(tmp / "data", docs)
        save_tokenizer(train_tokenizer(iter(demo_documents()), args.vocab_size), tmp / "tokenizer")
        enc = load_tokenizer(tmp / "tokenizer")
        chars = sum(len(d) for d in docs)
        print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}")
        print(f"corpus: demo x{args.repeat} = {len(docs):,} documents, {chars / 1e6:.1f}M characters; "
              f"vocab {enc.n_vocab:,}")

        def bare() -> tuple[int, float]:
            t0 = time.perf_counter()
            ids = enc.encode_ordinary_batch(docs, num_threads=1)
            return sum(len(x) + 1 for x in ids), time.perf_counter() - t0

        def bare_loop() -> tuple[int, float]:
            t0 = time.perf_counter()
            n = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
            return n, time.perf_counter() - t0

        runs = [bare() for _ in range(args.trials)]
        ntok = runs[0][0]
        bare_rate = ntok / min(t for _, t in runs)
        loop_rate = ntok / min(bare_loop()[1] for _ in range(args.trials))
        print(f"tokens: {ntok:,}")
        rows = [("bare tiktoken `encode_ordinary_batch(texts, num_threads=1)`", 1, bare_rate, bare_rate),
                ("bare tiktoken `[encode_ordinary(t) for t in texts]`", 1, loop_rate, loop_rate)]

        for workers in [0] + list(range(1, args.max_workers + 1)):
            times = []
            for trial in range(args.trials):
                out = tmp / f"shards_{workers}_{trial}"
                t0 = time.perf_counter()
                result = run_prep(PrepConfig(source=str(tmp / "data"), out_dir=out, tokenizer_dir=tmp / "tokenizer",
                                             workers=workers, progress=False))
                times.append(time.perf_counter() - t0)
                totals = result.manifest.totals()
                assert totals["train"]["tokens"] + totals["val"]["tokens"] == ntok
            rate = ntok / min(times)
            label = "prep, in-process (--workers 0)" if workers == 0 else f"prep --workers {workers}"
            rows.append((label, max(workers, 1), rate, rate / max(workers, 1)))

        print()
        print("| setting | processes encoding | tokens/s | tokens/s per worker | vs bare (per worker) |")
        print("|---|---:|---:|---:|---:|")
        for label, n, rate, per in rows:
            print(f"| {label} | {n} | {rate:,.0f} | {per:,.0f} | {per / bare_rate:.2f}x |")
        one = next(r for r in rows if r[0] == "prep --workers 1")[2]
        print()
        print("scaling vs --workers 1: " + ", ".join(
            f"{r[1]} workers {r[2] / one:.2f}x" for r in rows if r[0].startswith("prep --workers")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
