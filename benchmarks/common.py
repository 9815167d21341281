"""What the benchmark scripts share: one place for each helper, so no script imports another.

Read top to bottom:
    paths and JSON output    REPO, NO_MULTICAST, write_json (atomic), args_record
    GPUs                     gpu_count, GpuSampler (nvidia-smi in a thread while something runs)
    one configuration        KERNEL_VARIANTS / MEMORY_VARIANTS (the names train_throughput.py, activation_memory.py
                             and vs_nanochat.py take), model_options, run_configuration (a subprocess that prints
                             `RESULT <json>`), format_row
    data                     write_source_corpus + make_data (a real-text corpus, tokenizer and shards from this
                             Python installation's own files), make_shard_dir (random token shards)
    real runs                start_training (the real loop, in the background), run_log (its metrics / evals)

Nothing here imports torch or the package at module level: `runs.py --help` stays fast.
"""

from __future__ import annotations

import hashlib
import itertools
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
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".pyi"}  # write_source_corpus's default file kinds
SHARD_VOCAB, SHARD_BOS = 65536, 65527  # make_shard_dir's random tokens
# This workplace's machines have NVLink multicast off: NCCL and symmetric memory must not try it (docs/PERF.md,
# "Several GPUs (d20, DDP on one node)")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# -----------------------------------------------------------------------------
# JSON output


def write_json(path: str | Path, data) -> None:
    """`data` as indented JSON at `path`, written to a temporary file first and renamed over it, so a reader (or
    a device call cut off mid-write) never sees half a file. Scripts rewrite their --out after every
    configuration or launch: what finished is kept even if a later one hangs."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def args_record(args) -> dict:
    """A parsed command line as strings, for the "args" entry of a script's JSON."""
    return {k: str(v) for k, v in vars(args).items()}


# -----------------------------------------------------------------------------
# GPUs


def gpu_count() -> int:
    """CUDA devices this process sees; 0 without torch or CUDA (CPU smoke tests)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


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


# -----------------------------------------------------------------------------
# One configuration of a single-process benchmark (train_throughput.py, activation_memory.py, vs_nanochat.py)

KERNEL_VARIANTS = {  # name -> the ModelOptions (training flags) it sets
    "torch": {"kernels": "torch"},
    "torch-blocks": {"kernels": "torch", "compile": "blocks"},
    "torch-fp8": {"kernels": "torch", "fp8": True},
    "fused": {"kernels": "fused"},
    "fused-fp8": {"kernels": "fused", "fp8": True},
    "fused-fp8-dynamic": {"kernels": "fused", "fp8": True, "fp8_scaling": "dynamic"},
    "fused-fp8-delayed": {"kernels": "fused", "fp8": True, "fp8_scaling": "delayed"},
    # `fused-fp8` caches its FP8 weights once per step (`--fp8_weight_cache auto`); this one quantises per micro-step
    "fused-fp8-nocache": {"kernels": "fused", "fp8": True, "fp8_weight_cache": "off"},
    "fused-model": {"kernels": "fused", "compile": "model", "cuda_graphs": "off"},
    "fused-fp8-model": {"kernels": "fused", "fp8": True, "compile": "model", "cuda_graphs": "off"},
    "fused-cg": {"kernels": "fused", "compile": "model", "cuda_graphs": "on"},
    "fused-fp8-cg": {"kernels": "fused", "fp8": True, "compile": "model", "cuda_graphs": "on"},
    "torch-cg": {"kernels": "torch", "cuda_graphs": "on"},
    "torch-nocg": {"kernels": "torch", "cuda_graphs": "off"},
}
# torchao's float8 recipes on the fused set: fused-fp8-torchao_tensorwise, fused-fp8-torchao_rowwise
KERNEL_VARIANTS.update({f"fused-fp8-{r}": {"kernels": "fused", "fp8": True, "fp8_recipe": r}
                        for r in ("torchao_tensorwise", "torchao_rowwise")})
# the fused set's former name, as the older records in docs/perf-log/ spell it
KERNEL_VARIANTS.update({k.replace("fused", "unsloth"): v for k, v in list(KERNEL_VARIANTS.items()) if "fused" in k})
MEMORY_VARIANTS = {
    "fast": {"memory": "fast"},
    "lean": {"memory": "lean"},
    "lean-offload": {"memory": "lean", "lean_checkpoint": "offload"},
    "lean-torch": {"memory": "lean", "lean_checkpoint": "torch"},
    "selective": {"memory": "selective"},
}


def memory_variant(name: str) -> dict:
    """The ModelOptions of a --memory name; "lean-K" / "selective-K" only the first K blocks (`--lean_blocks K`)."""
    if name in MEMORY_VARIANTS:
        return MEMORY_VARIANTS[name]
    prefix, _, k = name.rpartition("-")
    if prefix in ("lean", "selective") and k.isdigit():
        return {**MEMORY_VARIANTS[prefix], "lean_blocks": int(k)}
    raise KeyError(name)


def model_options(kernels: str, memory: str, batch_size: int, seq: int, device):
    """The ModelOptions of a configuration on `device`, its `auto`s resolved as the loop resolves a run's."""
    from nanochat_unsloth.train.config import TrainConfig
    from nanochat_unsloth.train.resolve import model_options as options_of, resolve

    cfg = TrainConfig(**KERNEL_VARIANTS[kernels], **memory_variant(memory), device_batch_size=batch_size,
                      max_seq_len=seq)
    cfg.validate()
    return options_of(cfg, resolve(cfg, device))


