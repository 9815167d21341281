"""Run checkpoints: `<base>/runs/<tag>/step_000123/`, complete or absent.

A checkpoint is Accelerate's `save_state` output (model, optimizers, RNG, the loader's position)
plus our `meta.json`. It is written under a hidden temporary name and renamed into place only once
every file is on disk, so a crash mid-save never leaves a directory that `--resume auto` would pick.
`meta.json` records every file's size and sha256; loading checks both, so a truncated or bit-flipped
checkpoint is refused with one line instead of resuming into NaNs (and `--resume auto` falls back to
the newest checkpoint that verifies).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from nanochat_unsloth.common import (FileLock, UserError, atomic_write_json, disk_failure_message, hold_lock,
                                     is_disk_failure, read_json, sha256_file)
from nanochat_unsloth.train import deepspeed_zero

STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
META_NAME = "meta.json"
LOCK_NAME = ".lock"  # one writer per run dir: a training run, or convert's import
MODEL_FILE = "model.safetensors"
# Wrappers that prefix parameter names: DDP ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def run_dir_for(base_dir: Path, tag: str) -> Path:
    return Path(base_dir) / "runs" / tag


def lock_run(run_dir: Path) -> FileLock:
    """Hold the run dir's lock (a training run holds it for its life); refuse with the holder's pid."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_failure(e):
            raise UserError(disk_failure_message(run_dir, e)) from None
        raise
    return hold_lock(run_dir / LOCK_NAME, f"run tag {run_dir.name!r}",
                     "wait for that run to finish (or stop it), or pass another --model_tag")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (named step_XXXXXX with a meta.json), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and child.is_dir() and (child / META_NAME).exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


class ShardedRun:
    """What an FSDP2 run saves and loads itself (train/fsdp.py says why): the unwrapped model, the
    optimizers, and the loader registered for checkpointing."""

    def __init__(self, model, optimizers, loader):
        self.model, self.optimizers, self.loader = model, optimizers, loader


