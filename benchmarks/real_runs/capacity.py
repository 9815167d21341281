"""The deepest model one GPU trains, per launch: our single-process memory modes against DeepSpeed ZeRO-3 with
CPU offload. For each launch, depths are tried in the order given until one fails (out of memory, or over
--timeout); each that runs reports its steady tok/s and peak GPU memory.

    python benchmarks/runs.py capacity --base-dir /tmp/cap --depths 44,48,52,56 \\
        --launches lean,zero3_offload --device-batch-size 2 --out capacity.json

Launches (--launches, comma list):
    fast, selective, lean   one process, `--memory <mode>` (the DDP path on one GPU);
    zero3, zero3_offload    one process through `accelerate launch` with configs/accelerate/deepspeed_<name>.yaml.
Every run: --steps optimizer steps of device batch x seq tokens (no accumulation) and no evaluation; it is killed
once its log holds --steps steps, so no checkpoint of a multi-billion-parameter model is written. The median step
time leaves out the first --warmup steps (compilation, DeepSpeed's first partitioning).
--base-dir must hold tokenizer/ and shards/ (`runs.py quality --base-dir DIR --make-data --data-only` writes
them). Each launch runs on GPU 0 alone. --timeout bounds one depth: on a machine lent for calls of a few
minutes, give each launch its own call with a --timeout that fits it (benchmarks/gpu_extras.sh).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import REPO, args_record, run_log, start_training, write_json

CONFIGS = REPO / "configs" / "accelerate"
LAUNCHES = {
    "fast": (None, ["--memory", "fast"]),
    "selective": (None, ["--memory", "selective"]),
    "lean": (None, ["--memory", "lean"]),
    "zero3": (CONFIGS / "deepspeed_zero3.yaml", []),
    "zero3_offload": (CONFIGS / "deepspeed_zero3_offload.yaml", []),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", type=Path, required=True, help="holds tokenizer/ and shards/")
    p.add_argument("--depths", default="44,48,52,56", help="comma list, tried in this order per launch")
    p.add_argument("--launches", default="lean,zero3_offload", help="comma list of: " + ", ".join(LAUNCHES))
    p.add_argument("--device-batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--extra", default="", help="more training flags for every launch")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch; over it counts as not fitting")
    p.add_argument("--out", type=Path)


def kill_run(proc: subprocess.Popen, tag: str, wait_s: float = 120) -> None:
    """SIGKILL, not SIGTERM (which saves), to the training process, then to its launcher: `accelerate launch`
    runs the training as a child, which outlives a killed launcher, and whose launcher's death sends it a SIGTERM
    (it would start saving). Waits until the training process is gone, so the next depth does not start beside
    its GPU memory and pinned host memory. The pattern follows `--`: pkill would read a pattern that starts with
    a dash as an option of its own."""
    pattern = f"--model_tag {tag}( |$)"
    deadline = time.time() + wait_s
    while subprocess.run(["pkill", "-KILL", "-f", "--", pattern], check=False).returncode == 0:
        if time.time() > deadline:
            print(f"warning: a process of {tag} survived SIGKILL for {wait_s:.0f}s", flush=True)
            break
        time.sleep(1)
    proc.kill()
    proc.wait()


def one(args, launch: str, depth: int) -> dict:
    config, flags = LAUNCHES[launch]
    tag = f"capacity_{launch}_d{depth}"
    run_dir = args.base_dir / "runs" / tag
    if run_dir.exists():  # a fresh run each time: a capacity probe never resumes
        shutil.rmtree(run_dir)
    proc = start_training(args.base_dir, tag, [
        "--base_dir", str(args.base_dir), "--depth", str(depth), "--max_seq_len", str(args.seq),
        "--device_batch_size", str(args.device_batch_size),
        "--total_batch_size", str(args.device_batch_size * args.seq), "--num_iterations", str(args.steps + 1000),
        "--eval_every", "-1", "--eval_tokens", "0", "--core_metric_every", "-1", "--sample_every", "-1",
        "--save_every", "-1", "--model_tag", tag, *flags, *args.extra.split()], gpu=0, config=config and str(config))
    t0, rc = time.time(), None
    while rc is None:
        time.sleep(2)
        metrics = run_log(args.base_dir, tag, "metrics.jsonl", missing_ok=True)
        if len(metrics) >= args.steps or time.time() - t0 > args.timeout:
            kill_run(proc, tag)
            rc = 0 if len(metrics) >= args.steps else "timeout"
        elif proc.poll() is not None:
            rc = proc.returncode  # it ended before --steps steps: out of memory, or another error in its log
    metrics = run_log(args.base_dir, tag, "metrics.jsonl", missing_ok=True)
    steady = [m for m in metrics if m["step"] >= args.warmup]
    row = {"launch": launch, "depth": depth, "rc": rc, "steps": len(metrics), "wall_s": time.time() - t0,
           "log": str(args.base_dir / f"{tag}.log")}
    if rc == 0 and steady:
        row["tok_per_sec"] = statistics.median(m["tok_per_sec"] for m in steady)
        row["peak_mem_gib"] = max(m["peak_mem_gib"] for m in metrics)
    return row


def run(args, p: argparse.ArgumentParser) -> int:
    launches = args.launches.split(",")
    for name in launches:
        if name not in LAUNCHES:
            p.error(f"--launches: unknown {name!r}; choose from {', '.join(LAUNCHES)}")
    if not (args.base_dir / "shards" / "manifest.json").is_file():
        p.error(f"--base-dir {args.base_dir}: no shards/manifest.json; build it with "
                f"`runs.py quality --base-dir {args.base_dir} --make-data --data-only`")
    rows, deepest = [], {}
    for launch in launches:
        for depth in (int(d) for d in args.depths.split(",")):
            row = one(args, launch, depth)
            rows.append(row)
            ok = "tok_per_sec" in row
            print(f"{launch:>14} d{depth}: " + (f"{row['tok_per_sec']:,.0f} tok/s, {row['peak_mem_gib']:.1f} GiB"
                                                if ok else f"does not fit (exit {row['rc']}; {row['log']})"), flush=True)
            if not ok:
                break
            deepest[launch] = row
    for launch in launches:
        r = deepest.get(launch)
        print(f"deepest, {launch}: " + (f"d{r['depth']} at {r['tok_per_sec']:,.0f} tok/s" if r else "none of --depths"))
    if args.out:
        write_json(args.out, {"args": args_record(args), "rows": rows,
                              "deepest": {k: v["depth"] for k, v in deepest.items()}})
    return 0
