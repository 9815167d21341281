"""What DeepSpeed ZeRO still has to prove on GPUs (docs/MULTI_GPU.md, "DeepSpeed ZeRO"): curves, then speed.

    python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 2

With the deepspeed extra installed (pip install -e '.[deepspeed]'; on a machine without internet, the archive
of benchmarks/gpu_extras.sh):
1. Curves (`curve`): 100-step d12 loss curves of ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload on --gpus GPUs against
   the same pair of 1-GPU runs (their gap is the GPU's own run-to-run spread), val bpb every 25 steps. Within
   that spread at every window = the same step math on GPUs; offload outside it = refuse offload with the figure.
   Controls, our path with one change each, show what a change of rounding alone does: the yardstick for ZeRO
   runs, which round differently by design. `--compile none` and `--compile blocks` (ZeRO-3's and ZeRO-2's
   compile), and wte in fp32 as under ZeRO (nanochat's is bf16 on CUDA), alone and uncompiled.
   d12 at total batch 65,536 = N GPUs x 8 x 2048 x (4/N) accumulation steps: divisible for N = 1, 2, 4, 8.
   --gpus 1 runs ZeRO on one process (still DeepSpeed's partitioned step, accumulation boundary and offload,
   without the collectives between ranks), and the 1-GPU pair one after the other.
2. Speed and memory at d20 (`scaling`, the torch path): DDP against ZeRO-2 (target: >= 0.90x DDP's tok/s with
   less memory per GPU), and ZeRO-3 / ZeRO-3 + offload for the memory they save. Needs --gpus 2 or more
   (`scaling` launches one GPU without an accelerate config).
3. Compare (`--part compare --from CURVES.json,CONTROLS.json`): the curves and controls of earlier invocations
   (also of different machines), each ZeRO run against every run of our own path, next to the spread of our
   own path's repeated runs (A and B of each file, and across files): which of our runs each ZeRO run is as
   close to as A is to B. Prints the gaps and writes them to --out.
--part picks one of them; --runs (curves only) starts only the named runs, so that they can be spread over
several device calls: a finished run is reused, and the comparison is printed once all have finished.
The corpus, tokenizer and shards of `quality --make-data` are built first when --base-dir has no shards. NVLink
multicast is switched off for every launch (this workplace's machines). Both steps write JSON next to the logs
in --base-dir; the figures go to docs/PERF.md. Stops at the first step that fails.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import NO_MULTICAST, REPO, make_data, write_json

from real_runs import curve, scaling

CONFIGS = REPO / "configs" / "accelerate"
ZERO_CONFIGS = ("deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
# our own path compiled as ZeRO-3 (not at all) and ZeRO-2 (block by block) are, and with wte in fp32 as under
# ZeRO: what each precision change alone does to the curve, against which the ZeRO runs' gap to A is read (they
# also run DeepSpeed's Newton-Schulz)
CONTROLS = ("compile_none=--compile none;compile_blocks=--compile blocks;"
            "wte_fp32=@wte_fp32;wte_fp32_eager=@wte_fp32 --compile none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", type=Path, default=Path("/tmp/ds"))
    p.add_argument("--gpus", type=int, default=2, help="GPUs for the N-GPU curves and the speed runs")
    p.add_argument("--part", choices=("all", "curves", "controls", "speed", "compare"), default="all",
                   help="all: the curves, then the speed runs (with --gpus 1, the curves alone); controls: only "
                        "the 1-GPU pair and the controls, compared on their own (one GPU; the ZeRO runs' curves "
                        "from an earlier machine are read against the same pair's spread)")
    p.add_argument("--runs", default="", help="curves, controls: comma list of the runs to start now, of a, b (the "
                   "1-GPU pair), the controls (" + ", ".join(c.split("=")[0] for c in CONTROLS.split(";")) + ") and "
                   + ", ".join(ZERO_CONFIGS) + "; default every one not yet finished")
    p.add_argument("--from", dest="from_", default="", help="compare: comma list of the JSON files the curves and "
                   "controls parts wrote (a run's name may repeat across files only for a and b)")
    p.add_argument("--out", type=Path, help="compare: where its JSON goes")


def subcommand_args(module, argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """`argv` parsed as `module`'s own command line would be (its defaults for everything not named)."""
    p = argparse.ArgumentParser(prog=f"runs.py {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(p)
    return p.parse_args(argv), p


def compare(paths: list[Path], p: argparse.ArgumentParser) -> dict:
    """Every ZeRO run's largest relative loss gap per window of steps to each run of our own path, and the gaps of
    our own path's repeated runs (A-B within each file, and A and B across files), which bound the noise. One
    file's a and b are named a@1, b@1 (the file's place in --from)."""
    loss, windows = {}, None
    for i, path in enumerate(paths, 1):
        try:
            data = json.loads(path.read_text())
            runs, wins = data["loss"], data["windows"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--from {path}: not a curves or controls JSON of this script ({e})")
        if windows not in (None, wins):
            p.error(f"--from {path}: windows {wins}, the first file's are {windows}; compare runs of equal length")
        windows = wins
        for name, values in runs.items():
            key = f"{name}@{i}" if name in ("a", "b") else name
            if key in loss:
                p.error(f"--from {path}: run {name!r} is in an earlier file too; compare each run once")
            loss[key] = values
    spans = [(lo, hi + 1) for lo, hi in (map(int, w.split("-")) for w in windows)]  # "0-9": steps 0 to 9

    def gaps(x, y):  # relative to y, one of our own runs
        return curve.max_rel_gaps(loss[x], loss[y], spans)

    ours = [k for k in loss if k not in ZERO_CONFIGS]
    repeats = [k for k in ours if k.split("@")[0] in ("a", "b")]
    noise = {f"{x} vs {y}": gaps(x, y) for i, x in enumerate(repeats) for y in repeats[i + 1:]}
    if not noise:  # the yardstick: without two runs of our own path the gaps mean nothing
        p.error(f"--from: no pair of our own runs (a, b) in {', '.join(map(str, paths))}")
    zero = {z: {k: gaps(z, k) for k in ours} for z in ZERO_CONFIGS if z in loss}
    if not zero:
        p.error(f"--from: no run of {', '.join(ZERO_CONFIGS)} in {', '.join(map(str, paths))}")
    controls = {f"{c} vs {a}": gaps(c, a) for c in ours if c not in repeats for a in repeats if a.startswith("a@")}
    return {"windows": windows, "noise": noise, "controls_vs_a": controls, "zero": zero,
            "noise_max": [max(v[w] for v in noise.values()) for w in range(len(windows))]}


def print_compare(result: dict) -> None:
    head = "  ".join(f"{w:>9}" for w in result["windows"])
    print(f"{'our repeated runs (the noise)':40} {head}")
    for name, v in [*result["noise"].items(), ("largest", result["noise_max"])]:
        print(f"  {name:38} " + "  ".join(f"{g:9.2e}" for g in v))
    print(f"{'our controls against A':40} {head}")
    for name, v in result["controls_vs_a"].items():
        print(f"  {name:38} " + "  ".join(f"{g:9.2e}" for g in v))
    for z, against in result["zero"].items():
        print(f"{z + ' against':40} {head}  (x the noise, last window)")
        for name, v in sorted(against.items(), key=lambda kv: kv[1][-1]):
            ratio = f"{v[-1] / result['noise_max'][-1]:.2f}x" if result["noise_max"][-1] else "-"
            print(f"  {name:38} " + "  ".join(f"{g:9.2e}" for g in v) + f"  {ratio}")


def run(args, p: argparse.ArgumentParser) -> int:
    if args.part == "compare":
        if not args.from_:
            p.error("--part compare needs --from CURVES.json,CONTROLS.json")
        result = compare([Path(f) for f in args.from_.split(",") if f], p)
        print_compare(result)
        if args.out:
            write_json(args.out, {"from": args.from_, **result})
        return 0
    if args.part == "speed" and args.gpus < 2:
        p.error("--part speed needs --gpus 2 or more: `scaling` runs one GPU without an accelerate config")
    os.environ.update(NO_MULTICAST)
    base, gpus = args.base_dir, str(args.gpus)
    if not (base / "shards" / "manifest.json").is_file():
        make_data(base, 150_000_000, 65536)
    rc = 0
    if args.part in ("all", "curves"):
        rc = curve.run(*subcommand_args(curve, [
            "--base-dir", str(base), "--gpus", gpus, "--depth", "12", "--steps", "100", "--eval-every", "25",
            "--configs", ",".join(str(CONFIGS / f"{name}.yaml") for name in ZERO_CONFIGS), "--runs", args.runs,
            "--controls", CONTROLS,
            "--out", str(base / f"deepspeed_curves_d12_{gpus}gpu.json")]))
    if args.part == "controls":
        rc = curve.run(*subcommand_args(curve, [
            "--base-dir", str(base), "--gpus", "1", "--depth", "12", "--steps", "100", "--eval-every", "25",
            "--configs", "none", "--runs", args.runs, "--controls", CONTROLS,
            "--out", str(base / "deepspeed_controls_d12_1gpu.json")]))
    if args.part in ("curves", "controls") or args.gpus < 2:
        return rc
    for config in ("multi_gpu", *ZERO_CONFIGS):
        if rc:
            return rc
        rc = scaling.run(*subcommand_args(scaling, [
            "--base-dir", str(base), "--gpus", gpus, "--variants", "torch", "--depth", "20", "--steps", "12",
            "--config", str(CONFIGS / f"{config}.yaml"), "--out", str(base / f"speed_d20_{config}_{gpus}gpu.json")]))
    return rc
