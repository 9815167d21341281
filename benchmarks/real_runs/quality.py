"""Equal quality on data the model cannot memorise: the exact path against --fp8, several seeds, one GPU each.

    python benchmarks/runs.py quality --base-dir /tmp/q --make-data --depth 12 --tokens 150000000 \\
        --variants torch,fp8 --seeds 42,43 --out quality.json

Every (variant, seed) is one run of the real loop (`python -m nanochat_unsloth.train`), on a GPU of its own
when there are enough (they run at the same time; more runs than GPUs queue), or with --gpus-per-run K on K
GPUs of its own as one data-parallel run (the same step math in about 1/K of the time: a d20 run that needs a
whole device session on one GPU fits one or two calls on a node). Each run trains --tokens
tokens (a whole schedule, warm-down included: `--num_iterations` = tokens / total batch), evaluates val bpb
every --eval-every steps, checkpoints every --save-every steps and starts with `--resume auto`: when a device
call's time runs out, the same command continues every run where its last checkpoint left it. --deadline S
ends a call on time: at S seconds every run gets SIGTERM, saves at its step boundary and stops (exit 3).

The corpus is never repeated: `quality` refuses to start when the train split holds fewer than --tokens
tokens. --make-data writes one from this Python installation's own text (common.make_data).

Reported, per run: the final val bpb and the training seconds (sum of step times). Per variant: the mean
final val bpb and its seed-to-seed spread (max - min). Then whether --fp8's mean lies within the spread of
the exact path, and the training seconds each --fp8 run took to first reach the exact path's mean final val
bpb (the time-to-equal-bpb ratio, the fair speed-up when FP8 costs quality) and, the other way round, the
exact path's seconds to --fp8's mean final bpb over --fp8's own (an upper bound on its speed-up at equal bpb,
defined even when --fp8 never reaches the exact path). For runs made on different machines, whose seconds do
not compare, the same in optimizer steps (linear between evaluations), times --step-speedup (each variant's
per-step speed over the exact path's, from one vs_nanochat.py invocation). --plot draws the curves.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import time
from pathlib import Path

from common import DATA_RECIPE, args_record, gpu_count, make_data, run_log, start_training, write_json

from nanochat_unsloth.common import EXIT_INTERRUPTED, EXIT_STOPPED  # plain constants: no torch at import

# "fp8" is --fp8 as it defaults (dynamic scaling since 2026-12-06; delayed before, as older records mean it)
VARIANTS = {"torch": ["--kernels", "torch"], "fused": ["--kernels", "fused"], "fp8": ["--fp8"],
            "fp8-dynamic": ["--fp8", "--fp8_scaling", "dynamic"],
            "fp8-delayed": ["--fp8", "--fp8_scaling", "delayed"],
            "torchao-tensorwise": ["--fp8", "--fp8_recipe", "torchao_tensorwise"],
            "torchao-rowwise": ["--fp8", "--fp8_recipe", "torchao_rowwise"]}
EXACT = "torch"  # nanochat's step math; --fp8 is measured against it
# a run's exits after a SIGTERM: stopped with a checkpoint, before its first one, or while Python still starts
STOP_CODES = (EXIT_STOPPED, EXIT_INTERRUPTED, -signal.SIGTERM)
DEADLINE_GRACE_S = 120  # after --deadline's SIGTERM: then the runs still going are killed
START = time.time()  # --deadline counts from here: a --make-data in the same command is part of the call
# 150M never-repeated tokens need several hundred MB of text: the Python installation's sources and docs alone
# gave 120M characters (27M tokens) on the GPU image, so headers and sources of C/C++/CUDA and system docs too
TEXT_ROOTS = "python,/usr/include,/usr/local/include,/usr/local/cuda/include,/usr/share/doc"
# --make-data's options: recorded only by the command that used them (the shards' own recipe is data_recipe.json)
DATA_OPTIONS = ("max_chars", "text_roots", "text_suffixes", "val_every", "tokenizer_chars")
TEXT_SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt", ".h", ".hpp", ".hxx", ".c", ".cc", ".cpp", ".cu", ".cuh")


def train_tokens(base_dir: Path) -> int:
    manifest = json.loads((base_dir / "shards" / "manifest.json").read_text())
    return sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")


def shards_sha256(base_dir: Path) -> str:
    """The fingerprint of the tokens the runs train and evaluate on (ShardManifest.fingerprint, as a checkpoint
    records it): runs compared across invocations, or machines, must share it, since val bpb on other val
    tokens is another number."""
    from nanochat_unsloth.shards.manifest import ShardManifest

    return ShardManifest.load(base_dir / "shards").fingerprint()


def branch(args, tag: str) -> list[str]:
    """--branch-from RUN:STEP: a run with no checkpoint of its own starts from RUN's checkpoint at STEP (copied,
    with RUN's logs up to it), so every variant trains the same steps after it from the same weights.
    -> the flags that allow the variant's settings to differ from RUN's."""
    if not args.branch_from:
        return []
    import shutil

    from nanochat_unsloth.checkpoint.logs import read_jsonl_records
    from nanochat_unsloth.checkpoint.store import list_checkpoints, step_dir_name

    source, step = args.branch_from.rsplit(":", 1)
    src, dst = args.base_dir / "runs" / source, args.base_dir / "runs" / tag
    if not list_checkpoints(dst):
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / step_dir_name(int(step)), dst / step_dir_name(int(step)))
        for name in ("metrics.jsonl", "eval.jsonl"):
            if (src / name).exists():  # RUN's records up to STEP: the branch's history
                kept = [r for r in read_jsonl_records(src / name) if r["step"] < int(step)]
                (dst / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return ["--force"]


def start(args, variant: str, seed: int, gpu: int | tuple[int, ...] | None, num_iterations: int) -> subprocess.Popen:
    """One (variant, seed) run: on one GPU (or the CPU), or on a tuple of GPUs as one data-parallel run (the same
    step math: each rank takes its share of the --total-batch, so fewer micro-steps each)."""
    tag = f"q_{variant}_s{seed}"
    extra = branch(args, tag)
    flags = VARIANTS[variant]
    train = ["--base_dir", str(args.base_dir), "--depth", str(args.depth),
             "--device_batch_size", str(args.device_batch_size), "--total_batch_size", str(args.total_batch),
             "--num_iterations", str(num_iterations), "--eval_every", str(args.eval_every), "--eval_tokens",
             str(args.eval_tokens), "--sample_every", "-1", "--save_every", str(args.save_every), "--seed", str(seed),
             "--model_tag", tag, "--resume", "auto", *flags, *extra, *args.extra.split()]
    if isinstance(gpu, tuple):  # several such runs at once each rendezvous on a port of their own
        return start_training(args.base_dir, tag, train, gpu=gpu, processes=len(gpu), port=29500 + gpu[0])
    return start_training(args.base_dir, tag, train, gpu=gpu)


def evaluated_to_the_end(evals: list[dict], num_iterations: int) -> bool:
    return bool(evals) and evals[-1]["step"] == num_iterations


def val_evals(base_dir: Path, tag: str) -> list[dict]:
    """The run's val bpb evaluations: eval.jsonl holds the CORE metric's records too (--core_metric_every),
    which carry no val bpb."""
    return [e for e in run_log(base_dir, tag, "eval.jsonl", missing_ok=True) if "val_bpb" in e]


def finished(args, variant: str, seed: int, num_iterations: int) -> bool:
    return evaluated_to_the_end(val_evals(args.base_dir, f"q_{variant}_s{seed}"), num_iterations)


def summarize(args, runs: list[tuple[str, int]], num_iterations: int, data: str | None = None) -> dict:
    """The runs' records and statistics; `data`: the shards' fingerprint, recorded with each run."""
    out = {"runs": {}, "variants": {}}
    for variant, seed in runs:
        tag = f"q_{variant}_s{seed}"
        metrics = run_log(args.base_dir, tag, "metrics.jsonl", missing_ok=True)
        evals = val_evals(args.base_dir, tag)
        # training seconds up to the end of each step (compilation included: it is part of the wall-clock)
        elapsed, seconds = {}, 0.0
        for m in metrics:
            seconds += m["dt"]
            elapsed[m["step"] + 1] = seconds
        out["runs"][f"{variant}_s{seed}"] = {
            "variant": variant, "seed": seed, "steps": len(metrics), "train_s": seconds,
            "final_val_bpb": evals[-1]["val_bpb"] if evals else None,
            "final_step": evals[-1]["step"] if evals else None,
            "val_bpb": [(e["step"], e["val_bpb"]) for e in evals], "elapsed_at_step": elapsed,
            "smooth_loss": [m["smooth_loss"] for m in metrics],
            "finished": evaluated_to_the_end(evals, num_iterations), "shards_sha256": data,
        }
    variant_stats(out, args.variants.split(","), parse_step_speedup(args.step_speedup))
    for r in out["runs"].values():
        r["elapsed_at_step"] = {str(k): v for k, v in r["elapsed_at_step"].items()}
    return out


def variant_stats(out: dict, variants: list[str], step_speedup: dict[str, float] | None = None) -> None:
    """Each variant's mean final bpb and spread from `out["runs"]`, and for every variant but the exact path
    its distance from the exact path (the equal-quality criterion) and its time-to-equal-bpb figures. Only
    finished runs count (a summary written at a --deadline holds runs still under way; summaries from before
    the `finished` field held finished runs only)."""
    runs = [r for r in out["runs"].values() if r.get("finished", True) and r["final_val_bpb"] is not None]
    for variant in variants:
        finals = [r["final_val_bpb"] for r in runs if r["variant"] == variant]
        if finals:
            out["variants"][variant] = {"mean": statistics.fmean(finals), "spread": max(finals) - min(finals),
                                        "finals": finals}
    exact = out["variants"].get(EXACT)
    step_speedup = step_speedup or {}
    for variant, v in out["variants"].items():
        if variant == EXACT or exact is None:
            continue
        v["delta_vs_exact"] = v["mean"] - exact["mean"]
        # the equal-quality test: the exact path's own seed-to-seed spread (a noisier variant must not widen it)
        v["within_exact_spread"] = abs(v["delta_vs_exact"]) <= exact["spread"]
        # what a user pays for: not worse than the exact path by more than its spread (a variant that is
        # better by more is outside the spread, yet no quality is lost)
        v["no_worse_than_exact"] = v["delta_vs_exact"] <= exact["spread"]
        reach = [seconds_to_reach(r, exact["mean"]) for r in runs if r["variant"] == variant]
        v["train_s_to_exact_final"] = reach
        exact_s = statistics.fmean(r["train_s"] for r in runs if r["variant"] == EXACT)
        v["time_to_equal_bpb_speedup"] = [exact_s / s if s else None for s in reach]
        # The other way round, for a variant that never reaches the exact path's final bpb: the exact path's
        # seconds to this variant's mean final bpb, over this variant's own seconds. Evaluations are discrete,
        # so it is an upper bound (the exact path got there at or before that evaluation).
        exact_reach = [seconds_to_reach(r, v["mean"]) for r in runs if r["variant"] == EXACT]
        mean_s = statistics.fmean(r["train_s"] for r in runs if r["variant"] == variant)
        v["exact_s_to_this_final"] = exact_reach
        v["equal_bpb_speedup_at_most"] = (statistics.fmean(exact_reach) / mean_s
                                          if exact_reach and None not in exact_reach else None)
        # In optimizer steps, for runs made on different machines (whose seconds do not compare): the exact
        # path's steps over this variant's steps to the exact path's mean final bpb. Times the per-step
        # speed-up measured in one invocation (--step-speedup), it is the speed-up at equal bpb.
        exact_steps = statistics.fmean(r["final_step"] for r in runs if r["variant"] == EXACT)
        v["steps_to_exact_final"] = [steps_to_reach(r, exact["mean"]) for r in runs if r["variant"] == variant]
        v["steps_ratio"] = [exact_steps / s if s else None for s in v["steps_to_exact_final"]]
        # and the other way round in steps: the exact path's steps to this variant's mean final bpb over this
        # variant's own steps, for a variant that never gets there (interpolated like steps_to_reach, so an
        # estimate, not the bound its seconds counterpart above is)
        v["exact_steps_to_this_final"] = [steps_to_reach(r, v["mean"]) for r in runs if r["variant"] == EXACT]
        own_steps = statistics.fmean(r["final_step"] for r in runs if r["variant"] == variant)
        v["steps_ratio_at_most"] = (statistics.fmean(v["exact_steps_to_this_final"]) / own_steps
                                    if None not in v["exact_steps_to_this_final"] else None)
        v["paired_train_loss_gap"] = paired_loss_gap(runs, variant)
        if variant in step_speedup:
            v["equal_bpb_speedup_from_steps"] = [r * step_speedup[variant] if r else None for r in v["steps_ratio"]]
            # what the evaluations bound it to: the crossing lies after the evaluation before it and at or
            # before the first at or below the target; the line between them is one estimate inside
            ratio = step_speedup[variant]
            v["equal_bpb_speedup_from_steps_bracket"] = [
                None if b is None else (exact_steps / b[1] * ratio, exact_steps / b[0] * ratio if b[0] else None)
                for b in (steps_bracket(r, exact["mean"]) for r in runs if r["variant"] == variant)]
            v["equal_bpb_speedup_at_most_from_steps"] = (v["steps_ratio_at_most"] * step_speedup[variant]
                                                         if v["steps_ratio_at_most"] else None)


def paired_loss_gap(runs: list[dict], variant: str, last: float = 0.1) -> float | None:
    """The variant's train loss (EMA) minus the exact path's of the same seed, averaged over the last `last` of
    the steps: the two see the same batches in the same order, so the batches' own scatter cancels, which a
    single val bpb evaluation's does not. Averaged over the seeds both have; None if they share none."""
    exact = {r["seed"]: r["smooth_loss"] for r in runs if r["variant"] == EXACT and r.get("smooth_loss")}
    gaps = []
    for r in runs:
        if r["variant"] == variant and r.get("smooth_loss") and r["seed"] in exact:
            a, b = r["smooth_loss"], exact[r["seed"]]
            n = min(len(a), len(b))
            k = max(1, round(last * n))
            gaps.append(statistics.fmean(x - y for x, y in zip(a[n - k:n], b[n - k:n])))
    return statistics.fmean(gaps) if gaps else None


