"""Experiment trackers (wandb, tensorboard, trackio) through Accelerate's, with nanochat's --run semantics.

nanochat logs to wandb whenever `--run` names a run ("dummy", the default, logs nothing); so does this loop
unless `--tracker` picks others. Every tracker writes under the run, `<base>/runs/<tag>/logs/`:
tensorboard into `logs/nanochat/`, wandb into `logs/wandb/` (online, or offline with WANDB_MODE=offline),
trackio into `logs/trackio/` (its TRACKIO_DIR, unless you set one). Which trackers, and whether their
packages are installed, is decided before the model is built, so a typo costs seconds, not a model build.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

from nanochat_unsloth.checkpoint.logs import TRACKER_DIR
from nanochat_unsloth.common import UserError

PROJECT = "nanochat"  # the wandb/trackio project and tensorboard's subdirectory, as nanochat's wandb project
LOGS_DIR = TRACKER_DIR  # moved aside with the run's checkpoints by --force
# tracker -> the package it needs (PyPI name = import name for all three)
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio"}
SPECIAL = ("all", "none")
INSTALL_HINT = "pip install -e \".[trackers]\""


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def resolve_trackers(run: str, tracker: str) -> list[str]:
    """The trackers a run logs to, or a one-line UserError for an unknown or uninstalled one.

    `run == "dummy"` (nanochat's "no logging") allows no tracker but the default; `tracker` "" is
    nanochat's wandb; "all" is every installed one; "none" is none; else a comma list of names.
    """
    names = [n.strip() for n in tracker.split(",") if n.strip()]
    for name in names:
        if name not in PACKAGES and name not in SPECIAL:
            close = difflib.get_close_matches(name, list(PACKAGES) + list(SPECIAL), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"--tracker {name}: unknown tracker; {hint}choose from "
                            f"{', '.join(PACKAGES)}, all, none (or a comma list)")
    if "none" in names:
        if len(names) > 1:
            raise UserError(f"--tracker {tracker}: 'none' cannot be combined with other trackers")
        return []
    if run == "dummy":
        if names:
            raise UserError(f"--tracker {tracker} logs nothing with --run dummy (nanochat's 'do not log'); name "
                            "the run with --run NAME")
        return []
    if not names:  # nanochat: naming a run logs it to wandb
        if not installed("wandb"):
            raise UserError(f"--run {run} logs to wandb (as nanochat does), whose package is not installed: "
                            f"pip install wandb (or {INSTALL_HINT}); or pick --tracker tensorboard|trackio, or "
                            "--run dummy for no logging")
        return ["wandb"]
    if "all" in names:
        found = [n for n in PACKAGES if installed(n)]
        if not found:
            raise UserError(f"--tracker all: none of {', '.join(PACKAGES)} is installed: {INSTALL_HINT}")
        return found
    missing = [n for n in dict.fromkeys(names) if not installed(n)]
    if missing:
        raise UserError(f"--tracker {','.join(missing)}: package not installed: pip install {' '.join(missing)} "
                        f"(or {INSTALL_HINT})")
    return list(dict.fromkeys(names))


def accelerator_kwargs(names: list[str], run_dir: Path) -> dict:
    """Accelerator(...) arguments: the trackers, and the logging dir tensorboard needs."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS_DIR))}


def start_trackers(accelerator, names: list[str], run_name: str, run_dir: Path, config: dict,
                   start_step: int = 0) -> None:
    """Start the trackers on the main process (Accelerate's init_trackers), or refuse in one line.

    `start_step` is where this run's history continues: tensorboard drops what earlier event files logged at
    or after it (its purge_step), the steps of an abandoned branch or of a crash after the last save, which
    this run logs again; metrics.jsonl is cut at the same step (checkpoint/store.py: start_branch)."""
    if not names or not accelerator.is_main_process:
        return
    logs = run_dir / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    init_kwargs = {"wandb": {"name": run_name, "dir": str(logs)}, "trackio": {"name": run_name},
                   "tensorboard": {"purge_step": start_step}}
    if "trackio" in names:
        # trackio reads its storage dir from the environment when imported: keep it under the run
        os.environ.setdefault("TRACKIO_DIR", str(logs / "trackio"))
    try:
        accelerator.init_trackers(PROJECT, config=config, init_kwargs=init_kwargs)
    except Exception as e:  # a tracker's own failure (no wandb login, no network): one line, before step 0
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"--tracker {','.join(names)}: starting the tracker failed: {type(e).__name__}: {first} "
                        "(for wandb: `wandb login`, or WANDB_MODE=offline)") from None
