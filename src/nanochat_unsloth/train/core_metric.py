"""nanochat's CORE metric during training: when it is due, how it runs, and what it logs.

As nanochat's base_train: every --core_metric_every steps (not at step 0) and at the last step, on the
uncompiled model (the prompts' shapes change every example), all ranks taking part, each task cut to
--core_metric_max_per_task examples. Off (-1) by default here, where nanochat's default is 2000: that
needs nanochat's eval bundle, which a user may not have, and a missing bundle is refused at start.
"""

from __future__ import annotations

from pathlib import Path

from nanochat_unsloth.common import notice_once
from nanochat_unsloth.eval.core import BUNDLE_DIR, CoreBundle, evaluate_core, load_bundle


def core_bundle_for(every: int, base_dir: Path, max_per_task: int = -1) -> CoreBundle | None:
    """The bundle when the metric is on, its examples read and checked (refused in one line if missing or
    damaged, not at the first CORE step); a hint when it is off but could run."""
    if every > 0:
        bundle = load_bundle(base_dir)
        bundle.check(max_per_task)
        return bundle
    if (Path(base_dir) / BUNDLE_DIR / "core.yaml").exists():
        notice_once(f"CORE metric off (--core_metric_every -1); {Path(base_dir) / BUNDLE_DIR} is there, so "
                    "--core_metric_every 2000 would report it as nanochat does")
    return None


def core_due(every: int, step: int, last_step: bool) -> bool:
    return every > 0 and (last_step or (step > 0 and step % every == 0))


def run_core_metric(raw_model, encoding, bundle: CoreBundle, device, max_per_task: int, autocast,
                    shard_examples: bool, step: int, log) -> dict:
    """Evaluate CORE on the uncompiled model (every rank calls this); -> the eval.jsonl record."""
    was_training = raw_model.training
    raw_model.eval()
    try:
        with autocast():
            out = evaluate_core(raw_model, encoding, bundle, device, max_per_task,
                                max_len=getattr(raw_model, "rotary_seq_len", None), shard_examples=shard_examples,
                                log=log)
    finally:
        raw_model.train(was_training)
    log(f"step {step:05d} | CORE metric: {out['core_metric']:.4f}")
    return {"step": step, **out}


def tracker_values(record: dict) -> dict:
    """Flat scalars for the trackers: nanochat's "core_metric", and each task's centered accuracy."""
    values = {"core_metric": record["core_metric"]}
    values.update({f"centered_results/{label}": v for label, v in record["centered_results"].items()})
    return values
