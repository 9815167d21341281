"""The wall-clock of a whole run, projected from a short measured one: steps, evaluations, checkpoints.

    python benchmarks/project_run.py <base>/runs/<tag> --steps 21400 --eval-every 250 --save-every 1000

Reads a finished (or stopped) run of the real loop: metrics.jsonl (each step's `dt` and the wall time
`time` at which its record was written) and the run's settings from its newest checkpoint's meta. The time
between two step records that is not the later step's own `dt` is what ran between the steps: an
evaluation, a checkpoint save, greedy samples, or only the logging. Gaps are sorted by what the run's
settings say happened there; the median gap with nothing but logging is subtracted from the others, so

    eval_s   = median(gap after an evaluation) - median(plain gap), and likewise save_s and sample_s.

The projection for --steps at --eval-every / --save-every / --sample-every is
    first step (compilation) + (steps - 1) x median steady step + plain gaps + evaluations x eval_s
    + checkpoints x save_s + samples x sample_s + the final evaluation, samples and checkpoint.
For the measured costs to exist, the short run needs a few of each: e.g. `--eval_every 5 --save_every 7
--sample_every 11` over 30 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def newest_meta(run_dir: Path):
    from nanochat_unsloth.checkpoint.meta import load_meta
    from nanochat_unsloth.checkpoint.store import list_checkpoints

    steps = list_checkpoints(run_dir)
    if not steps:
        raise SystemExit(f"{run_dir}: no checkpoint (step_*), so no record of the run's settings")
    return load_meta(steps[-1][1], checksums=False)  # the settings only: sizes checked, not sha256


def events_before(step: int, cfg: dict, num_iterations: int) -> set[str]:
    """What the loop ran between the record of step `step - 1` and the one of `step` (0-based steps)."""
    found = set()
    if cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0 and cfg["eval_tokens"] > 0:
        found.add("eval")
    if cfg["sample_every"] > 0 and step > 0 and step % cfg["sample_every"] == 0:
        found.add("sample")
    if cfg["save_every"] > 0 and step % cfg["save_every"] == 0 and step < num_iterations:
        found.add("save")  # saved after step `step - 1` completed (`step` steps done)
    return found


def measure(run_dir: Path, warmup: int) -> dict:
    from nanochat_unsloth.checkpoint.logs import read_jsonl_records

    metrics = read_jsonl_records(run_dir / "metrics.jsonl")
    if len(metrics) < 3 or "time" not in metrics[-1]:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'}: needs a few steps recorded with their `time` (runs since "
                         "2026-11-28)")
    meta = newest_meta(run_dir)
    cfg, num_iterations = meta.train_config, meta.num_iterations
    gaps: dict[str, list[float]] = {}
    for prev, cur in zip(metrics, metrics[1:]):
        if cur["step"] != prev["step"] + 1:  # a resume in between
            continue
        kind = "+".join(sorted(events_before(cur["step"], cfg, num_iterations))) or "plain"
        gaps.setdefault(kind, []).append(cur["time"] - prev["time"] - cur["dt"])
    plain = statistics.median(gaps["plain"]) if "plain" in gaps else 0.0
    cost = {kind: statistics.median(v) - plain for kind, v in gaps.items() if kind != "plain" and "+" not in kind}
    steady = [m["dt"] for m in metrics if m["step"] >= warmup]
    return {"first_step_s": metrics[0]["dt"], "step_s": statistics.median(steady), "plain_gap_s": plain,
            "eval_s": cost.get("eval"), "save_s": cost.get("save"), "sample_s": cost.get("sample"),
            "samples_of_each": {k: len(v) for k, v in gaps.items()}, "world_size": meta.world_size,
            "total_batch_size": cfg["total_batch_size"], "depth": cfg["depth"]}


def project(m: dict, steps: int, eval_every: int, save_every: int, sample_every: int) -> dict:
    # as the loop runs them: evaluations at step 0, every eval_every and at the end; samples every
    # sample_every and at the end; checkpoints every save_every before the end, and the final one
    n_eval = (steps // eval_every + 1 + (steps % eval_every > 0)) if eval_every > 0 else 1
    n_sample = (steps // sample_every + (steps % sample_every > 0)) if sample_every > 0 else 1
    n_save = ((steps - 1) // save_every) if save_every > 0 else 0
    parts = {
        "steps": m["first_step_s"] + (steps - 1) * m["step_s"],
        "between_steps": (steps - 1) * m["plain_gap_s"],
        "evaluations": n_eval * (m["eval_s"] or 0.0),
        "checkpoints": (n_save + 1) * (m["save_s"] or 0.0),
        "samples": n_sample * (m["sample_s"] or 0.0),
    }
    return {"parts_s": parts, "total_s": sum(parts.values()), "evaluations": n_eval, "checkpoints": n_save + 1,
            "samples": n_sample}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="<base>/runs/<tag> of the measured run")
    p.add_argument("--steps", type=int, default=21400, help="the projected run's steps (nanochat d20: 21,400)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=-1, help="-1: only the final checkpoint (the loop's default)")
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady step time")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    m = measure(args.run_dir, args.warmup)
    missing = [k for k in ("eval_s", "save_s", "sample_s") if m[k] is None]
    if missing:
        print(f"note: the measured run has no plain gap of each kind for {', '.join(missing)}: counted as 0 "
              "(measure a run that evaluates, saves and samples a few times)")
    result = {"measured": m, "projection": project(m, args.steps, args.eval_every, args.save_every, args.sample_every),
              "args": {k: str(v) for k, v in vars(args).items()}}
    proj = result["projection"]
    def sec(v):
        return "n/a" if v is None else f"{v:.2f} s"

    print(f"measured: d{m['depth']} on {m['world_size']} process(es), step {m['step_s'] * 1000:.0f} ms, first step "
          f"{m['first_step_s']:.1f} s, eval {sec(m['eval_s'])}, checkpoint {sec(m['save_s'])}, samples "
          f"{sec(m['sample_s'])}, between steps {m['plain_gap_s'] * 1000:.1f} ms")
    for name, seconds in proj["parts_s"].items():
        print(f"  {name:14} {seconds / 3600:7.3f} h")
    print(f"projected: {args.steps:,} steps, {proj['evaluations']} evaluations, {proj['checkpoints']} checkpoints, "
          f"{proj['samples']} sample rounds: {proj['total_s'] / 3600:.2f} h")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
