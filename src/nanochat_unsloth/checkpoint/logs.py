"""A run's metrics logs (`metrics.jsonl`, `eval.jsonl`: one JSON record per line, each with its "step"):
reading them, and cutting them at a step when a resume starts a new branch there."""

from __future__ import annotations

import json
from pathlib import Path

from nanochat_unsloth.common import UserError, atomic_write_bytes

LOG_NAMES = ("metrics.jsonl", "eval.jsonl")  # one record per line, each with its "step"
TRACKER_DIR = "logs"  # the trackers' files of a run (tensorboard, wandb, trackio), under its run dir
PROFILE_DIR = "profile"  # --profile_step's per-rank phase timings, under its run dir


def read_jsonl_records(path: Path, log=print) -> list[dict]:
    """The records of a metrics/eval log. A torn last line (a crash or a full disk mid-append) is dropped
    with a notice; a damaged line before it is refused, since records would be lost silently."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON, and later lines follow; the log is damaged, "
                                "repair or remove that line") from None
            log(f"{path}: dropping its torn last line {line[:60]!r} (an append cut short)")
    return records


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def split_logs(run_dir: Path, step: int, log=print) -> dict[str, tuple[list[dict], list[dict]]]:
    """Each log of the run -> (its records before `step`, those at or after it)."""
    split = {}
    for name in LOG_NAMES:
        path = Path(run_dir) / name
        if path.exists():
            records = read_jsonl_records(path, log)
            split[name] = ([r for r in records if r["step"] < step], [r for r in records if r["step"] >= step])
    return split


def rewrite_logs(run_dir: Path, split: dict[str, tuple[list[dict], list[dict]]], aside: Path | None) -> None:
    """Keep each log's records before the step; the later ones go to `aside` first, so they are on disk
    before they leave the log. Rewriting also drops a torn last line."""
    for name, (kept, later) in split.items():
        if later:
            atomic_write_bytes(aside / name, jsonl_bytes(later))
        atomic_write_bytes(Path(run_dir) / name, jsonl_bytes(kept))
