"""Is a run on N GPUs the same run as on one GPU? A loss curve of N GPUs against two of one GPU.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python benchmarks/runs.py curve --base-dir /tmp/mg --gpus 4 --depth 12 --steps 200 --out curve.json

Three runs of the real loop on the same shards and settings (one step = --total-batch tokens, so 1 GPU
accumulates N times as many micro-batches as each of N GPUs):
    A, B: one GPU each, at the same time on GPUs 0 and 1 (one after the other on GPU 0 of a 1-GPU machine):
          their difference is this GPU's run-to-run noise (attention's backward accumulates with atomics), which
          grows as training amplifies it;
    N:    `accelerate launch --num_processes N` with configs/accelerate/multi_gpu.yaml, or with each of --configs
          in turn (e.g. the DeepSpeed ones: `runs.py deepspeed`; with --gpus 1, ZeRO on one process).
    controls (--controls NAME=FLAGS;...): more 1-GPU runs with A's flags plus FLAGS, a change that keeps the math
          and moves only the rounding (e.g. `--compile none`). A-B is the noise of one binary; A against a
          control is what a rounding change alone does, the yardstick for an N run that rounds differently by
          design (DeepSpeed's own Newton-Schulz). FLAGS beginning with @NAME run train_NAME.py (beside this
          file) instead of the loop: a change no flag makes (@wte_fp32: the embedding in fp32, as under ZeRO).
It prints the largest relative loss difference A-B and A-N in windows of steps, and every run's val bpb
(evaluated every --eval-every steps on the same val tokens). --base-dir must hold tokenizer/ and shards/
(`runs.py quality --base-dir DIR --make-data --data-only` writes them).

A run whose metrics.jsonl already holds --steps steps is not run again, so the runs can be spread over several
invocations (one device call each) with --runs, and a last invocation without --runs compares them all. The
comparison is made once every run has finished; until then the runs still missing are named.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import args_record, gpu_count, run_log, start_training, write_json


def launch_record(args, tag: str, n: int, config: str | None, flags: str = "") -> dict:
    """What a run was started with: its training flags (--extra, then a control's own), process count,
    accelerate config, and a control's script."""
    script, flags = control_script(flags)
    train = ["--base_dir", str(args.base_dir), "--depth", str(args.depth), "--device_batch_size",
             str(args.device_batch_size), "--total_batch_size", str(args.total_batch), "--num_iterations",
             str(args.steps), "--eval_every", str(args.eval_every), "--eval_tokens", str(args.eval_tokens),
             "--sample_every", "-1", "--model_tag", tag, "--force", *args.extra.split(), *flags.split()]
    return {"train": train, "processes": n, "config": config, **({"script": script} if script else {})}


def start(args, tag: str, n: int, gpu: int = 0, config: str | None = None, flags: str = "") -> subprocess.Popen:
    record = launch_record(args, tag, n, config, flags)
    write_json(args.base_dir / f"{tag}.launch.json", record)  # what `finished` compares a later invocation with
    return start_training(args.base_dir, tag, record["train"], gpu=gpu if n == 1 and not config else None,
                          processes=n, config=config, script=record.get("script"))


def finished(args, tag: str, n: int, config: str | None, flags: str = "") -> bool:
    """The run was started with this invocation's settings and its log holds all --steps steps (a run cut off
    midway starts again from step 0: `start` passes --force)."""
    launched = args.base_dir / f"{tag}.launch.json"
    return (launched.is_file() and json.loads(launched.read_text()) == launch_record(args, tag, n, config, flags)
            and len(run_log(args.base_dir, tag, "metrics.jsonl", missing_ok=True)) >= args.steps)


CONTROL_SCRIPTS = Path(__file__).resolve().parent  # "@NAME" in a control's FLAGS: train_NAME.py here


def control_script(flags: str) -> tuple[str | None, str]:
    """A control's FLAGS -> (the script that runs the loop with its change, or None for the loop itself; the
    training flags): "@wte_fp32 --compile none" -> (".../train_wte_fp32.py", "--compile none")."""
    first, _, rest = flags.partition(" ")
    if first.startswith("@"):
        return str(CONTROL_SCRIPTS / f"train_{first[1:]}.py"), rest.strip()
    return None, flags


def parse_controls(text: str, p: argparse.ArgumentParser) -> dict[str, str]:
    """--controls "NAME=FLAGS;NAME=FLAGS" as {name: flags}; one line naming the flag for a malformed entry."""
    controls = {}
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        name, _, flags = entry.partition("=")
        if not name.isidentifier() or not flags.strip() or name in ("a", "b", "n") or name in controls:
            p.error(f"--controls: {entry!r} is not NAME=FLAGS with a new name (e.g. compile_none=--compile none)")
        script, _ = control_script(flags.strip())
        if script and not Path(script).is_file():
            p.error(f"--controls: {entry!r}: no {script} (FLAGS may begin with @NAME for train_NAME.py beside curve.py)")
        controls[name] = flags.strip()
    return controls


def max_rel_gaps(values: list[float], ref: list[float], windows: list[tuple[int, int]]) -> list[float]:
    """The largest |values - ref| / |ref| over the steps of each window [lo, hi)."""
    return [max(abs(values[s] - ref[s]) / abs(ref[s]) for s in range(lo, hi)) for lo, hi in windows]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", type=Path, required=True)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--configs", default="",
                   help="comma-separated accelerate configs for the N-GPU run(s), each against the same 1-GPU pair "
                        "(default: configs/accelerate/multi_gpu.yaml, i.e. DDP; none: the 1-GPU runs alone)")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--total-batch", type=int, default=65536, help="tokens per step (4 GPUs x 8 x 2048 by default)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=524288)
    p.add_argument("--extra", default="--kernels torch", help="more training flags for every run")
    p.add_argument("--controls", default="", help="semicolon list of NAME=FLAGS: more 1-GPU runs with --extra plus "
                   "FLAGS, a rounding change with the same math (e.g. 'compile_none=--compile none'), compared "
                   "with A like the N runs")
    p.add_argument("--runs", default="", help="comma list of the runs to start in this invocation: a, b, each "
                   "control's name, and n (or each --configs file's name, e.g. deepspeed_zero2); default all that "
                   "have not finished")
    p.add_argument("--out", type=Path)