def run_configuration(cmd: list[str], env: dict, timeout: int, head: dict) -> dict:
    """Run one configuration's subprocess (`cmd` prints `RESULT <json>`); its result, or `head` with an error
    (OOM, timeout, the last stderr line).

    Each GPU's SM clock and power are sampled meanwhile (`gpu_health`): an H100 under a bf16 step sits at its
    power cap with its clock under the maximum (docs/perf-log/2026-11-28.md, "Several GPUs, continued"), and how
    far depends on its temperature, so configurations compared in one invocation should show similar clocks."""
    t0 = time.time()
    try:
        with GpuSampler() as gpus:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        err = proc.stderr.strip().splitlines()
        if lines:
            result = json.loads(lines[-1][len("RESULT "):])
            result["notices"] = [ln for ln in err if ln.startswith("notice:")]
        else:
            oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
            result = dict(head, error="OOM" if oom else (err[-1][:300] if err else f"exit {proc.returncode}"),
                          stderr_tail="\n".join(err[-25:]))
    except subprocess.TimeoutExpired as e:
        err = (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or "").strip().splitlines()
        result = dict(head, error=f"timeout {timeout}s", stderr_tail="\n".join(err[-25:]))
    result["wall_s"] = time.time() - t0
    result["gpu_health"] = {str(i): h for i, h in gpus.summary().items() if h["busy"]}
    return result


def format_row(r: dict) -> str:
    """One line of a run_configuration result (train_throughput.py's format; vs_nanochat.py prints both sides in it)."""
    head = f"d{r['depth']} kernels={r['kernels']:<12} B={r['batch_size']:<3} memory={r['memory']:<12}"
    if "error" in r:
        return f"{head} | {r['error']} ({r.get('wall_s', 0):.0f}s)"
    clocks = " ".join(f"GPU{i} {h['sm_mhz_mean']} MHz {h['power_w_mean']} W" for i, h in r.get("gpu_health", {}).items())
    # CUDA graphs keep their pool reserved beside the allocator's peak: print both
    return (f"{head} | {r['tok_per_s']:>9,.0f} tok/s | MFU {r['mfu']:5.1f}% | peak {r['peak_alloc_gib']:5.1f} GiB "
            f"(reserved {r.get('peak_reserved_gib', 0):.1f}) | step {r['median_step_s'] * 1000:6.0f} ms "
            f"| loss {r['losses'][-1]:.4f} | compile={r['compile']}{'+cuda_graphs' if r.get('cuda_graphs') else ''} | "
            f"{r.get('wall_s', 0):.0f}s" + (f" | {clocks}" if clocks else ""))


# -----------------------------------------------------------------------------
# Data


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
                        suffixes: tuple[str, ...] = TEXT_SUFFIXES, val_every: int = 12) -> int:
    """Text files under `roots` with one of `suffixes`, each distinct text once, shuffled (in the order of their
    hashes), as about `shards` parquet files in nanochat's layout: about one document in `val_every` (by its
    hash, so every directory is represented) goes to the last file, the val split. Returns the characters
    written."""
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
        if digest[-1] % val_every == 0:
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


DATA_RECIPE = "data_recipe.json"  # make_data's options, beside the shards it wrote


def make_data(base: Path, max_chars: int, vocab_size: int, roots: str = "python",
              suffixes: tuple[str, ...] = TEXT_SUFFIXES, tokenizer_chars: int = 2_000_000_000,
              val_every: int = 12) -> None:
    """<base>/base_data (write_source_corpus), then a `vocab_size` tokenizer trained on it and the prepped
    shards, with this package's own `tokenizer` and `prep` commands: a base dir the real loop trains from."""
    t0 = time.time()
    chars = write_source_corpus(base / "base_data", max_chars, roots=roots, suffixes=suffixes, val_every=val_every)
    cli = [sys.executable, "-m", "nanochat_unsloth.cli"]
    subprocess.run(cli + ["tokenizer", "--base-dir", str(base), "--vocab-size", str(vocab_size),
                    "--max-chars", str(tokenizer_chars), "--force"], check=True)
    subprocess.run(cli + ["prep", "--base-dir", str(base), "--quiet", "--force"], check=True)
    # how the shards were made, for the summaries of runs on them (a later command that trains on the same
    # base dir without --make-data would otherwise record its own default data options)
    write_json(base / DATA_RECIPE, {"max_chars": max_chars, "vocab_size": vocab_size, "roots": roots,
                                    "suffixes": list(suffixes), "tokenizer_chars": tokenizer_chars,
                                    "val_every": val_every, "characters": chars})
    print(f"data: {chars:,} characters -> tokenizer + shards in {time.time() - t0:.0f}s", flush=True)


