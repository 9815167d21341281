"""Run checkpoints: `<base>/runs/<tag>/step_000123/`, complete or absent.

A checkpoint is Accelerate's `save_state` output (model, optimizers, RNG, the loader's position)
plus our `meta.json` (meta.py). Single-process and DDP runs write whole files (`model.safetensors`,
`optimizer.bin`, ...); the states no rank holds whole are written sharded, each rank its own shards: an
FSDP2 run's model and optimizers with torch.distributed.checkpoint (sharded.py), a DeepSpeed run's by
DeepSpeed itself (`pytorch_model/`). It is written under a hidden temporary name and renamed into place
only once every file is on disk, so a crash mid-save never leaves a directory that `--resume auto` would pick.
`meta.json` records every file's size and sha256; loading checks both, so a truncated or bit-flipped
checkpoint is refused with one line instead of resuming into NaNs (and `--resume auto` falls back to
the newest checkpoint that verifies). Weights that are not finite are never written, and refused when read.

A run is one branch: resuming from an older step moves the newer checkpoints and the metrics logged
after that step to `abandoned/<time>/`, so `--resume auto`, pruning and `metrics.jsonl` see one history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import re
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import torch

from nanochat_unsloth.checkpoint import sharded
from nanochat_unsloth.checkpoint.logs import LOG_NAMES, PROFILE_DIR, TRACKER_DIR, rewrite_logs, split_logs
from nanochat_unsloth.checkpoint.meta import META_NAME, RunMeta, load_meta
from nanochat_unsloth.common import (Diverged, FileLock, UserError, atomic_write_json, disk_failure_message,
                                     errno_of, fsync_dir, fsync_tree, hold_lock, is_disk_failure, make_dirs,
                                     sha256_file, uninterruptible)

STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
ABANDONED_DIR = "abandoned"  # <run>/abandoned/<time>/: what a resume from an older step left behind
LOCK_NAME = ".lock"  # one writer per run dir: a training run, or convert's import
SHARED_PROBE = ".shared_probe"  # check_run_dir_shared's token, there only while the ranks read it
MODEL_FILE = "model.safetensors"
# Accelerate's save_state names the DeepSpeed checkpoint's tag (its sub-directory) after the model file
DEEPSPEED_TAG = "pytorch_model"
DEEPSPEED_LATEST = "latest"  # the file naming the newest tag, as DeepSpeed's save_checkpoint writes it
# Wrappers that prefix parameter names: DDP ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def run_dir_for(base_dir: Path, tag: str) -> Path:
    return Path(base_dir) / "runs" / tag


def lock_run(run_dir: Path) -> FileLock:
    """Hold the run dir's lock (a training run holds it for its life); refuse with the holder's pid."""
    run_dir = make_dirs(Path(run_dir))
    return hold_lock(run_dir / LOCK_NAME, f"run tag {run_dir.name!r}",
                     "wait for that run to finish (or stop it), or pass another --model_tag")


def check_run_dir_shared(accelerator, run_dir: Path) -> None:
    """Every process must see the run dir the main process writes: the main process alone checksums, marks
    complete and renames each checkpoint (every rank's shards included) and prunes the older ones, and every
    rank reads that copy on `--resume`. A base dir on each node's own disk would leave checkpoints that look
    complete on node 0 yet lack the other nodes' shards, with the good ones pruned. So before anything is
    built: the main process writes a random token there, every rank reads it back, and if any cannot, every
    rank refuses in one line (all of them see the same gathered answers, so none is left waiting)."""
    if accelerator.num_processes == 1:
        return
    import secrets
    import socket

    from accelerate.utils import gather_object

    probe = Path(run_dir) / SHARED_PROBE
    if accelerator.is_main_process:
        atomic_write_json(probe, secrets.token_hex(16))
    accelerator.wait_for_everyone()
    try:
        seen = probe.read_text()
    except OSError:
        seen = None
    views = gather_object([(seen, socket.gethostname())])  # after it, every rank has read: the probe can go
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    if blind := [f"rank {rank} on {host}" for rank, (read, host) in enumerate(views) if read != views[0][0]]:
        raise UserError(f"{run_dir}: {', '.join(blind)} cannot read what rank 0 writes there; put --base_dir on a "
                        "file system every node sees (NFS, Lustre, ...), at the same path on each")


def optimizer_file(index: int) -> str:
    """The file Accelerate's save_state writes the `index`-th prepared optimizer's state_dict to."""
    return "optimizer.bin" if index == 0 else f"optimizer_{index}.bin"


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


def _local_part(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: an FSDP2 DTensor's local shard; a ZeRO-3 parameter's partition
    (`ds_tensor`: the parameter itself is an empty placeholder between forwards); else the parameter."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def _check_weights_before_save(accelerator, models, step: int) -> None:
    """Collective: every rank checks its (shard of the) weights; one bad tensor anywhere refuses the save."""
    local = [(name, _local_part(p)) for m in models for name, p in m.named_parameters()]
    bad = nonfinite_tensors(local)
    count = torch.tensor(float(len(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item() > 0:
        names = ", ".join(plain_name(name) for name in bad[:3])
        raise NonFiniteWeights(f"step {step}: the weights hold NaN or inf ({names or 'on another rank'}); "
                               "not saved")


def _is_save_failure(e: BaseException) -> bool:
    """What ends a save as failed, not as a bug: our own refusal (a UserError), and every failed write: any
    OSError (a full disk, a file-size limit, an I/O error), and the ones torch.save and safetensors report as
    their own errors."""
    return isinstance(e, (UserError, OSError)) or is_disk_failure(e)


def remove_unfinished_saves(run_dir: Path) -> list[Path]:
    """Remove every temporary dir of a save that never finished (a crash or kill -9 mid-save), whatever its
    step: a resumed run seldom saves that step again, and each can be as large as a checkpoint. Only the run
    lock's holder calls it, so none of them is being written. -> the removed directories."""
    leftovers = [d for d in Path(run_dir).glob(".step_*.tmp") if d.is_dir()]
    for d in leftovers:
        shutil.rmtree(d)
    return leftovers


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: RunMeta, keep_last: int = 2,
                    models: list | None = None, write_state: Callable[[Path], None] | None = None) -> Path:
    """Collective: every process calls it. Returns the final directory. The one writer of meta.json:
    `meta` with this save's `step`, `files`, `sha256` and `complete`.

    `models` (default: Accelerate's prepared models) are checked for finite weights; `write_state(dir)`
    (default: Accelerate's save_state) writes the training state, collectively: an FSDP2 run passes its
    sharded save (train/checkpoint.py).

    Weights holding NaN or inf raise NonFiniteWeights before anything is written. A failed write, on any rank,
    is one UserError on every rank, naming the step, the directory and the newest checkpoint kept; its partial
    directory is removed and the earlier checkpoints stay (pruning only follows a save that is on disk)."""
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".{final.name}.tmp"
    main = accelerator.is_main_process
    write = write_state or partial(_accelerate_save_state, accelerator)
    _check_weights_before_save(accelerator, accelerator._models if models is None else models, step)
    try:
        # three parts, each ending where every rank meets and learns whether any rank's writes failed
        _on_every_rank(accelerator, lambda: _start_save(run_dir, tmp) if main else None)
        _on_every_rank(accelerator, lambda: write(tmp))
        _on_every_rank(accelerator, lambda: _finish_save(run_dir, tmp, final, meta, step) if main else None)
    except Exception as e:
        if not _is_save_failure(e):
            raise
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier checkpoints are untouched
        # every rank is here (the failure was agreed): each line then names the same free space
        accelerator.wait_for_everyone()
        raise UserError(_save_failure_message(run_dir, step, keep_last, e)) from None
    if main:
        prune(run_dir, step, keep_last)
    accelerator.wait_for_everyone()
    return final


