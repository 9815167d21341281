"""Two checkouts of this package, A and B, on the same GPUs in one invocation: the same losses, and the speed.

    python benchmarks/runs.py ab --a /tmp/old/src --b src --base-dir /tmp/mg --out ab.json

Meant for a change that must not change behaviour (a refactor): A is the code before, B after. Each run is
the real loop (`python -m nanochat_unsloth.train`) with PYTHONPATH pointing at one checkout's `src`:

- parity: for every kernel set x memory mode (x FP8) in --parity, a short run of a small model, A on one GPU and
  B on another at the same time. Step 0's loss is a forward pass of the same seeded weights on the same batch,
  so A and B must agree to --tolerance; later steps and the grad norms are printed for the record.
- speed: for every variant in --speed, the d20 step of A and then of B on the SAME GPU (variants run on
  different GPUs at once), median tok/s of the steps after --warmup.

--base-dir must hold tokenizer/ and shards/ (`runs.py scaling --make-data` writes them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from common import args_record, run_log, write_json

PARITY = "torch:fast,torch:lean,torch:selective,fused:fast,fused:lean,fused:selective," \
         "fused+fp8:fast,fused+fp8:lean,fused+fp8:selective"
SPEED = {"fp8": ["--fp8"], "torch": ["--kernels", "torch"], "fused": ["--kernels", "fused"]}


def train_one(args, src: Path, gpu: int, tag: str, flags: list[str]) -> list[dict]:
    """One run of checkout `src`'s loop on GPU `gpu`: its metrics records, or one record with its exit code and log tail."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(src.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "nanochat_unsloth.train", "--base_dir", str(args.base_dir), "--model_tag", tag,
           "--eval_every", "-1", "--eval_tokens", "0", "--sample_every", "-1", "--force", *flags]
    with open(args.base_dir / f"{tag}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, cwd=args.base_dir, stdout=log, stderr=subprocess.STDOUT,
                            timeout=args.timeout).returncode
    path = args.base_dir / "runs" / tag / "metrics.jsonl"
    if rc != 0 or not path.exists():
        return [{"rc": rc, "log_tail": (args.base_dir / f"{tag}.log").read_text()[-1500:]}]
    return run_log(args.base_dir, tag, "metrics.jsonl")


def parity_flags(args, spec: str) -> list[str]:
    kernels, memory = spec.split(":")
    flags = ["--depth", str(args.parity_depth), "--max_seq_len", "512", "--device_batch_size", "8",
             "--total_batch_size", "8192", "--num_iterations", "3", "--kernels", kernels.split("+")[0],
             "--memory", memory]
    return flags + (["--fp8"] if kernels.endswith("+fp8") else [])


def in_parallel(*jobs):
    results = [None] * len(jobs)

    def work(i, job):
        results[i] = job()

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", type=Path, required=True, help="checkout A's src/ (before)")
    p.add_argument("--b", type=Path, required=True, help="checkout B's src/ (after)")
    p.add_argument("--base-dir", type=Path, required=True)
    p.add_argument("--parity", default=PARITY, help="comma list of kernels[+fp8]:memory")
    p.add_argument("--parity-depth", type=int, default=4)
    p.add_argument("--parity-gpus", default="2,3", help="GPU for A, GPU for B")
    p.add_argument("--tolerance", type=float, default=1e-6, help="step 0 loss, relative")
    p.add_argument("--speed", default="fp8,torch", help="comma list of: " + ", ".join(SPEED))
    p.add_argument("--speed-gpus", default="0,1", help="one GPU per speed variant, in order")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--out", type=Path)


def run(args, p: argparse.ArgumentParser) -> int:
    args.base_dir = args.base_dir.resolve()
    ga, gb = (int(g) for g in args.parity_gpus.split(","))
    speed_gpus = [int(g) for g in args.speed_gpus.split(",")]
    variants = [v for v in args.speed.split(",") if v]

    def parity_job():
        out = {}
        for spec in filter(None, args.parity.split(",")):
            name = spec.replace(":", "_").replace("+", "_")
            a, b = in_parallel(lambda: train_one(args, args.a, ga, f"ab_a_{name}", parity_flags(args, spec)),
                               lambda: train_one(args, args.b, gb, f"ab_b_{name}", parity_flags(args, spec)))
            ok = "loss" in a[0] and "loss" in b[0]
            out[spec] = {"a_loss": [m.get("loss") for m in a], "b_loss": [m.get("loss") for m in b],
                         "a_grad_norm": [m.get("grad_norm") for m in a], "b_grad_norm": [m.get("grad_norm") for m in b],
                         "step0_rel": abs(a[0]["loss"] - b[0]["loss"]) / abs(a[0]["loss"]) if ok else None}
            if not ok:
                out[spec]["failed"] = {"a": a[0], "b": b[0]}
            print(f"parity {spec}: {out[spec]['step0_rel']}", flush=True)
        return out

    def speed_job(variant, gpu):
        flags = ["--depth", "20", "--device_batch_size", "32", "--total_batch_size", "524288",
                 "--num_iterations", str(args.steps), *SPEED[variant]]
        out = {}
        for side, src in (("a", args.a), ("b", args.b)):
            ms = train_one(args, src, gpu, f"ab_{side}_speed_{variant}", flags)
            steady = [m["tok_per_sec"] for m in ms if m.get("step", -1) >= args.warmup]
            out[side] = {"tok_s": statistics.median(steady) if steady else None,
                         "peak_mem_gib": max((m.get("peak_mem_gib", 0) for m in ms), default=None),
                         "dts": [round(m["dt"], 3) for m in ms if "dt" in m], **({} if steady else {"failed": ms[0]})}
            print(f"speed {variant} {side}: {out[side]['tok_s']}", flush=True)
        if out["a"]["tok_s"] and out["b"]["tok_s"]:
            out["b_over_a"] = out["b"]["tok_s"] / out["a"]["tok_s"]
        return out

    jobs = [parity_job] + [lambda v=v, g=g: speed_job(v, g) for v, g in zip(variants, speed_gpus)]
    parity, *speeds = in_parallel(*jobs)
    result = {"args": args_record(args), "parity": parity,
              "speed": dict(zip(variants, speeds))}
    print("\nparity (step 0 loss, relative A-B):")
    for spec, r in parity.items():
        print(f"  {spec:24} {r['step0_rel']!s:>12}  A {r['a_loss']}  B {r['b_loss']}")
    print("speed (median tok/s):")
    for v, r in result["speed"].items():
        print(f"  {v:6} A {r['a']['tok_s']}  B {r['b']['tok_s']}  B/A {r.get('b_over_a')}  "
              f"peak GiB A {r['a']['peak_mem_gib']} B {r['b']['peak_mem_gib']}")
    if args.out:
        write_json(args.out, result)
    bad = [s for s, r in parity.items() if r["step0_rel"] is None or r["step0_rel"] > args.tolerance]
    return 1 if bad else 0

