"""Multi-GPU scaling of the real training loop: per-GPU tok/s, step time, efficiency and peak memory.

    python benchmarks/multi_gpu.py --base-dir /tmp/mg --make-data --gpus 1,2,4 --variants fp8,torch \\
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
workplace's machines (docs/PERF.md, "Several GPUs (d20, DDP on one node)"); this script refuses to launch
several GPUs without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".pyi"}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
VARIANT_FLAGS = {"fp8": ["--fp8"], "torch": ["--kernels", "torch"], "fused": ["--kernels", "fused"]}


# -----------------------------------------------------------------------------
# Data: this installation's own text files


def corpus_roots(spec: str) -> list[Path]:
    """Comma list of directories; `python` stands for this installation's stdlib and site-packages."""
    roots = []
    for item in filter(None, spec.split(",")):
        if item == "python":
            paths = sysconfig.get_paths()
            roots += [paths["stdlib"], paths["purelib"], paths["platlib"]]
        else:
            roots.append(item)
    return sorted({Path(r) for r in roots if Path(r).is_dir()})


def write_source_corpus(out_dir: Path, max_chars: int, shards: int = 12, roots: str = "python",
                        suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> int:
    """Text files under `roots` with one of `suffixes`, each distinct text once, shuffled (in the order of their
    hashes), as about `shards` parquet files in nanochat's layout: one document in `shards` (by its hash, so
    every directory is represented) goes to the last file, the val split. Returns the characters written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(p for root in corpus_roots(roots) for p in root.rglob("*") if p.suffix in suffixes and p.is_file())
    out_dir.mkdir(parents=True, exist_ok=True)
    docs: dict[bytes, str] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= 200:  # tiny files carry no text worth training on
            docs.setdefault(hashlib.sha1(text.encode()).digest(), text)  # copies (one package in two places) once
    # Documents in the order of their hashes: a fixed shuffle. In path order the stream would move from one
    # kind of text to another (boost headers, then CUDA's, then Python...), and the final val bpb would
    # depend on which kind the warm-down happened to see.
    train, val, total, shard, in_shard = [], [], 0, 0, 0
    for digest in sorted(docs):
        text = docs[digest]
        total += len(text)
        if digest[-1] % shards == 0:
            val.append(text)
        else:
            train.append(text)
            in_shard += len(text)
            if in_shard >= max_chars // shards:
                pq.write_table(pa.table({"text": train}), out_dir / f"shard_{shard:05d}.parquet", row_group_size=256)
                train, shard, in_shard = [], shard + 1, 0
        if total >= max_chars:
            break
    for docs in (train, val):  # the val split last, as nanochat's layout has it
        if docs:
            pq.write_table(pa.table({"text": docs}), out_dir / f"shard_{shard:05d}.parquet", row_group_size=256)
            shard += 1
    return total


def make_data(base: Path, max_chars: int, vocab_size: int, roots: str = "python",
              suffixes: tuple[str, ...] = TEXT_SUFFIXES, tokenizer_chars: int = 2_000_000_000) -> None:
    t0 = time.time()
    chars = write_source_corpus(base / "base_data", max_chars, roots=roots, suffixes=suffixes)
    cli = [sys.executable, "-m", "nanochat_unsloth.cli"]
    subprocess.run(cli + ["tokenizer", "--base-dir", str(base), "--vocab-size", str(vocab_size),
                    "--max-chars", str(tokenizer_chars), "--force"], check=True)
    subprocess.run(cli + ["prep", "--base-dir", str(base), "--quiet", "--force"], check=True)
    print(f"data: {chars:,} characters -> tokenizer + shards in {time.time() - t0:.0f}s", flush=True)


# -----------------------------------------------------------------------------
# One launch


def start_training(base_dir: Path, tag: str, train_args: list[str], gpu: int | None = None,
                   processes: int = 1, config: str | None = None) -> subprocess.Popen:
    """Start the real loop in the background, its output appended to <base_dir>/<tag>.log: one process (on
    GPU `gpu` when given), or `processes` ranks through `accelerate launch` with configs/accelerate/multi_gpu.yaml
    (or `config`, which is launched even for one process: a DeepSpeed run on one GPU).
    Used by curve_check.py, resume_check.py and quality_runs.py."""
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    cmd = [sys.executable, "-m", "nanochat_unsloth.train", *train_args]
    if processes > 1 or config:
        cmd[1:2] = ["-m", "accelerate.commands.launch", "--config_file",
                    config or str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"), "--num_processes",
                    str(processes), "-m"]
    log = open(base_dir / f"{tag}.log", "a")
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)



def run_log(base_dir: Path, tag: str, name: str, missing_ok: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl / eval.jsonl as the loop reads them (a torn last line dropped).
    A log that does not exist yet is empty with `missing_ok`, else an error."""
    from nanochat_unsloth.checkpoint.logs import read_jsonl_records

    path = base_dir / "runs" / tag / name
    return [] if missing_ok and not path.exists() else read_jsonl_records(path)


class GpuSampler:
    """nvidia-smi every 0.5 s, in a thread, while a launch runs: each GPU's utilisation, SM clock, power,
    temperature and clock-event (throttle) reasons, so a slow GPU shows whether it was busy or held back."""

    FIELDS = ["index", "utilization.gpu", "clocks.sm", "power.draw", "temperature.gpu"]
    REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # newer, older drivers

    def __init__(self):
        self.samples: dict[int, list[dict]] = {}
        self._proc = None

    def _query(self) -> list[str] | None:
        for reasons in (*self.REASONS, None):
            fields = self.FIELDS + ([reasons] if reasons else [])
            probe = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return fields
        return None

    def __enter__(self):
        try:
            fields = self._query()
        except FileNotFoundError:
            return self
        if fields is None:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-lms", "500"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(len(fields),), daemon=True).start()
        return self

    def _read(self, n_fields: int):
        for line in self._proc.stdout:
            values = [v.strip() for v in line.split(",")]
            if len(values) != n_fields:
                continue
            try:
                sample = {"util": float(values[1]), "sm_mhz": float(values[2]), "power_w": float(values[3]),
                          "temp_c": float(values[4]), "t": time.time()}
            except ValueError:
                continue
            if n_fields > 5:
                sample["reasons"] = values[5]
            self.samples.setdefault(int(values[0]), []).append(sample)

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def mean(self) -> dict[int, float]:
        return {i: round(statistics.fmean(s["util"] for s in v), 1) for i, v in sorted(self.samples.items()) if v}

    def series(self, t0: float) -> dict[int, list]:
        """Every sample as [seconds since t0, util %, SM MHz, W, reasons], to line up with the steps' times."""
        return {i: [[round(s["t"] - t0, 1), s["util"], s["sm_mhz"], s["power_w"], s.get("reasons")] for s in v]
                for i, v in sorted(self.samples.items())}

    def summary(self) -> dict[int, dict]:
        """Per GPU, over the samples where it was busy (utilisation >= 50%): SM clock mean and min, power mean
        and max, the hottest temperature, and how often each clock-event reason bitmask was active."""
        out = {}
        for i, v in sorted(self.samples.items()):
            was_busy = any(s["util"] >= 50 for s in v)
            busy = [s for s in v if s["util"] >= 50] or v
            reasons: dict[str, int] = {}
            for s in busy:
                if "reasons" in s:
                    reasons[s["reasons"]] = reasons.get(s["reasons"], 0) + 1
            out[i] = {"busy": was_busy, "busy_samples": len(busy), "sm_mhz_mean": round(statistics.fmean(s["sm_mhz"] for s in busy)),
                      "sm_mhz_min": min(s["sm_mhz"] for s in busy),
                      "power_w_mean": round(statistics.fmean(s["power_w"] for s in busy)),
                      "power_w_max": max(s["power_w"] for s in busy), "temp_c_max": max(s["temp_c"] for s in busy),
                      "reasons": reasons}
        return out


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
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args = p.parse_args()
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
                args.out.write_text(json.dumps(results, indent=1))
    report(results)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
