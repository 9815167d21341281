"""Does a cut + `--resume auto` continue a run as if it had never stopped? Measured against the GPU's own
run-to-run noise.

    python benchmarks/runs.py resume --base-dir /tmp/mg --depth 12 --steps 6 --cut 3 --extra "--fp8" \\
        --out resume_check.json

Runs, each as one process on one GPU with the real loop (`python -m nanochat_unsloth.train`):
    A, B: the same run twice, straight through (on GPUs 0 and 1 at once when there are two): their
          difference is the run-to-run noise of this GPU;
    C:    the same run stopped after step --cut (`--stop_after`, which saves as SIGTERM would), then
          continued with `--resume auto`.
It prints every step's loss and smoothed loss for A, B and C, the largest relative differences A-B and
A-C, and C's step times (a resumed run that rebuilt its FP8 scaling or recompiled shows it there).
--base-dir must hold tokenizer/ and shards/ (`runs.py scaling --make-data` writes them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import args_record, gpu_count, run_log, start_training, write_json


def train(args, tag: str, gpu: int, *extra: str) -> subprocess.Popen:
    return start_training(args.base_dir, tag, [
        "--base_dir", str(args.base_dir), "--depth", str(args.depth), "--device_batch_size",
        str(args.device_batch_size), "--total_batch_size", str(args.total_batch), "--num_iterations", str(args.steps),
        "--eval_every", "-1", "--eval_tokens", "0", "--sample_every", "-1", "--model_tag", tag,
        *args.extra.split(), *extra], gpu=gpu)


def wait(proc: subprocess.Popen, name: str, ok=(0,)) -> None:
    rc = proc.wait()
    if rc not in ok:
        raise SystemExit(f"{name} exited {rc}; see its log in --base-dir")


def max_rel(a: list[dict], b: list[dict], key: str, first: int = 0) -> float:
    return max(abs(x[key] - y[key]) / abs(x[key]) for x, y in zip(a[first:], b[first:]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", type=Path, required=True)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch", type=int, default=131072)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cut", type=int, default=3, help="stop after this step, then resume")
    p.add_argument("--extra", default="--fp8", help="more training flags for every run")
    p.add_argument("--tag", default="resume_check")
    p.add_argument("--out", type=Path)


def run(args, p: argparse.ArgumentParser) -> int:
    import torch

    two = gpu_count() >= 2
    a = train(args, f"{args.tag}_a", 0, "--force")
    b = train(args, f"{args.tag}_b", 1 if two else 0, "--force") if two else None
    wait(a, "A")
    if b is None:
        b = train(args, f"{args.tag}_b", 0, "--force")
    wait(b, "B")
    wait(train(args, f"{args.tag}_c", 0, "--force", "--stop_after", str(args.cut)), "C (cut)", ok=(3,))
    wait(train(args, f"{args.tag}_c", 0, "--resume", "auto"), "C (resumed)")

    ma, mb, mc = (run_log(args.base_dir, f"{args.tag}_{x}", "metrics.jsonl") for x in "abc")
    result = {
        "args": args_record(args), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "loss": {x: [m["loss"] for m in ms] for x, ms in zip("abc", (ma, mb, mc))},
        "smooth_loss": {x: [m["smooth_loss"] for m in ms] for x, ms in zip("abc", (ma, mb, mc))},
        "dt_c": [round(m["dt"], 3) for m in mc],
        "dt_a": [round(m["dt"], 3) for m in ma],
        "straight_vs_straight": {"loss": max_rel(ma, mb, "loss"), "smooth_loss": max_rel(ma, mb, "smooth_loss")},
        "resumed_vs_straight": {"loss": max_rel(ma, mc, "loss", args.cut),
                                "smooth_loss": max_rel(ma, mc, "smooth_loss", args.cut)},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return 0