def make_shard_dir(root: Path, tokens: int, shard_tokens: int, seed: int = 0) -> None:
    """A train split of random tokens (vocab 65,536) in `shard_tokens`-token shards with its manifest, in the
    page cache: what loader_throughput.py and shard_verify.py time, without prep or a tokenizer."""
    import numpy as np

    from nanochat_unsloth.shards.format import write_shard
    from nanochat_unsloth.shards.manifest import ShardEntry, ShardManifest, TokenizerFingerprint

    rng = np.random.default_rng(seed)
    entries, i, left = [], 0, tokens
    while left > 0:
        n = min(shard_tokens, left)
        ids = rng.integers(0, SHARD_VOCAB, n, dtype=np.uint16)
        info = write_shard(root / f"train_{i:06d}.bin", ids, SHARD_VOCAB, SHARD_BOS)
        entries.append(ShardEntry(file=info.file, split="train", tokens=n, documents=0, sha256=info.sha256))
        i, left = i + 1, left - n
    fp = TokenizerFingerprint(sha256="0" * 64, vocab_size=SHARD_VOCAB, bos_id=SHARD_BOS)
    ShardManifest(tokenizer=fp, source={"kind": "benchmark"}, shard_tokens=shard_tokens, shards=entries).save(root)
    os.sync()  # let writeback finish now rather than during the timing
    for path in root.glob("*.bin"):  # warm the page cache
        path.read_bytes()


# -----------------------------------------------------------------------------
# Real runs of the loop


def start_training(base_dir: Path, tag: str, train_args: list[str], gpu: int | tuple[int, ...] | None = None,
                   processes: int = 1, config: str | None = None, script: str | None = None,
                   port: int | None = None) -> subprocess.Popen:
    """Start the real loop in the background, its output appended to <base_dir>/<tag>.log: one process (on
    GPU `gpu`, or the GPUs of a tuple, when given), or `processes` ranks through `accelerate launch` with
    configs/accelerate/multi_gpu.yaml (or `config`, which is launched even for one process: a DeepSpeed run on one
    GPU), its rendezvous on `port` where several such launches run at once.
    `script`: a file that runs the loop with one change made for a control run (runs.py curve --controls), one
    process only. Used by the runs.py subcommands that start runs in the background (curve, resume, quality)."""
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu)) if isinstance(gpu, tuple) else str(gpu)
    cmd = [sys.executable, "-m", "nanochat_unsloth.train", *train_args]
    if script:
        if processes > 1 or config:
            raise ValueError(f"{script}: a control script runs one process, without an accelerate config")
        cmd[1:3] = [str(script)]
    if processes > 1 or config:
        cmd[1:2] = ["-m", "accelerate.commands.launch", "--config_file",
                    config or str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"), "--num_processes",
                    str(processes), *(["--main_process_port", str(port)] if port else []), "-m"]
    log = open(base_dir / f"{tag}.log", "a")
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def run_log(base_dir: Path, tag: str, name: str, missing_ok: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl / eval.jsonl as the loop reads them (a torn last line dropped).
    A log that does not exist yet is empty with `missing_ok`, else an error."""
    from nanochat_unsloth.checkpoint.logs import read_jsonl_records

    path = base_dir / "runs" / tag / name
    return [] if missing_ok and not path.exists() else read_jsonl_records(path)


# ---- micro-benchmarks ----------------------------------------------------------------------------

def micro_device(name: str):
    """`--device`'s torch.device; exits 2 with one line when CUDA is asked for and there is none."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU (use --device cpu for a smoke test)", file=sys.stderr)
        raise SystemExit(2)
    return torch.device(name)


def launch_shapes(module, **choices):
    """Every combination of a kernel module's launch constants (e.g. NUM_WARPS=(2, 4, 8)), set on the module
    in turn and yielded as a tuple; the module's own values come back afterwards."""
    names = list(choices)
    default = [getattr(module, n) for n in names]
    try:
        for values in itertools.product(*choices.values()):
            for n, v in zip(names, values):
                setattr(module, n, v)
            yield values
    finally:
        for n, v in zip(names, default):
            setattr(module, n, v)