def run(args, p: argparse.ArgumentParser) -> int:
    configs = ({} if args.configs == "none" else {"n": None} if not args.configs
               else {Path(c).stem: c for c in args.configs.split(",") if c})
    controls = parse_controls(args.controls, p)
    tags = {"a": "curve_1gpu_a", "b": "curve_1gpu_b", **{name: f"curve_1gpu_{name}" for name in controls}}
    tags.update({name: f"curve_{args.gpus}gpu" if config is None else f"curve_{name}_{args.gpus}gpu"
                 for name, config in configs.items()})
    wanted = [r for r in args.runs.split(",") if r] or list(tags)
    if unknown := [r for r in wanted if r not in tags]:
        p.error(f"--runs: unknown {unknown}; choose from {', '.join(tags)}")
    # (processes, accelerate config, a control's own flags)
    launches = {"a": (1, None, ""), "b": (1, None, ""), **{name: (1, None, f) for name, f in controls.items()},
                **{name: (args.gpus, config, "") for name, config in configs.items()}}
    todo = [k for k in wanted if not finished(args, tags[k], *launches[k])]

    rcs = {}
    singles = [k for k in ("a", "b", *controls) if k in todo]
    gpus = max(1, gpu_count())  # none: a CPU smoke run, one at a time
    for i in range(0, len(singles), gpus):  # one per GPU at a time (sharing one, each would run at half speed)
        runs = {k: start(args, tags[k], 1, gpu, flags=launches[k][2]) for gpu, k in enumerate(singles[i:i + gpus])}
        rcs.update({k: proc.wait() for k, proc in runs.items()})
    for name in (k for k in todo if k in configs):  # one after another: each uses all --gpus GPUs
        rcs[name] = start(args, tags[name], args.gpus, config=configs[name]).wait()
    if any(rcs.values()):
        raise SystemExit(f"exit codes {rcs}; see the logs in {args.base_dir}")
    if missing := [k for k, t in tags.items() if not finished(args, t, *launches[k])]:
        print(f"not finished yet: {', '.join(missing)}; run them (--runs), then compare with no --runs")
        return 0

    metrics = {k: run_log(args.base_dir, t, "metrics.jsonl") for k, t in tags.items()}
    loss = {k: [m["loss"] for m in records] for k, records in metrics.items()}
    val = {k: [(e["step"], e["val_bpb"]) for e in run_log(args.base_dir, t, "eval.jsonl")] for k, t in tags.items()}
    windows = [(lo, min(hi, args.steps)) for lo, hi in ((0, 10), (10, 50), (50, 100), (100, args.steps))
               if lo < args.steps]

    others = [k for k in tags if k not in ("a", "b")]
    result = {
        "args": args_record(args),
        "windows": [f"{lo}-{hi - 1}" for lo, hi in windows],
        "a_vs_b_max_rel": max_rel_gaps(loss["b"], loss["a"], windows),
        **{f"a_vs_{k}_max_rel": max_rel_gaps(loss[k], loss["a"], windows) for k in others},
        "val_bpb": val, "loss": loss,
        "tok_per_sec_median": {k: sorted(m["tok_per_sec"] for m in records)[args.steps // 2]
                               for k, records in metrics.items()},
        "peak_mem_gib": {k: max(m["peak_mem_gib"] for m in records) for k, records in metrics.items()},
    }
    print(f"steps            {'  '.join(f'{w:>10}' for w in result['windows'])}")
    labels = [("a_vs_b_max_rel", "1 GPU vs 1 GPU")]
    labels += [(f"a_vs_{k}_max_rel", f"1 GPU vs 1 GPU {k}" if k in controls else
                f"1 GPU vs {args.gpus} GPUs" + ("" if k == "n" else f" {k}")) for k in others]
    for key, label in labels:
        print(f"{label:16} {'  '.join(f'{v:10.2e}' for v in result[key])}")
    for k, v in val.items():
        print(f"val bpb {k}: " + ", ".join(f"{s}: {b:.5f}" for s, b in v))
    for k in tags:
        print(f"{k}: median tok/s {result['tok_per_sec_median'][k]:,.0f}, peak memory {result['peak_mem_gib'][k]:.1f} GiB")
    if args.out:
        write_json(args.out, result)
    return 0

