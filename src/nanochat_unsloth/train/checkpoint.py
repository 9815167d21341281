"""Run checkpoints: `<base>/runs/<tag>/step_000123/`, complete or absent.

A checkpoint is Accelerate's `save_state` output (model, optimizers, RNG, the loader's position)
plus our `meta.json`. It is written under a hidden temporary name and renamed into place only once
every file is on disk, so a crash mid-save never leaves a directory that `--resume auto` would pick.
`meta.json` records every file's size and sha256; loading checks both, so a truncated or bit-flipped
checkpoint is refused with one line instead of resuming into NaNs (and `--resume auto` falls back to
the newest checkpoint that verifies). Weights that are not finite are never written, and refused when read.

A run is one branch: resuming from an older step moves the newer checkpoints and the metrics logged
after that step to `abandoned/<time>/`, so `--resume auto`, pruning and `metrics.jsonl` see one history.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch

from nanochat_unsloth.common import (Diverged, FileLock, UserError, atomic_write_bytes, atomic_write_json,
                                     disk_failure_message, hold_lock, is_disk_failure, read_json, sha256_file)
from nanochat_unsloth.train import deepspeed_zero

STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
META_NAME = "meta.json"
LOG_NAMES = ("metrics.jsonl", "eval.jsonl")  # one record per line, each with its "step"
ABANDONED_DIR = "abandoned"  # <run>/abandoned/<time>/: what a resume from an older step left behind
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


class NonFiniteWeights(Diverged):
    """The weights to be saved hold NaN or inf: the save is refused, the earlier checkpoints stay."""


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding NaN or inf (one host sync for all of them)."""
    named = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).cpu()
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], where: str | Path) -> None:
    """Refuse weights holding NaN or inf with one line (eval, convert, resume): a diverged model."""
    bad = nonfinite_tensors(named)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"{where}: the weights hold NaN or inf ({shown}): the run had diverged when this was "
                        "saved; use an earlier checkpoint")


