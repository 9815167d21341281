"""Multi-GPU scaling of the real training loop: per-GPU tok/s, step time, efficiency and peak memory.

    python benchmarks/runs.py scaling --base-dir /tmp/mg --make-data --gpus 1,2,4 --variants fp8,torch \\
        --depth 20 --steps 12 --out multi_gpu.json

For each variant and GPU count N this launches the product's own loop,
`accelerate launch --config_file <config> --num_processes N -m nanochat_unsloth.train ...` (one GPU:
accelerate_config.yaml; several: configs/accelerate/multi_gpu.yaml, or --config), with nanochat's d20
settings (device batch 32, seq 2048, total batch 524,288), for --steps optimizer steps, and reads back:
    - step time: median `dt` of the steps after --warmup (metrics.jsonl; rank 0's clock, which waits for
      every rank at the gradient all-reduce);
    - tok/s and tok/s per GPU; efficiency = per-GPU tok/s over the N=1 figure of the same invocation;
    - every rank's phases of step --profile-step (`--profile_step`: data, forward+backward, gradient sync,
      optimizers, with the device synchronized at each boundary), its CPU time and peak memory;
    - each GPU's mean utilisation over the run (nvidia-smi, every 0.5 s).

--make-data writes a real-text corpus first: the source and documentation files of this Python's
installation (stdlib + site-packages) as parquet in nanochat's layout, then trains a 65,536-token
tokenizer on it and preps the shards, with this package's own `tokenizer` and `prep` commands.

Always run with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 on this
workplace's machines (docs/PERF.md, "Several GPUs (d20, DDP on one node)"); this subcommand refuses to
launch several GPUs without them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import NO_MULTICAST, REPO, GpuSampler, make_data, run_log, write_json

VARIANT_FLAGS = {"fp8": ["--fp8"], "torch": ["--kernels", "torch"], "fused": ["--kernels", "fused"]}


# -----------------------------------------------------------------------------
# One launch


def launch(args, variant: str, n: int) -> dict:
    tag = f"mg_{variant}_n{n}"
    config = args.config if n > 1 else str(REPO / "accelerate_config.yaml")
    train_args = [
        "--base-dir", str(args.base_dir), "--depth", str(args.depth), "--device_batch_size", str(args.device_batch_size),
        "--max_seq_len", str(args.seq), "--total_batch_size", str(args.total_batch), "--num_iterations", str(args.steps),
        "--eval_every", "-1", "--eval_tokens", str(args.device_batch_size * args.seq * n), "--sample_every", "-1",
        "--profile_step", str(args.profile_step), "--model_tag", tag, "--force", *VARIANT_FLAGS[variant],
        *args.extra.split(),
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(n),
           "-m", "nanochat_unsloth.train", *train_args]
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    run_dir = args.base_dir / "runs" / tag
    t0 = time.time()
    with GpuSampler() as gpus:
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    (args.base_dir / f"{tag}.log").write_text(out)
    result = {"variant": variant, "gpus": n, "rc": rc, "wall_s": round(time.time() - t0, 1), "gpu_util": gpus.mean(),
              "gpu_health": gpus.summary(), "gpu_series": gpus.series(t0)}
    metrics = run_log(args.base_dir, tag, "metrics.jsonl", missing_ok=True)
    # the profiled step synchronizes at every phase and runs under the profiler: not a steady step
    steady = [m["dt"] for m in metrics if m["step"] >= args.warmup and m["step"] != args.profile_step]
    result["step_dts"] = [round(m["dt"], 3) for m in metrics]
    result["step_end_s"] = [round(m["time"] - t0, 1) for m in metrics if "time" in m]
    # the allocator's cumulative retries (a cudaFree + retry under memory pressure, which synchronizes)
    result["alloc_retries"] = [m.get("alloc_retries") for m in metrics]
    if steady:
        dt = statistics.median(steady)
        result.update(step_s=dt, tok_s=args.total_batch / dt, tok_s_per_gpu=args.total_batch / dt / n)
    ranks = sorted((run_dir / "profile").glob("rank*.json"))
    result["ranks"] = [json.loads(p.read_text()) for p in ranks]
    for r in result["ranks"]:
        aff = r.get("cpu_affinity")
        r["cpu_affinity"] = f"{len(aff)} cpus {aff[0]}-{aff[-1]}" if aff else aff
    if result["ranks"]:
        result["peak_mem_gib"] = max(r["peak_mem_gib"] for r in result["ranks"])
    if rc != 0:
        result["tail"] = out[-3000:]
    return result



# -----------------------------------------------------------------------------
# Report


def report(results: list[dict]) -> None:
    base = {r["variant"]: r.get("tok_s_per_gpu") for r in results if r["gpus"] == 1}
    print(f"\n{'variant':8} {'GPUs':>4} {'step ms':>8} {'tok/s':>10} {'tok/s/GPU':>10} {'eff':>6} {'peak GiB':>9}  GPU util %")
    for r in results:
        if "tok_s" not in r:
            print(f"{r['variant']:8} {r['gpus']:>4}  failed (rc {r['rc']})")
            continue
        eff = r["tok_s_per_gpu"] / base[r["variant"]] if base.get(r["variant"]) else float("nan")
        print(f"{r['variant']:8} {r['gpus']:>4} {1000 * r['step_s']:>8.0f} {r['tok_s']:>10,.0f} "
              f"{r['tok_s_per_gpu']:>10,.0f} {eff:>6.3f} {r.get('peak_mem_gib', 0):>9.1f}  {r['gpu_util']}")
    print("\nwhile busy, per GPU: SM MHz mean/min, W mean/max, max C, clock-event reasons (bitmask: samples)")
    for r in results:
        for gpu, h in r.get("gpu_health", {}).items():
            print(f"{r['variant']:6} N={r['gpus']} GPU {gpu}: {h['sm_mhz_mean']}/{h['sm_mhz_min']:.0f} MHz, "
                  f"{h['power_w_mean']}/{h['power_w_max']:.0f} W, {h['temp_c_max']:.0f} C, {h['reasons']}")
    print("\nprofiled step, per rank (seconds): phases | wall | cpu")
    for r in results:
        for rank in r.get("ranks", []):
            phases = " ".join(f"{k}={v:.3f}" for k, v in rank["phases_s"].items())
            print(f"{r['variant']:6} N={r['gpus']} rank {rank['rank']}: {phases} | wall {rank['wall_s']:.3f} | "
                  f"cpu {rank['cpu_s']:.2f} | {rank['cpu_affinity']} | {rank['peak_mem_gib']:.1f} GiB")



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", type=Path, required=True, help="holds tokenizer/ and shards/ (see --make-data)")
    p.add_argument("--make-data", action="store_true", help="build a real-text corpus, tokenizer and shards first")
    p.add_argument("--max-chars", type=int, default=150_000_000)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--gpus", default="1,2,4", help="comma list of GPU counts")
    p.add_argument("--variants", default="fp8,torch", help="comma list of: " + ", ".join(VARIANT_FLAGS))
    p.add_argument("--config", default=str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"))
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--total-batch", type=int, default=524288)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compilation, FP8 switch)")
    p.add_argument("--profile-step", type=int, default=8)
    p.add_argument("--extra", default="", help="more training flags for every launch")
    p.add_argument("--timeout", type=int, default=420, help="seconds per launch")
    p.add_argument("--out", type=Path, default=None, help="JSON of every launch")


def run(args, p: argparse.ArgumentParser) -> int:
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    if max(gpu_counts) > 1 and any(os.environ.get(k) != v for k, v in NO_MULTICAST.items()):
        p.error("set " + " ".join(f"{k}={v}" for k, v in NO_MULTICAST.items()) + " (NVLink multicast off)")
    if args.make_data:
        make_data(args.base_dir, args.max_chars, args.vocab_size)
    results = []
    for variant in args.variants.split(","):
        for n in gpu_counts:
            results.append(launch(args, variant, n))
            r = results[-1]
            print(f"{variant} N={n}: rc {r['rc']}, {r['wall_s']}s, step dts {r['step_dts']}", flush=True)
            if args.out:
                write_json(args.out, results)
    report(results)
    return 0 if all(r["rc"] == 0 for r in results) else 1