def _start_save(run_dir: Path, tmp: Path) -> None:
    remove_unfinished_saves(run_dir)
    _check_room(run_dir)
    tmp.mkdir(parents=True)


def _check_room(run_dir: Path) -> None:
    """Refuse a save the disk has no room for before anything is written: a save writes about as much as the
    newest checkpoint, and the old ones are pruned only after it. A write that fails mid-way is agreed on every
    rank too, but after a partial checkpoint's space is taken. This check runs on the main process alone (the
    run dir is one file system for every rank: store.check_run_dir_shared)."""
    newest, need, free = _newest_and_room(run_dir)
    if need and free < need:  # what cannot be measured (0) is left to the write itself
        raise OSError(errno.ENOSPC, f"{_human(free)} free, and the newest checkpoint ({newest.name}) takes "
                                    f"{_human(need)}")


def _accelerate_save_state(accelerator, out_dir: Path) -> None:
    """Accelerate's save_state, with every optimizer's state_dict taken first, on every rank. A sharded
    optimizer's (ShardedAdamW under DDP) gathers its rows, a collective that save_state runs after the main
    process has written the model: a main process whose model write failed would skip it, and the others would
    wait there instead of where the failure is agreed. DeepSpeed saves its optimizers itself, collectively."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _deepspeed_save_state(accelerator, out_dir)
        return
    optimizers = accelerator._optimizers
    for opt in optimizers:
        opt.state_dict = (lambda state: lambda: state)(opt.state_dict())  # what save_state calls, taken now
    try:
        accelerator.save_state(str(out_dir))
    finally:
        for opt in optimizers:
            del opt.state_dict


def _deepspeed_save_state(accelerator, out_dir: Path) -> None:
    """Accelerate's save_state under DeepSpeed, whose engines write each rank's files between two barriers of
    their own. A rank whose write raised there would leave the others in the second barrier until the process
    group's timeout, where no agreement (_on_every_rank) reaches them. So each engine's writes (its checkpoint
    engine's `save`, rank 0's copy of the recovery scripts) keep their first failure instead of raising it and
    write nothing more; every rank reaches that barrier, and the failure is raised after the save returns, where
    the ranks agree on it. DeepSpeed's `latest` file, which rank 0 writes in the same stretch with a plain
    open(), is written by _finish_save instead (our loads name the tag)."""
    failures: list[BaseException] = []

    def keeping_failures(write: Callable) -> Callable:
        def call(*args, **kwargs):
            if failures:  # this save is lost already
                return None
            try:
                return write(*args, **kwargs)
            except Exception as e:
                if not _is_save_failure(e):
                    raise
                failures.append(e)
                return None
        return call

    patched = [(owner, name) for engine in accelerator._models
               for owner, name in ((engine.checkpoint_engine, "save"), (engine, "_copy_recovery_script"))]
    for owner, name in patched:  # an instance attribute over the class's method, removed after the save
        setattr(owner, name, keeping_failures(getattr(owner, name)))
    try:
        accelerator.save_state(str(out_dir), save_latest=False)
    finally:
        for owner, name in patched:
            delattr(owner, name)
    if failures:
        raise failures[0]


def _finish_save(run_dir: Path, tmp: Path, final: Path, meta: RunMeta, step: int) -> None:
    """Main process: meta.json with every file's size and sha256, then the rename that makes the save count."""
    if (tmp / DEEPSPEED_TAG).is_dir():  # DeepSpeed's pointer to its tag, which its own tools read
        (tmp / DEEPSPEED_LATEST).write_text(DEEPSPEED_TAG)
    # every file, those in sub-directories too (DeepSpeed writes its states into one per tag)
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    sha256 = {name: sha256_file(tmp / name) for name in files}
    saved = dataclasses.replace(meta, step=step, files=files, sha256=sha256, complete=True)
    atomic_write_json(tmp / META_NAME, saved.to_dict())
    # a machine that dies after the prune (a preempted VM, a power cut) keeps only what reached the disk: the
    # new checkpoint (every rank's files) and its rename must, before the old ones go
    fsync_tree(tmp)
    if final.exists():  # the same step saved again: newest wins
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(run_dir)