def _check_weights_before_save(accelerator, models, step: int) -> None:
    """Collective: every rank checks its (shard of the) weights; one bad tensor anywhere refuses the save."""
    # an FSDP2 parameter is a DTensor: each rank checks the shard it holds
    local = [(name, p.to_local() if hasattr(p, "to_local") else p) for m in models for name, p in m.named_parameters()]
    bad = nonfinite_tensors(local)
    count = torch.tensor(float(len(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item() > 0:
        names = ", ".join(plain_name(name) for name in bad[:3])
        raise NonFiniteWeights(f"step {step}: the weights hold NaN or inf ({names or 'on another rank'}); "
                               "not saved")


def _is_write_failure(e: BaseException) -> bool:
    """During a save every OSError is one (a full disk, a file-size limit, an I/O error), and so are the
    failed writes torch.save and safetensors report as their own errors."""
    return isinstance(e, OSError) or is_disk_failure(e)


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: dict, keep_last: int = 2,
                    sharded: ShardedRun | None = None) -> Path:
    """Collective: every process calls it. Returns the final directory. `sharded`: an FSDP2 run, saved
    whole by us (train/fsdp.py) instead of by Accelerate's save_state.

    Weights holding NaN or inf raise NonFiniteWeights before anything is written. A failed write is one
    UserError naming the path; its partial directory is removed and the earlier checkpoints stay."""
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".{final.name}.tmp"
    _check_weights_before_save(accelerator, [sharded.model] if sharded else accelerator._models, step)
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
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # every file, those in sub-directories too (DeepSpeed writes its states into one per tag)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            sha256 = {name: sha256_file(tmp / name) for name in files}
            atomic_write_json(tmp / META_NAME, {**meta, "step": step, "files": files, "sha256": sha256,
                                                "complete": True})
            if final.exists():  # the same step saved again: newest wins
                shutil.rmtree(final)
            tmp.rename(final)
    except Exception as e:
        if not (isinstance(e, UserError) or _is_write_failure(e)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier checkpoints are untouched
        why = str(e) if isinstance(e, UserError) else disk_failure_message(tmp, e)
        raise UserError(why + "; the earlier checkpoints are kept") from None
    if accelerator.is_main_process:
        prune(run_dir, step, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: Path, step: int, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` checkpoints up to `step` (0: all); never one after it, which would be
    another branch's. -> the removed directories."""
    if keep_last <= 0:
        return []
    older = [d for s, d in list_checkpoints(run_dir) if s <= step][:-keep_last]
    for d in older:
        shutil.rmtree(d, ignore_errors=True)
    return older


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


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


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _new_abandoned_dir(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_dir / ABANDONED_DIR / stamp, 0
    while aside.exists():
        n += 1
        aside = run_dir / ABANDONED_DIR / f"{stamp}-{n}"
    aside.mkdir(parents=True)
    return aside


def start_branch(run_dir: Path, step: int, log=print) -> Path | None:
    """A resume at `step` continues the history up to it. What came after belongs to an abandoned
    branch: the checkpoints after `step` and the metrics/eval records of steps >= `step` move to
    `<run>/abandoned/<time>/` (never deleted), so that `--resume auto`, pruning and the logs hold this
    branch only. Main process only. -> that directory, or None when nothing came after."""
    run_dir = Path(run_dir)
    newer = sorted((int(m.group(1)), child) for child in run_dir.iterdir()
                   if (m := STEP_DIR_RE.match(child.name)) and int(m.group(1)) > step)
    logs = {}
    for name in LOG_NAMES:
        path = run_dir / name
        if path.exists():
            records = read_jsonl_records(path, log)
            logs[name] = ([r for r in records if r["step"] < step], [r for r in records if r["step"] >= step])
    aside = None
    try:
        if newer or any(later for _, later in logs.values()):
            aside = _new_abandoned_dir(run_dir)
        for name, (kept, later) in logs.items():
            if later:  # the abandoned records are on disk before they leave the log
                atomic_write_bytes(aside / name, _jsonl(later))
            atomic_write_bytes(run_dir / name, _jsonl(kept))  # also drops a torn last line
        for _, d in newer:
            d.rename(aside / d.name)
    except OSError as e:
        if not is_disk_failure(e):
            raise
        raise UserError(disk_failure_message(run_dir, e)) from None
    if aside is not None:
        moved = [d.name for _, d in newer] + [f"{len(later)} {name} record(s)" for name, (_, later) in logs.items()
                                              if later]
        log(f"continuing from step {step}: moved what an abandoned branch left after it ({', '.join(moved)}) to "
            f"{aside} (kept, not deleted)")
    return aside


def set_aside(run_dir: Path) -> Path:
    """Move a run's checkpoints and metrics into `run_dir/previous_<n>/` (a run started over with --force)."""
    run_dir = Path(run_dir)
    n = 0
    while (run_dir / f"previous_{n}").exists():
        n += 1
    aside = run_dir / f"previous_{n}"
    aside.mkdir()
    for child in run_dir.iterdir():
        if STEP_DIR_RE.match(child.name) or child.name in LOG_NAMES:
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


def verify_checkpoint(step_dir: Path) -> dict:
    """load_meta (every file whole), and weights that are finite (a checkpoint of a diverged run, as
    versions before 2026-12-06 could save, is refused). Reads the weights one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    meta = load_meta(step_dir)
    path = Path(step_dir) / MODEL_FILE
    if path.exists():  # an imported or older layout may keep its weights elsewhere; load_meta checked the files
        try:
            with safe_open(str(path), framework="pt") as f:
                check_finite_weights(((key, f.get_tensor(key)) for key in f.keys()), path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read the model weights ({e}); the checkpoint is corrupt") from None
    return meta


def find_resume(run_dir: Path, resume: str, log=print) -> tuple[Path, dict] | None:
    """--resume '' -> None; a path -> that checkpoint, verified; 'auto' -> the newest checkpoint that
    verifies (a damaged or non-finite newer one is skipped with a one-line notice), or None when there
    is none."""
    if not resume:
        return None
    if resume == "auto":
        for _, step_dir in reversed(list_checkpoints(run_dir)):
            try:
                return step_dir, verify_checkpoint(step_dir)
            except UserError as e:
                log(f"--resume auto: skipping {step_dir.name}: {e}")
        return None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(run_dir) / resume
    return path, verify_checkpoint(path)  # validates, raises a clear error


def resolve_resume(run_dir: Path, resume: str, log=print) -> Path | None:
    """The checkpoint directory `find_resume` picks."""
    found = find_resume(run_dir, resume, log)
    return found[0] if found else None


def plain_name(key: str) -> str:
    """A parameter's name without the prefixes of the wrappers around the model."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {plain_name(key): value for key, value in state_dict.items()}


def load_model_state_dict(step_dir: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, with nanochat's parameter names (no wrapper prefixes); weights
    holding NaN or inf are refused with one line. `verify=False` when the caller has just verified the
    checkpoint's files with `load_meta`."""
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
    check_finite_weights(state.items(), path)
    return strip_wrapper_prefixes(state)