def first_reaching(run: dict, bpb: float) -> tuple[tuple | None, tuple] | None:
    """(the evaluation before, the first evaluation after step 0 at or below `bpb`), each (step, val bpb); None
    if no evaluation got there."""
    prev = None
    for step, b in run["val_bpb"]:
        if b <= bpb and step > 0:
            return prev, (step, b)
        prev = (step, b)
    return None


def steps_to_reach(run: dict, bpb: float) -> float | None:
    """The step at which the run's val bpb first reaches `bpb`, linear between the two evaluations around the
    crossing (evaluations are every few steps; the curve between two is close to a line); None if never."""
    found = first_reaching(run, bpb)
    if found is None:
        return None
    prev, (step, b) = found
    if prev is None or prev[1] == b:
        return float(step)
    return prev[0] + (prev[1] - bpb) / (prev[1] - b) * (step - prev[0])


def steps_bracket(run: dict, bpb: float) -> tuple[float | None, float] | None:
    """(the step of the evaluation before the first crossing of `bpb`, the step of the first evaluation at or
    below it): the run reached `bpb` after the first and at or before the second; None if never."""
    found = first_reaching(run, bpb)
    if found is None:
        return None
    prev, (step, _) = found
    return (float(prev[0]) if prev else None), float(step)


def seconds_to_reach(run: dict, bpb: float) -> float | None:
    """Seconds of steps up to the first evaluation (after step 0) at or below `bpb`; None if none was."""
    found = first_reaching(run, bpb)
    if found is None:
        return None
    step = found[1][0]
    elapsed = run["elapsed_at_step"]
    return elapsed.get(step, elapsed.get(str(step)))  # int keys while running, str keys read back from JSON