def _on_every_rank(accelerator, part: Callable[[], None]) -> None:
    """Collective, where a barrier would be: this rank's `part` of a save, then every rank learns whether any
    rank's part failed to write, and all of them raise the first such failure (by rank). A rank that raised
    alone would leave the others in the save's next collective until the process group's timeout (minutes to
    hours under NCCL). Any other exception (a bug) still ends its own rank alone, with its traceback.

    A failure inside a collective save (DCP's, DeepSpeed's) reaches this only if that save returns on every
    rank: DCP reports it on all of them; DeepSpeed's is made to return (_deepspeed_save_state)."""
    failure = None
    try:
        part()
    except Exception as e:
        if not _is_save_failure(e):
            raise
        failure = e
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failure = next((f for f in gather_object([_portable(failure)]) if f is not None), None)
    if failure is not None:
        raise failure


def _portable(e: BaseException | None) -> BaseException | None:
    """`e` as every rank unpickles it and reads it alike: a UserError's text; else the errno (an OSError's, or
    the one safetensors names in its text) and the text, without a library's own type; else torch's failed
    write as its RuntimeError text."""
    if e is None:
        return None
    if isinstance(e, UserError):
        return UserError(str(e))
    code = errno_of(e)
    if code is not None:
        return OSError(code, e.strerror if isinstance(e, OSError) and e.strerror else str(e))
    return OSError(str(e)) if isinstance(e, OSError) else RuntimeError(str(e))