class _Frozen:
    """A state dict that Accelerate's save_accelerator_state takes for an optimizer."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def save_sharded_state(out_dir: Path, run: ShardedRun, process_index: int, is_main: bool, step: int = 0,
                       scaler=None) -> None:
    """Collective: an FSDP2 run's state gathered whole and written as an unsharded run's checkpoint
    (model.safetensors, optimizer.bin, optimizer_1.bin by the main process; every rank's RNG state; the
    loader's state), so that DDP runs, other GPU counts, `convert` and `eval` read it as any other."""
    from accelerate.checkpointing import save_accelerator_state, save_custom_state

    from nanochat_unsloth.train.fsdp import gathered_state_dict

    # whole tensors reach host memory on the main process only
    model_state = gathered_state_dict(run.model.state_dict(), is_main)
    optimizer_states = [gathered_state_dict(opt.state_dict(), is_main) for opt in run.optimizers]
    save_accelerator_state(str(out_dir), [model_state] if is_main else [],
                           [_Frozen(s) for s in optimizer_states] if is_main else [], [], [], process_index, step,
                           scaler)
    save_custom_state(run.loader, str(out_dir), 0)


def load_sharded_state(step_dir: Path, run: ShardedRun, process_index: int, scaler=None) -> None:
    """The inverse of `save_sharded_state`, from any checkpoint in the unsharded layout: every rank reads
    the whole files and keeps its shards."""
    from accelerate.checkpointing import load_accelerator_state, load_custom_state

    from nanochat_unsloth.train.fsdp import load_whole_model_state, shard_optimizer_state

    step_dir = Path(step_dir)
    load_whole_model_state(run.model, load_model_state_dict(step_dir, verify=False))
    for i, opt in enumerate(run.optimizers):
        path = step_dir / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin")
        opt.load_state_dict(shard_optimizer_state(torch.load(path, map_location="cpu", weights_only=False), opt))
    load_accelerator_state(str(step_dir), [], [], [], [], process_index, scaler)
    load_custom_state(run.loader, str(step_dir), 0)


def load_training_state(accelerator, step_dir: Path, sharded: ShardedRun | None = None) -> None:
    """Collective: the model, optimizers, RNG and loader state of a checkpoint (see save_checkpoint)."""
    if sharded is None:
        accelerator.load_state(str(step_dir))
    else:
        load_sharded_state(step_dir, sharded, accelerator.process_index, accelerator.scaler)


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: dict, keep_last: int = 2,
                    sharded: ShardedRun | None = None) -> Path:
    """Collective: every process calls it. Returns the final directory. `sharded`: an FSDP2 run, saved
    whole by us (train/fsdp.py) instead of by Accelerate's save_state."""
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".{final.name}.tmp"
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # debris of an earlier crash mid-save
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if sharded is None:
            accelerator.save_state(str(tmp))
        else:
            save_sharded_state(tmp, sharded, accelerator.process_index, accelerator.is_main_process,
                               accelerator.step, accelerator.scaler)
    except (OSError, RuntimeError) as e:
        if not is_disk_failure(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier checkpoints are untouched
        raise UserError(disk_failure_message(tmp, e) + "; the earlier checkpoints are kept") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # every file, those in sub-directories too (DeepSpeed writes its states into one per tag)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        sha256 = {name: sha256_file(tmp / name) for name in files}
        atomic_write_json(tmp / META_NAME, {**meta, "step": step, "files": files, "sha256": sha256, "complete": True})
        if final.exists():  # the same step saved again (e.g. a resumed run stopped at once): newest wins
            shutil.rmtree(final)
        tmp.rename(final)
        for old_step, old_dir in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            if old_step != step:
                shutil.rmtree(old_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def set_aside(run_dir: Path) -> Path:
    """Move a run's checkpoints and metrics into `run_dir/previous_<n>/` (a run started over with --force)."""
    run_dir = Path(run_dir)
    n = 0
    while (run_dir / f"previous_{n}").exists():
        n += 1
    aside = run_dir / f"previous_{n}"
    aside.mkdir()
    for child in run_dir.iterdir():
        if STEP_DIR_RE.match(child.name) or child.name in ("metrics.jsonl", "eval.jsonl"):
            child.rename(aside / child.name)
    return aside


def load_meta(step_dir: Path, checksums: bool = True) -> dict:
    """meta.json of a complete checkpoint, after checking that every recorded file is whole (its size,
    and its sha256 unless `checksums` is False; checkpoints from before sha256 was recorded: size only)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint directory not found")
    meta_path = step_dir / META_NAME
    if not meta_path.exists():
        raise UserError(
            f"{step_dir}: no {META_NAME}, so this checkpoint is partial (interrupted save); "
            "resume from an earlier step_* directory or use --resume auto"
        )
    meta = read_json(meta_path, "checkpoint meta")
    if not meta.get("complete") or "model_config" not in meta:
        raise UserError(f"{meta_path}: not a complete nanochat-unsloth checkpoint")
    for name, size in meta.get("files", {}).items():
        path = step_dir / name
        if not path.exists():
            raise UserError(f"{path}: missing from the checkpoint; it is corrupt, resume from another step")
        if path.stat().st_size != size:
            raise UserError(
                f"{path}: {path.stat().st_size:,} bytes but {size:,} were saved; the checkpoint is corrupt, "
                "resume from another step"
            )
    for name, digest in meta.get("sha256", {}).items() if checksums else ():
        if sha256_file(step_dir / name) != digest:
            raise UserError(f"{step_dir / name}: sha256 does not match the one recorded at save; the checkpoint "
                            "is corrupt (bit rot or an overwritten file), resume from another step")
    return meta


def find_resume(run_dir: Path, resume: str, log=print) -> tuple[Path, dict] | None:
    """--resume '' -> None; a path -> that checkpoint, verified; 'auto' -> the newest checkpoint that
    verifies (a damaged newer one is skipped with a one-line notice), or None when there is none."""
    if not resume:
        return None
    if resume == "auto":
        for _, step_dir in reversed(list_checkpoints(run_dir)):
            try:
                return step_dir, load_meta(step_dir)
            except UserError as e:
                log(f"--resume auto: skipping {step_dir.name}: {e}")
        return None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(run_dir) / resume
    return path, load_meta(path)  # validates, raises a clear error


def resolve_resume(run_dir: Path, resume: str, log=print) -> Path | None:
    """The checkpoint directory `find_resume` picks."""
    found = find_resume(run_dir, resume, log)
    return found[0] if found else None


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_model_state_dict(step_dir: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, with nanochat's parameter names (no wrapper prefixes).
    `verify=False` when the caller has just verified the checkpoint with `load_meta`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    step_dir = Path(step_dir)
    if verify:
        load_meta(step_dir)
    path = step_dir / MODEL_FILE
    if not path.exists() and deepspeed_zero.is_deepspeed_checkpoint(step_dir):
        return deepspeed_zero.load_whole_model_state(step_dir)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read the model weights ({e}); the checkpoint is corrupt") from None
    return strip_wrapper_prefixes(state)