def plot(summary: dict, path: str) -> None:
    """Two panels where the variants differ: val bpb over the run's last 40% (the warm-down and before it,
    where a quality gap shows), and each run's train loss minus the exact path's seed-mean at each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    first_seed = min(r["seed"] for r in runs.values())
    exact = [r["smooth_loss"] for r in runs.values() if r["variant"] == EXACT and r["smooth_loss"]] or \
        [next(iter(runs.values()))["smooth_loss"]]
    n = min(len(loss) for loss in exact)
    base = [sum(loss[i] for loss in exact) / len(exact) for i in range(n)]
    last = max((r["final_step"] for r in runs.values() if r["final_step"] is not None), default=0)
    for name, r in runs.items():
        color = colors.setdefault(r["variant"], f"C{len(colors)}")
        style = "-" if r["seed"] == first_seed else "--"
        late = [(s, b) for s, b in r["val_bpb"] if s >= 0.6 * last]
        if late:
            ax_val.plot(*zip(*late), style, marker="o", markersize=3, color=color, label=name)
        diff = [loss - b for loss, b in zip(r["smooth_loss"], base)]
        ax_train.plot(range(len(diff)), diff, style, color=color, label=name, linewidth=1)
    ax_val.set(xlabel="step", ylabel="val bpb", title="val bits per byte, last 40% of the run")
    ax_train.set(xlabel="step", ylabel="loss (EMA) minus the exact path's mean",
                 title="train loss against the exact path")
    ax_train.axhline(0, color="black", linewidth=0.5)
    for ax in (ax_val, ax_train):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_from(p: argparse.ArgumentParser, args) -> int:
    """--from: the runs of several summaries as one (a run name seen twice is an error: which one is meant?)."""
    runs, settings = {}, {}
    for path in args.from_.split(","):
        if not Path(path).is_file():
            p.error(f"--from {path}: no such file; pass the --out files of earlier `runs.py quality` invocations")
        loaded = json.loads(Path(path).read_text())
        check_same_settings(p, settings, path, loaded.get("args"))
        for name, run in loaded["runs"].items():
            if name in runs:
                p.error(f"--from {path}: run {name} is in two files; pass each run once")
            runs[name] = run
    check_same_data(p, runs)
    summary = {"runs": runs, "variants": {}, "from": args.from_}
    variants = list(dict.fromkeys(r["variant"] for r in runs.values()))
    variant_stats(summary, variants, parse_step_speedup(args.step_speedup, variants))
    report(summary, args)
    return 0


# what the runs of two summaries must share to compare: the model, the schedule's tokens and batch, the flags
# passed through, and which val tokens score the bpb (--eval-tokens in windows of --device-batch-size rows)
SAME_SETTINGS = ("depth", "tokens", "total_batch", "device_batch_size", "eval_tokens", "extra")


def check_same_settings(p: argparse.ArgumentParser, seen: dict, path: str, args: dict | None) -> None:
    """A summary whose SAME_SETTINGS differ from an earlier one's is refused, naming the setting; `seen` holds
    the first value of each and the file it came from. A summary without its args (what --from itself writes)
    is compared unchecked."""
    for key in SAME_SETTINGS:
        if args is None or key not in args:
            continue
        first = seen.setdefault(key, (args[key], path))
        if first[0] != args[key]:
            p.error(f"--from {path}: --{key.replace('_', '-')} {args[key]!r}, but {first[1]} ran with {first[0]!r}; "
                    "runs compare only at the same settings")


def check_same_data(p: argparse.ArgumentParser, runs: dict) -> None:
    """Runs from several summaries compare only on the same tokens: two shard fingerprints is an error. A run
    from before summaries recorded one (2026-12-06) is compared unchecked, and the report says so."""
    known = {name: r["shards_sha256"] for name, r in runs.items() if r.get("shards_sha256")}
    if len(set(known.values())) > 1:
        by_data = {}
        for name, sha in known.items():
            by_data.setdefault(sha[:12], []).append(name)
        p.error(f"--from: the runs trained on different shards ({'; '.join(f'{k}: {v}' for k, v in by_data.items())})"
                "; compare runs made from one --make-data recipe and check each summary's shards_sha256")
    if unknown := [name for name in runs if name not in known]:
        print(f"note: {', '.join(unknown)} recorded no shard fingerprint; their data is not checked against the others'")


def parse_step_speedup(text: str, variants: list[str] | None = None) -> dict[str, float]:
    """--step-speedup "fp8=1.18,fused=1.03" -> {"fp8": 1.18, "fused": 1.03}. A name outside `variants` is
    refused: left alone, it would silently leave its variant without the equal-bpb figure."""
    pairs = [[part.strip() for part in item.split("=")] for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--step-speedup {text!r}: give VARIANT=RATIO pairs, e.g. fp8=1.18")
    if variants is not None and (unknown := [name for name, _ in pairs if name not in variants]):
        raise SystemExit(f"--step-speedup {text!r}: {', '.join(unknown)} is not a variant of these runs "
                         f"({', '.join(variants)})")
    return {name: float(ratio) for name, ratio in pairs}


def report(summary: dict, args) -> None:
    """Print the summary, and write it to --out and its curves to --plot when given."""
    print_summary(summary)
    if args.out:
        write_json(args.out, summary)
    if args.plot:
        try:
            plot(summary, args.plot)
        except ImportError as e:
            print(f"no plot: {e}")


def print_summary(summary: dict) -> None:
    for name, r in summary["runs"].items():
        under_way = "" if r.get("finished", True) else " (under way: its last evaluation)"
        print(f"{name:12} final val bpb {r['final_val_bpb']} at step {r['final_step']}, {r['train_s']:.0f} s of steps"
              f"{under_way}")
    for variant, v in summary["variants"].items():
        extra = ""
        if "delta_vs_exact" in v:
            extra = (f" | vs {EXACT}: {v['delta_vs_exact']:+.4f}, within the spread: {v['within_exact_spread']}, no worse: "
                     f"{v['no_worse_than_exact']} | "
                     f"steps' seconds to {EXACT}'s final bpb: {v['train_s_to_exact_final']} | {EXACT}'s seconds to "
                     f"this mean: {v['exact_s_to_this_final']}, equal-bpb speed-up at most "
                     f"{v['equal_bpb_speedup_at_most']} | steps to {EXACT}'s final bpb: {v['steps_to_exact_final']}, "
                     f"step ratio {v['steps_ratio']} | {EXACT}'s steps to this mean: {v['exact_steps_to_this_final']}, "
                     f"step ratio (an estimate) {v['steps_ratio_at_most']} | train loss minus {EXACT}'s, same seed, last "
                     f"10% of steps: {v['paired_train_loss_gap']}"
                     + (f" | equal-bpb speed-up from steps {v['equal_bpb_speedup_from_steps']} (between the "
                        f"evaluations around the crossing: {v['equal_bpb_speedup_from_steps_bracket']}); from the "
                        f"{EXACT} path's steps to this mean {v['equal_bpb_speedup_at_most_from_steps']}"
                        if "equal_bpb_speedup_from_steps" in v else ""))
        print(f"{variant:6} mean {v['mean']:.4f} spread {v['spread']:.4f}{extra}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", type=Path)
    p.add_argument("--make-data", action="store_true", help="write the corpus, tokenizer and shards first")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="with --make-data: at most this much text")
    p.add_argument("--text-roots", default=TEXT_ROOTS, help="with --make-data: directories to read "
                   "(`python` = this installation's stdlib and site-packages)")
    p.add_argument("--text-suffixes", default=",".join(TEXT_SUFFIXES), help="with --make-data: file kinds to read")
    p.add_argument("--val-every", type=int, default=12, help="with --make-data: about one document in N goes to "
                   "the val split (a larger N leaves more never-repeated train tokens)")
    p.add_argument("--tokenizer-chars", type=int, default=500_000_000,
                   help="with --make-data: train the tokenizer on at most this much text (its training time grows with it)")
    p.add_argument("--data-only", action="store_true", help="stop after reporting the corpus's train tokens")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--tokens", type=int, default=150_000_000, help="training tokens per run (never repeated)")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch", type=int, default=524288)
    p.add_argument("--variants", default="torch,fp8", help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="42,43")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-tokens", type=int, default=2 * 524288)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--extra", default="", help="more training flags for every run")
    p.add_argument("--per-gpu", type=int, default=1, help="runs at a time on each GPU (without a GPU: on the CPU)")
    p.add_argument("--gpus-per-run", type=int, default=1, help="GPUs each run trains on, data-parallel (accelerate "
                   "launch): a long run finishes within fewer device calls")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds from this command's start (--make-data included): then SIGTERM every run (each "
                        "saves a checkpoint and stops; killed if still running 120 s later), start no more, report "
                        "what there is and exit 3; the same command resumes them (for machines lent by the call)")
    p.add_argument("--branch-from", default="", help="RUN:STEP: every run starts from run RUN's checkpoint at STEP "
                   "(e.g. a screen of warm-down variants from one bf16 run stopped where its warm-down begins)")
    p.add_argument("--out", type=Path)
    p.add_argument("--step-speedup", default="", help="VARIANT=RATIO,...: each variant's per-step speed over the exact "
                                                      "path's, measured in one invocation (vs_nanochat.py), for the "
                                                      "speed-up at equal bpb from steps (runs on different machines)")
    p.add_argument("--plot", default="", help="PNG of the curves")
    p.add_argument("--from", dest="from_", default="", help="comma list of --out files of earlier invocations (e.g. "
                   "the exact path's seeds from one call, a variant's from another): summarise and plot them together")


def run(args, p: argparse.ArgumentParser) -> int:
    if args.from_:
        return report_from(p, args)
    if args.base_dir is None:
        p.error("--base-dir is required (unless --from)")
    args.base_dir = args.base_dir.resolve()
    if unknown := [v for v in args.variants.split(",") if v not in VARIANTS]:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    parse_step_speedup(args.step_speedup, args.variants.split(","))  # refused now, not after the runs trained
    gpus = gpu_count()
    if args.gpus_per_run < 1 or args.gpus_per_run > max(gpus, 1):  # accelerate's CPU launch starts one process
        p.error(f"--gpus-per-run {args.gpus_per_run}: this machine has {gpus} GPUs; pass 1 to {max(gpus, 1)}")
    if args.gpus_per_run > 1 and args.per_gpu != 1:
        p.error(f"--gpus-per-run {args.gpus_per_run} with --per-gpu {args.per_gpu}: a run on several GPUs has them "
                "to itself; leave --per-gpu at 1")
    if args.make_data:
        make_data(args.base_dir, args.max_chars, 65536, roots=args.text_roots,
                  suffixes=tuple(args.text_suffixes.split(",")), tokenizer_chars=args.tokenizer_chars,
                  val_every=args.val_every)
    available = train_tokens(args.base_dir)
    num_iterations = math.ceil(args.tokens / args.total_batch)
    if args.data_only:
        print(f"{available:,} train tokens in {args.base_dir / 'shards'}: {available // args.total_batch} steps of "
              f"{args.total_batch:,} without repeating a token")
        return 0
    needed = num_iterations * args.total_batch
    if available < needed:
        p.error(f"{args.base_dir / 'shards'}: {available:,} train tokens, but {num_iterations} steps of "
                f"{args.total_batch:,} need {needed:,} never repeated; lower --tokens or add text")
    runs = [(v, int(s)) for v in args.variants.split(",") for s in args.seeds.split(",")]
    done = [r for r in runs if finished(args, *r, num_iterations)]  # a repeated command skips finished runs
    if args.gpus_per_run > 1:
        k = args.gpus_per_run
        slots = [(tuple(range(j * k, (j + 1) * k)), 0) for j in range(gpus // k)]
    elif gpus:
        # several runs share a GPU with --per-gpu: one run's compilation (host) overlaps another's steps
        slots = [(g, i) for g in range(gpus) for i in range(args.per_gpu)]
    else:  # without a GPU, --per-gpu runs share the CPU
        slots = [(None, i) for i in range(args.per_gpu)]
    print(f"{len(runs)} runs x {num_iterations} steps x {args.total_batch:,} tokens of {available:,}; "
          f"{len(slots)} at a time" + (f"; {len(done)} already finished" if done else ""), flush=True)
    queue, running, failed, paused = [r for r in runs if r not in done], {}, [], False
    clean_exits = (0,)  # after the deadline's SIGTERM also STOP_CODES, and after its grace a kill
    t0 = time.time()
    while queue or running:
        for slot in [s for s in slots if s not in running]:
            if queue and not paused:
                variant, seed = queue.pop(0)
                running[slot] = ((variant, seed), start(args, variant, seed, slot[0], num_iterations))
        time.sleep(1)
        for slot, (run, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
                print(f"{run[0]} seed {run[1]}: exit {proc.returncode} at {time.time() - t0:.0f}s", flush=True)
                if proc.returncode not in clean_exits:  # a crash after the deadline is a failure all the same
                    failed.append(run)
        past_deadline = args.deadline and time.time() - START >= args.deadline
        if past_deadline and not paused:
            paused, clean_exits, queue = True, (0, *STOP_CODES), []
            for _, proc in running.values():  # each run saves at its next step boundary, or stops in start-up
                proc.send_signal(signal.SIGTERM)
        elif past_deadline and running and time.time() - START >= args.deadline + DEADLINE_GRACE_S:
            clean_exits = (*clean_exits, -signal.SIGKILL)  # its last checkpoint stands: saves are atomic
            for run, proc in running.values():
                print(f"{run[0]} seed {run[1]}: still running {DEADLINE_GRACE_S}s after the deadline; killed",
                      flush=True)
                proc.kill()

    data = shards_sha256(args.base_dir)
    summary = summarize(args, runs, num_iterations, data)
    summary["args"] = {k: v for k, v in args_record(args).items() if args.make_data or k not in DATA_OPTIONS}
    recipe = args.base_dir / DATA_RECIPE
    summary["data"] = {"shards_sha256": data,
                       "recipe": json.loads(recipe.read_text()) if recipe.exists() else None}
    summary["num_iterations"], summary["train_tokens_available"] = num_iterations, available
    report(summary, args)
    if paused and not failed:
        print(f"deadline ({args.deadline:g}s): the runs stopped at their last checkpoints; the same command resumes "
              "them", flush=True)
        return 3
    return 1 if failed else 0