def _save_failure_message(run_dir: Path, step: int, keep_last: int, e: BaseException) -> str:
    """One line: which step was lost and why, for a full disk what a save needs, and what is kept to go on from."""
    why = str(e) if isinstance(e, UserError) else disk_failure_message(run_dir, e)
    newest, size, free = _newest_and_room(run_dir)
    if newest is None:
        return f"step {step} was not saved: {why}; its partial files are removed; this run has no earlier checkpoint"
    room = ""
    if size and (errno_of(e) in (errno.ENOSPC, errno.EDQUOT) or free < size):
        # pruning follows a save, so the kept ones and the new one must all fit at once
        kept = f"the --keep_last {keep_last} kept" if keep_last else "every one kept (--keep_last 0)"
        room = f" (a checkpoint takes {_human(size)}, {_human(free)} are free: a save needs room beside {kept})"
    return (f"step {step} was not saved: {why}{room}; its partial files are removed and the newest checkpoint, "
            f"{newest.name}, is kept: continue from it with --resume auto")


def _newest_and_room(run_dir: Path) -> tuple[Path | None, int, int]:
    """(the newest checkpoint, its bytes, the bytes free on run_dir's disk): what one more save needs and has.
    The sizes are 0 without a checkpoint, or on a failing disk that cannot say (the caller's line must still
    come out)."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return None, 0, 0
    try:
        return newest, sum(p.stat().st_size for p in newest.rglob("*") if p.is_file()), shutil.disk_usage(run_dir).free
    except OSError:
        return newest, 0, 0


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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
    logs = split_logs(run_dir, step, log)
    aside = None
    try:
        with uninterruptible():  # a stop between the moves would leave the logs of one branch, the checkpoints of both
            if newer or any(later for _, later in logs.values()):
                aside = _new_abandoned_dir(run_dir)
            rewrite_logs(run_dir, logs, aside)
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
    """Move a run's checkpoints, metrics, tracker logs and profile into `run_dir/previous_<n>/` (a run started
    over with --force): the new run's curves must not mix with the old one's, nor its profile overwrite it."""
    run_dir = Path(run_dir)
    n = 0
    while (run_dir / f"previous_{n}").exists():
        n += 1
    aside = run_dir / f"previous_{n}"
    with uninterruptible():  # all of the old run moves, or a stop would leave a mix of two runs
        aside.mkdir()
        for child in run_dir.iterdir():
            if STEP_DIR_RE.match(child.name) or child.name in (*LOG_NAMES, TRACKER_DIR, PROFILE_DIR):
                child.rename(aside / child.name)
    return aside


def verify_checkpoint(step_dir: Path) -> RunMeta:
    """load_meta (every file whole), and weights that are finite (a checkpoint of a diverged run, as
    versions before 2026-12-06 could save, is refused). Reads the weights one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    meta = load_meta(step_dir)
    path = Path(step_dir) / MODEL_FILE
    # Sharded (FSDP2) and DeepSpeed checkpoints keep their weights in shards, which no rank should read whole
    # to resume: every rank checks its part before each save instead (a ZeRO-3 save checked only the empty
    # placeholders of its parameters before 2026-12-06); convert and eval check the whole weights they read
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                check_finite_weights(((key, f.get_tensor(key)) for key in f.keys()), path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read the model weights ({e}); the checkpoint is corrupt") from None
    return meta


def find_resume(run_dir: Path, resume: str, log=print) -> tuple[Path, RunMeta] | None:
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


def find_resume_agreed(accelerator, run_dir: Path, resume: str, log=print) -> tuple[Path, RunMeta] | None:
    """find_resume on every rank, then one answer for all of them. Each rank verifies and chooses on its own
    reads; a rank whose read of the newest checkpoint failed a check that the others' passed, or a relative
    --resume that names a directory in one node's working directory only, would load another step than the
    rest, and under FSDP2 or ZeRO its next save would join shards of two steps into a checkpoint that passes
    every check (and prunes the good ones). So the ranks compare choices: a refusal on any rank is every
    rank's (none is left waiting in the next collective), and different choices are refused in one line."""
    found, error = None, None
    try:
        found = find_resume(run_dir, resume, log)
    except UserError as e:
        error = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        mine = (str(found[0].resolve()), found[1].step) if found else None
        views = gather_object([(mine, error)])
        errors = [(rank, e) for rank, (_, e) in enumerate(views) if e is not None]
        if errors:
            rank, error = errors[0]
            error = error if rank == 0 else f"(rank {rank}) {error}"
        elif any(choice != views[0][0] for choice, _ in views):
            chose = "; ".join(f"rank {rank}: {f'step {c[1]} at {c[0]}' if c else 'none'}"
                              for rank, (c, _) in enumerate(views))
            raise UserError(f"--resume {resume}: the ranks chose different checkpoints ({chose}); every rank must "
                            "read the same verified checkpoint: check that the run dir is one shared file system "
                            "and that --resume is an absolute path")
    if error is not None:
        raise UserError(error)
    return found


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


def is_deepspeed_checkpoint(step_dir: Path) -> bool:
    return (Path(step_dir) / DEEPSPEED_TAG).is_dir()


def load_deepspeed_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO-2/3 checkpoint, whole, with nanochat's names: DeepSpeed's own zero-to-fp32
    path, which reads every rank's shards on one CPU process (no GPU, no process group)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise UserError(f"{step_dir}: a DeepSpeed checkpoint; reading it needs DeepSpeed ({e}): "
                        "pip install 'nanochat-unsloth[deepspeed]'") from None
    # it reports its progress with print and progress bars; what goes wrong, it raises
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_TAG)
    return {k: v.contiguous() for k, v in state.items()}


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
    if sharded.is_sharded_checkpoint(step_dir):
        path, state = step_dir / sharded.SHARDED_DIR, sharded.load_weights(step_dir)
    elif not path.exists() and is_deepspeed_checkpoint(step_dir):
        path, state = step_dir / DEEPSPEED_TAG, load_deepspeed_weights(step_dir)
    else:
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read the model weights ({e}); the checkpoint is corrupt") from None
    check_finite_weights(state.items(), path)
    return strip_wrapper_prefixes(state)
