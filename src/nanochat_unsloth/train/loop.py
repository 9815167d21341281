"""The training loop: nanochat's base_train, with Accelerate owning devices, precision and processes.

`_train` reads as its stages, each a helper below it in order: setup -> inputs -> model -> horizon ->
optimizers -> resume -> the step loop -> the summary. The step math (schedules, Muon, AdamW, clipping)
lives in `optim.py` and `step.py`; this file only sequences it. Everything that can be refused (flags,
trackers, the run lock, shards, the val split, the CORE eval bundle) is checked before the model is
built; --no_repeat_data, which needs the horizon, right after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nanochat_unsloth.checkpoint import store
from nanochat_unsloth.checkpoint.logs import PROFILE_DIR, read_jsonl_records
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.resume import check_keep_last, check_resume
from nanochat_unsloth.checkpoint.train_state import TrainState
from nanochat_unsloth.common import (EXIT_STOPPED, Diverged, UserError, disk_failure_message, get_base_dir,
                                     stop_if_pending)
from nanochat_unsloth.eval.metrics import evaluate_bpb, greedy_completions
from nanochat_unsloth.model import cpu_probe, fp8
from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.model.gpt import GPT, PROMISED_FLOPS_H100, GPTConfig
from nanochat_unsloth.model.memory import out_of_memory_advice
from nanochat_unsloth.tokenizer import load_checked_tokenizer, load_token_bytes
from nanochat_unsloth.shards.loader import TokenShardLoader
from nanochat_unsloth.shards.manifest import ShardManifest
from nanochat_unsloth.train import checkpoint as ckpt
from nanochat_unsloth.train import bf16_gemm, deepspeed_zero, optim, trackers
from nanochat_unsloth.train.config import TrainConfig
from nanochat_unsloth.train.core_metric import core_bundle_for, core_due, run_core_metric, tracker_values
from nanochat_unsloth.train.data_budget import data_budget_line
from nanochat_unsloth.train.device import resolve_device_type
from nanochat_unsloth.train.launcher import exit_when_orphaned, launched_by_launcher, stop_with_parent
from nanochat_unsloth.train.phase_timer import profiled_step
from nanochat_unsloth.train.resolve import ResolvedOptions, model_options, resolve
from nanochat_unsloth.train.setup import prepare_for_training
from nanochat_unsloth.train.step import optimizer_step


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves at the end of the current step, then exits.

    Later signals are noted and ignored: a launcher (torchrun, scancel, systemd's stop of a control group)
    forwards its own SIGTERM right after the one the worker got, and that must not abandon the save. SIGKILL
    still stops the process at once, without saving."""

    def __init__(self):
        self.requested = False

    def install(self):
        stop_if_pending()  # a start-up stop put off until now ends the start-up, as on every other process
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def settle(self):
        """After the loop: once a stop was asked for, later signals are ignored, not left to the default
        action Python restores while it exits (which would end a saved run as killed by the signal)."""
        if self.requested:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame):
        # os.write, not print: a handler that prints while the loop is printing hits a reentrant-call error
        if self.requested:
            _say(f"[signal {signum}] already stopping: finishing this step and saving (kill -9 {os.getpid()} "
                 "abandons the save)")
            return
        self.requested = True
        _say(f"[signal {signum}] finishing this step, saving a checkpoint, then exiting")


def _say(line: str) -> None:
    try:
        os.write(2, f"\n{line}\n".encode())
    except OSError:
        pass


def console_print(print_fn: Callable[..., None]) -> Callable[..., None]:
    """`print_fn` that outlives its console. `train ... | tee log` and Ctrl-C: the terminal's SIGINT ends tee
    as well, and the lines the graceful stop prints then raise BrokenPipeError, which would end the run
    before its save. Once stdout's reader is gone the run's lines go to /dev/null (metrics.jsonl keeps the
    numbers); the file descriptor is replaced, so the flush at exit cannot fail either."""
    def print0(*args, **kwargs):
        try:
            print_fn(*args, **kwargs)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    return print0


def diverged_notice(e: Diverged, run_dir: Path) -> str:
    """What a diverged run says before it exits: nothing of it was saved, so the newest checkpoint is good."""
    last = store.newest_checkpoint(run_dir)
    if last is None:
        return f"{e}. Stopping: no checkpoint was saved before it; lower the LRs and start again"
    return (f"{e}. Stopping: the last good checkpoint, {last}, is kept; lower the LRs and continue it with "
            "--resume auto --force")


def _val_evaluated(run_dir: Path, step: int) -> bool:
    """Whether the run's eval.jsonl holds a val bpb record of `step`."""
    path = run_dir / "eval.jsonl"
    return path.exists() and any(r.get("step") == step and "val_bpb" in r for r in read_jsonl_records(path))


def eval_steps_for(cfg: TrainConfig, world_size: int, val_loader: TokenShardLoader) -> int:
    """Val batches per rank per evaluation (0: --eval_tokens 0, none). Refuses a budget below one batch.
    Sets which val windows an evaluation scores, the same on any number of processes (shards/loader.py)."""
    if cfg.eval_tokens == 0:
        return 0
    per_batch = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.eval_tokens < per_batch:
        raise UserError(f"--eval_tokens {cfg.eval_tokens:,} is less than one val batch on every process "
                        f"({cfg.device_batch_size} x {cfg.max_seq_len} x {world_size} = {per_batch:,}); raise it, "
                        "or pass --eval_tokens 0 to train without val evaluation")
    val_loader.set_eval_windows(min(eval_windows_asked(cfg), val_loader.num_windows))
    return val_loader.batches_per_rank


def eval_windows_asked(cfg: TrainConfig) -> int:
    """The val windows of --device_batch_size x --max_seq_len that --eval_tokens asks an evaluation to score."""
    return cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len)


def val_capped_notice(cfg: TrainConfig, val_loader: TokenShardLoader) -> str | None:
    """The line that says an evaluation scores less than --eval_tokens asked for: the val split once, where
    nanochat's loader would go round it again (scoring some windows twice)."""
    windows = eval_windows_asked(cfg)
    if windows <= val_loader.num_windows:
        return None
    return (f"notice: --eval_tokens {cfg.eval_tokens:,} asks for {windows:,} val windows of --device_batch_size "
            f"{cfg.device_batch_size} x --max_seq_len {cfg.max_seq_len}; the val split holds {val_loader.num_windows:,}, "
            "so each evaluation scores each of them once (nanochat's loader would read them again)")


def peak_memory_gib(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return 0.0


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training run. -> a summary; "stopped_at" in it when stopped before the end."""
    locks: list = []
    try:
        return _train(cfg, locks)
    finally:  # an in-process caller may start the next run at once: never leave the run tag locked
        for lock in locks:
            lock.release()


@dataclass
class _Session:
    """What setup decides once and every later stage reads: Accelerate's processes and device, the run's
    directory, the resolved `auto` flags and the trackers asked for."""

    accelerator: Any
    device: torch.device
    device_type: str
    rank: int
    world_size: int
    master: bool
    print0: Callable[..., None]
    base_dir: Path
    run_dir: Path
    resolved: ResolvedOptions
    tracker_names: list

    def log_jsonl(self, path: Path, record: dict) -> None:
        """The run's records are written by the main process alone, so each line appears once."""
        if self.master:
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk, a size limit: one line (a torn line is dropped on resume)
                raise UserError(disk_failure_message(path, e)) from None


@dataclass
class _Inputs:
    """The run's verified inputs: the shards and their tokenizer, the loaders, the CORE bundle, ZeRO's set-up."""

    shards_dir: Path
    manifest: ShardManifest
    encoding: Any
    token_bytes: torch.Tensor
    core_bundle: Any
    grad_accum: int
    train_loader: TokenShardLoader
    val_loader: TokenShardLoader
    eval_steps: int
    zero: deepspeed_zero.ZeroRun | None


@dataclass
class _Built:
    """The model as built, before Accelerate: what it was built from and its size."""

    raw_model: GPT
    model_config: GPTConfig
    options: ModelOptions
    num_params: int
    flops_per_token: int


@dataclass
class _Trainee:
    """The model as built and as prepared, its optimizers and what a checkpoint saves of them."""

    model_config: GPTConfig
    raw_model: GPT  # uncompiled, unwrapped: sampling and checkpoint naming use it
    model: Any  # what the step calls: Accelerate's wrapper, compiled or not
    optimizers: list
    cuda_graphs: bool
    train_state: TrainState
    checkpointed: ckpt.Checkpointed
    whole_weights_nowhere: bool  # FSDP2 and ZeRO-3: any forward of the raw model is a collective
    flops_per_token: int
    num_iterations: int


@dataclass
class _Run:
    """Everything the step loop reads, and what it carries from step to step (the latest val bpb goes into
    each checkpoint's meta; the summary reports the best one)."""

    cfg: TrainConfig
    s: _Session
    data: _Inputs
    t: _Trainee
    start_step: int
    result: dict
    val_bpb: float | None = None
    min_val_bpb: float = float("inf")
    total_time: float = 0.0

    def meta(self) -> RunMeta:
        """What a resume checks this run against: its configs, inputs, layout and resolved flags."""
        cfg, s, data, t = self.cfg, self.s, self.data, self.t
        return RunMeta(
            model_config=dataclasses.asdict(t.model_config),
            train_config=cfg.to_dict(),
            tokenizer_sha256=data.manifest.tokenizer.sha256,
            shards_sha256=data.manifest.fingerprint(),
            val_bpb=self.val_bpb,
            world_size=s.world_size,
            grad_accum=data.grad_accum,
            device_type=s.device_type,
            num_iterations=t.num_iterations,
            cpu_bf16=s.resolved.cpu_bf16,
            resolved=s.resolved.to_dict(),
            deepspeed=data.zero.describe() if data.zero else None,
        )

    def save(self, step: int) -> Path:
        """Collective. Weights holding NaN or inf are not saved: the run stops on the last good checkpoint. So
        does a failed write (a UserError naming the newest checkpoint): a full disk seldom frees itself, and a run
        going on unsaved would lose every step since then to the next kill, not just the ones since that save."""
        try:
            return ckpt.save_checkpoint(self.s.accelerator, self.s.run_dir, step, self.meta(), self.cfg.keep_last,
                                        self.t.checkpointed)
        except Diverged as e:
            self.s.print0(diverged_notice(e, self.s.run_dir))
            raise


def _train(cfg: TrainConfig, locks: list) -> dict:
    """nanochat's base_train as stages: set up, open the inputs, build, resume, train, sum up. Everything that
    can be refused is refused before the model is built, so a bad flag or input costs seconds."""
    s = _start_session(cfg, locks)
    data = _open_inputs(cfg, s)
    built = _build_model(cfg, s, data)
    num_iterations = _plan_horizon(cfg, s, data, built)
    t = _prepare_trainee(cfg, s, data, built, num_iterations)
    start_step, complete = _resume(cfg, s, data, t)
    result = {"start_step": start_step, "num_iterations": num_iterations, "run_dir": str(s.run_dir), "val_bpb": []}
    if complete:
        return {**result, "already_complete": True, "final_step": start_step}
    trackers.start_trackers(s.accelerator, s.tracker_names, cfg.run, s.run_dir, cfg.to_dict(), start_step)
    run = _Run(cfg, s, data, t, start_step, result)
    _step_loop(run)
    return _finish(run)


# ---- setup ---------------------------------------------------------------------------------------


def _start_session(cfg: TrainConfig, locks: list) -> _Session:
    """Flags, trackers and the device first, then Accelerate and every `auto` decided once; the main process
    takes the run's lock here, before anything is built, so a second run on the same tag is refused at once."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.validate()  # flags first: nothing is built for a run that cannot start
    tracker_names = trackers.resolve_trackers(cfg.run, cfg.tracker)  # an unknown or uninstalled one: refused now
    device_type = resolve_device_type(cfg.device_type)
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if launched_by_launcher():  # a kill -9 of torchrun / accelerate launch must not leave us training
        stop_with_parent()
        exit_when_orphaned()
    base_dir = get_base_dir(cfg.base_dir or None)
    run_dir = store.run_dir_for(base_dir, cfg.tag)
    accelerator = Accelerator(mixed_precision="bf16" if device_type == "cuda" else "no",
                              **deepspeed_zero.accelerator_kwargs(device_type),  # cpu=..., and what DeepSpeed needs
                              **trackers.accelerator_kwargs(tracker_names, run_dir))
    device, device_type = accelerator.device, accelerator.device.type
    world_size = accelerator.num_processes
    print0 = console_print(accelerator.print)
    set_seed(cfg.seed)
    # every `auto` decided once, before the model exists (the CPU bf16 probe times clean matmuls)
    resolved = resolve(cfg, device, world_size, deepspeed_zero.zero_stage(accelerator))
    print0(resolved.line())
    if device_type == "cpu":
        bf16_gemm.configure_cpu_bf16(resolved.cpu_bf16)
        print0(cpu_probe.bf16_summary(resolved.cpu_bf16))

    # the main process holds the lock for the run's life; a refused rank 0 takes the other ranks down
    # with it (the launcher stops every worker when one fails)
    if accelerator.is_main_process:
        locks.append(store.lock_run(run_dir))
    store.check_run_dir_shared(accelerator, run_dir)  # several nodes: one base dir that all of them see
    return _Session(accelerator, device, device_type, accelerator.process_index, world_size,
                    accelerator.is_main_process, print0, base_dir, run_dir, resolved, tracker_names)


def _open_inputs(cfg: TrainConfig, s: _Session) -> _Inputs:
    """The tokenizer, shards and CORE bundle before the model, so shards too short for --max_seq_len, a val
    split too small for one evaluation or a missing eval bundle are refused in seconds; each shard's sha256
    and token ids are checked here once."""
    shards_dir = Path(cfg.shards) if cfg.shards else s.base_dir / "shards"
    tokenizer_dir = s.base_dir / "tokenizer"
    manifest = ShardManifest.load(shards_dir)
    vocab_size = manifest.tokenizer.vocab_size
    encoding, _ = load_checked_tokenizer(
        tokenizer_dir, f"the shards in {shards_dir}", manifest.tokenizer.sha256, vocab_size,
        fix="re-run prep with it, or point --base-dir at the matching tokenizer")
    token_bytes = load_token_bytes(tokenizer_dir, s.device)
    # a missing or damaged eval bundle: refused now
    core_bundle = core_bundle_for(cfg.core_metric_every, s.base_dir, cfg.core_metric_max_per_task)

    grad_accum = optim.grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, s.world_size)
    t_verify = time.time()
    train_loader = TokenShardLoader(
        shards_dir, "train", cfg.device_batch_size, cfg.max_seq_len, rank=s.rank, world_size=s.world_size,
        grad_accum=grad_accum, device=s.device, tokenizer_sha256=manifest.tokenizer.sha256, verify_checksums=True,
    )
    val_loader = TokenShardLoader(
        shards_dir, "val", cfg.device_batch_size, cfg.max_seq_len, rank=s.rank, world_size=s.world_size,
        device=s.device, tokenizer_sha256=manifest.tokenizer.sha256, verify_checksums=True,
    )
    eval_steps = eval_steps_for(cfg, s.world_size, val_loader)
    if eval_steps and (capped := val_capped_notice(cfg, val_loader)):
        s.print0(capped)
    s.print0(f"shards: {manifest.totals()['train']['tokens']:,} train / {manifest.totals()['val']['tokens']:,} val "
             f"tokens, checksums verified in {time.time() - t_verify:.1f}s")
    train_loader.allow_new_layout = cfg.force
    zero = deepspeed_zero.configure(s.accelerator, cfg, grad_accum)  # None unless DeepSpeed; refusals here
    return _Inputs(shards_dir, manifest, encoding, token_bytes, core_bundle, grad_accum, train_loader, val_loader,
                   eval_steps, zero)


# ---- model, horizon, optimizers ------------------------------------------------------------------


def _build_model(cfg: TrainConfig, s: _Session, data: _Inputs) -> _Built:
    """The model on the device, and the line that describes it. Its size is counted here, before
    Accelerate may shard or partition its parameters."""
    model_config = GPTConfig.from_depth(cfg.depth, cfg.max_seq_len, data.manifest.tokenizer.vocab_size)
    options = model_options(cfg, s.resolved)
    try:  # what only the build can tell: --lean_blocks against the model's depth, torchao for its recipes
        model = build_model(model_config, options, s.device, cfg.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    n_lean = model.block_memory.count(cfg.memory)
    what = "checkpointed" if cfg.memory == "lean" else "recomputing their MLP"
    partial_lean = f" ({n_lean} of {cfg.depth} blocks {what})" if 0 < n_lean < cfg.depth else ""
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()
    s.print0(f"model: depth {cfg.depth}, n_embd {model_config.n_embd}, heads {model_config.n_head}, "
             f"{num_params:,} params, {flops_per_token:e} FLOPs/token, kernels={model.ops.label}, memory={cfg.memory}"
             f"{partial_lean}, "
             f"optimizer={cfg.optimizer}")
    return _Built(model, model_config, options, num_params, flops_per_token)


def _plan_horizon(cfg: TrainConfig, s: _Session, data: _Inputs, built: _Built) -> int:
    """The number of steps (which may come from a FLOPs or data:param target, so it needs the built model),
    and the batch and data-budget lines; --no_repeat_data is refused here when the shards are too few."""
    num_iterations = optim.resolve_num_iterations(
        cfg.num_iterations, cfg.target_flops, cfg.target_param_data_ratio, built.num_params, built.flops_per_token,
        cfg.total_batch_size,
    )
    s.print0(f"batch: {cfg.device_batch_size} x {cfg.max_seq_len} x {s.world_size} procs x {data.grad_accum} accum "
             f"= {cfg.total_batch_size:,} tokens/step; {num_iterations:,} steps")
    s.print0(data_budget_line(num_iterations, cfg.total_batch_size, data.grad_accum * s.world_size,
                              data.train_loader.num_windows, data.manifest.totals()["train"]["tokens"],
                              data.shards_dir, cfg.no_repeat_data))
    return num_iterations


def _prepare_trainee(cfg: TrainConfig, s: _Session, data: _Inputs, built: _Built, num_iterations: int) -> _Trainee:
    """Optimizers, Accelerate's wrapping and compilation (train/setup.py, shared with the throughput
    benchmark), and what a checkpoint saves and loads of them."""
    from accelerate import DistributedType

    raw_model = built.raw_model
    prepared = prepare_for_training(
        s.accelerator, raw_model, built.options, cfg.optimizer, embedding_lr=cfg.embedding_lr,
        unembedding_lr=cfg.unembedding_lr, matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
    )
    sharded_weights = s.accelerator.distributed_type == DistributedType.FSDP
    train_state = TrainState(raw_model, s.accelerator)  # the step, the loss EMA, the FP8 scaling histories
    # FSDP2: checkpoints are saved sharded and loaded by us, not by Accelerate (train/fsdp.py says why)
    checkpointed = ckpt.Checkpointed(raw_model, prepared.optimizers, data.train_loader, train_state,
                                     fsdp2=sharded_weights)
    # FSDP2 and ZeRO-3: no rank holds whole weights, so any forward of the raw model is a collective
    whole_weights_nowhere = sharded_weights or bool(data.zero and data.zero.partitioned_weights)
    s.accelerator.register_for_checkpointing(data.train_loader)
    return _Trainee(built.model_config, raw_model, prepared.model, prepared.optimizers, prepared.cuda_graphs,
                    train_state, checkpointed, whole_weights_nowhere, built.flops_per_token, num_iterations)


# ---- resume --------------------------------------------------------------------------------------


def _resume(cfg: TrainConfig, s: _Session, data: _Inputs, t: _Trainee) -> tuple[int, bool]:
    """Continue from a verified checkpoint (--resume), or start at step 0 after setting any earlier run aside
    (--force). Nothing is ever deleted: what a run leaves behind moves to previous_N/ or to a branch.
    -> (the step to start from, whether the run's own final checkpoint was found: then nothing is to be done)."""
    # verifies sha256 (--resume auto skips damaged ones), on every rank, which must agree on the choice
    resume = store.find_resume_agreed(s.accelerator, s.run_dir, cfg.resume, s.print0)
    if cfg.resume and resume is None:
        if store.list_checkpoints(s.run_dir) and not cfg.force:
            raise UserError(f"--resume {cfg.resume}: no checkpoint in {s.run_dir} verifies (each is named above); "
                            "pass --force to start over (they are moved to previous_N/, not deleted)")
        s.print0(f"--resume {cfg.resume}: no checkpoint in {s.run_dir} yet, starting from step 0")
    start_step = 0
    if resume is not None:
        resume_dir, meta = resume
        start_step = meta.step
        if check_resume(meta, cfg, resume_dir, data.manifest, data.shards_dir, t.num_iterations, s.print0,
                        s.resolved.to_dict()):
            # the run's own final checkpoint: load nothing, evaluate nothing, write nothing
            s.print0(f"{resume_dir}: the run is already complete (step {start_step} of {t.num_iterations}); "
                     "nothing to do")
            if cfg.eval_tokens and not _val_evaluated(s.run_dir, start_step):
                # a stop during the last step saves the final checkpoint and skips the evaluation after it: a
                # scheduler's grace period may not hold both, and the weights matter more than their score
                s.print0(f"notice: its final val evaluation never ran (stopped during its last step); score it with "
                         f"`nanochat-unsloth eval {s.run_dir} --step {start_step}`")
            return start_step, True
        # a checkpoint of another run dir (another tag, previous_N/, abandoned/) starts this tag over from
        # it: the tag's own checkpoints are another history, which its saves would prune and its logs mix
        foreign = Path(resume_dir).resolve().parent != s.run_dir.resolve()
        if not foreign:  # its saves prune the checkpoints of the run it continues
            check_keep_last(meta, cfg)
        own_run = foreign and bool(store.list_checkpoints(s.run_dir))
        if own_run and not cfg.force:  # every rank raises
            raise UserError(f"{s.run_dir} already holds checkpoints of its own run, and --resume {cfg.resume} is "
                            f"another run's; pass --force to set them aside (moved to previous_N/, not deleted) "
                            "and continue from it here, or --model_tag to continue it under another tag")
        _load_checkpoint(s, data, t, resume_dir, meta)
        if cfg.no_repeat_data and data.train_loader.reads_again:  # the data budget counts from step 0 of this layout
            raise UserError(f"--no_repeat_data refuses this resume, which reads trained tokens again: "
                            f"{data.train_loader.notice}; resume with the checkpoint's --total_batch_size, or drop "
                            "--no_repeat_data")
        if s.master and own_run:
            aside = store.set_aside(s.run_dir)
            s.print0(f"--force: moved this tag's own checkpoints and metrics to {aside}")
        if s.master:  # what came after this step (a rollback's newer checkpoints, later records) moves aside;
            # all of a foreign resume's records are another run's
            store.start_branch(s.run_dir, 0 if foreign else start_step, s.print0)
    elif store.list_checkpoints(s.run_dir):  # every rank checks, so every rank raises (none is left waiting)
        if not cfg.force:
            raise UserError(f"{s.run_dir} already holds checkpoints; pass --resume auto to continue it, "
                            "--model_tag to start another run, or --force to start over")
        if s.master:  # starting over: set the old run aside (never delete it), so --resume auto cannot pick it
            aside = store.set_aside(s.run_dir)
            s.print0(f"--force: moved the previous run's checkpoints and metrics to {aside}")
    if s.master and resume is None:  # records of a run that never saved are another branch's: aside too
        store.start_branch(s.run_dir, 0, s.print0)
    s.accelerator.wait_for_everyone()
    return start_step, False


def _load_checkpoint(s: _Session, data: _Inputs, t: _Trainee, resume_dir: Path, meta: RunMeta) -> None:
    """Weights, optimizer states, the loader's position and the train state, keeping this run's LRs; then
    whatever the loader and the train state had to adapt is said."""
    deepspeed_zero.check_resume(meta, data.zero, resume_dir)
    # load_state restores the optimizers' param_groups too; keep this run's LRs (they differ from the
    # checkpoint's only when --force allowed it)
    initial_lrs = [[group["initial_lr"] for group in opt.param_groups] for opt in t.optimizers]
    ckpt.load_training_state(s.accelerator, resume_dir, t.checkpointed, meta)
    for opt, lrs in zip(t.optimizers, initial_lrs):
        for group, lr in zip(opt.param_groups, lrs):
            group["initial_lr"] = lr
    if data.train_loader.notice:
        s.print0(data.train_loader.notice)
    if t.train_state.notice:
        s.print0(t.train_state.notice)
    if meta.fresh_optimizer:
        s.print0(f"resuming from imported weights at step {meta.step} with a fresh optimizer state")
    s.print0(f"resumed from {resume_dir} at step {meta.step}")


# ---- the step loop -------------------------------------------------------------------------------


def _step_loop(run: _Run) -> None:
    """Evaluate when due, then one optimizer step, its log line, and a save or a stop when due. The final
    step evaluates and saves without stepping; a stop (a signal, --stop_after) saves, then leaves the loop."""
    stop = StopRequest()
    stop.install()
    while True:
        step = run.t.train_state.step  # optimizer steps complete so far
        last_step = step == run.t.num_iterations
        _evaluate_when_due(run, step, last_step)
        if last_step:
            run.save(step)
            break
        out, dt = _timed_step(run, step)
        run.t.train_state.step += 1
        step = run.t.train_state.step  # `step` optimizer steps are now complete
        _log_step(run, step, out, dt)
        if _save_or_stop(run, stop, step):
            break
    stop.settle()


def _evaluate_when_due(run: _Run, step: int, last_step: bool) -> None:
    """Val bits per byte, nanochat's CORE metric and greedy samples, each at its own interval and at the end."""
    cfg, s, data, t = run.cfg, run.s, run.data, run.t
    # once in a while: val bits per byte (all ranks take part)
    if data.eval_steps and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
        t.model.eval()
        with s.accelerator.autocast():
            val_bpb = evaluate_bpb(t.model, data.val_loader, data.eval_steps, data.token_bytes)  # restarts val
        t.model.train()
        run.val_bpb = val_bpb
        run.min_val_bpb = min(run.min_val_bpb, val_bpb)
        s.print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
        s.log_jsonl(s.run_dir / "eval.jsonl", {"step": step, "val_bpb": val_bpb})
        run.result["val_bpb"].append((step, val_bpb))
        s.accelerator.log({**_progress(run, step), "val/bpb": val_bpb}, step=step)

    # once in a while: nanochat's CORE metric (all ranks take part; the uncompiled model, as shapes vary)
    if data.core_bundle is not None and core_due(cfg.core_metric_every, step, last_step):
        core = run_core_metric(t.raw_model, data.encoding, data.core_bundle, s.device, cfg.core_metric_max_per_task,
                               s.accelerator.autocast, not t.whole_weights_nowhere, step, s.print0)
        s.log_jsonl(s.run_dir / "eval.jsonl", core)
        s.accelerator.log({**_progress(run, step), **tracker_values(core)}, step=step)

    # once in a while: greedy samples of nanochat's prompts (uncompiled model). Under FSDP and ZeRO-3 every
    # rank holds a shard of the weights, so every rank must run the forward; otherwise only the main one does.
    if (s.master or t.whole_weights_nowhere) and (
            last_step or (cfg.sample_every > 0 and step > 0 and step % cfg.sample_every == 0)):
        t.raw_model.eval()
        with s.accelerator.autocast():
            for text in greedy_completions(t.raw_model, data.encoding):
                s.print0(f"  sample: {text!r}")
        t.raw_model.train()


def _timed_step(run: _Run, step: int):
    """One optimizer step (grad_accum micro-batches on every process), timed between device syncs. A diverged
    step or an out-of-memory error ends the run with one line that says what to do.
    -> (step.StepResult, seconds)."""
    cfg, s, data, t = run.cfg, run.s, run.data, run.t
    if s.device_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    try:
        with profiled_step(s.run_dir / PROFILE_DIR, s.rank, step, s.device, step == cfg.profile_step) as timer:
            out = (data.zero.optimizer_step if data.zero else optimizer_step)(
                s.accelerator, t.model, t.raw_model, t.optimizers, lambda: next(data.train_loader), data.grad_accum,
                step, t.num_iterations, grad_clip=cfg.grad_clip, warmup_ratio=cfg.warmup_ratio,
                warmdown_ratio=cfg.warmdown_ratio, final_lr_frac=cfg.final_lr_frac,
                global_mean=lambda x: s.accelerator.reduce(x, reduction="mean").item(), timer=timer,
                cuda_graphs=t.cuda_graphs,
            )
    except Diverged as e:
        s.print0(diverged_notice(e, s.run_dir))
        raise
    except torch.OutOfMemoryError:
        total = torch.cuda.get_device_properties(s.device).total_memory / 2**30 if s.device_type == "cuda" else 0.0
        suggest_fp8 = not t.raw_model.ops.fp8 and fp8.fp8_supported(s.device)[0]
        raise UserError(out_of_memory_advice(cfg.device_batch_size, cfg.memory, cfg.lean_blocks, suggest_fp8,
                                             peak_memory_gib(s.device_type), total)) from None
    if s.device_type == "cuda":
        torch.cuda.synchronize()
    return out, time.time() - t0


def _log_step(run: _Run, step: int, out, dt: float) -> None:
    """nanochat's step line, and the same numbers to metrics.jsonl and the trackers. `step` optimizer steps
    are complete; the line and the record name the step just taken (`step - 1`)."""
    cfg, s, t = run.cfg, run.s, run.t
    step_loss, lrm, grad_norm = out.global_loss, out.lrm, out.global_grad_norm
    num_iterations = t.num_iterations
    debiased = t.train_state.record_loss(step_loss)
    tok_per_sec = cfg.total_batch_size / dt
    mfu = 100 * t.flops_per_token * cfg.total_batch_size / dt / (PROMISED_FLOPS_H100 * s.world_size)
    # the first steps compile and warm up: left out of the training time (nanochat's `step > 10` on the 0-based
    # step just taken leaves out 11)
    if step - 1 - run.start_step > 10:
        run.total_time += dt
    mem = peak_memory_gib(s.device_type)
    gn = f" grad norm: {grad_norm:.4f} |" if grad_norm is not None else ""
    s.print0(f"step {step - 1:05d}/{num_iterations:05d} ({100 * (step - 1) / num_iterations:.2f}%) | "
             f"loss: {debiased:.6f} (raw {step_loss:.4f}) |{gn} lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
             f"tok/sec: {tok_per_sec:,.0f} | mfu: {mfu:.2f} | mem: {mem:.1f}GiB | "
             f"total time: {run.total_time / 60:.2f}m")
    record = {"step": step - 1, "loss": step_loss, "smooth_loss": debiased, "lrm": lrm, "grad_norm": grad_norm,
              "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, "peak_mem_gib": mem, "time": time.time()}
    if s.device_type == "cuda":  # cumulative; a retry frees cached blocks and synchronizes: a slow step's sign
        record["alloc_retries"] = torch.cuda.memory_stats(s.device).get("num_alloc_retries", 0)
    s.log_jsonl(s.run_dir / "metrics.jsonl", record)
    # nanochat's "train/loss" is the debiased smooth loss (its step line's "loss:"): dashboards built on it
    # get that curve; the raw step loss goes beside it
    names = {"loss": "raw_loss", "smooth_loss": "loss"}
    s.accelerator.log({**_progress(run, step - 1), **{f"train/{names.get(k, k)}": v for k, v in record.items()
                                                       if k not in ("step", "time") and v is not None}}, step=step - 1)


def _progress(run: _Run, step: int) -> dict:
    """What nanochat's base_train logs beside every tracker record: the step as a value (its wandb x-axis is a
    call counter, so dashboards plot against this key), the FLOPs of the `step` steps before it, and the
    training time so far (the first 11 steps of this process left out, as nanochat's)."""
    return {"step": step, "total_training_flops": run.t.flops_per_token * run.cfg.total_batch_size * step,
            "total_training_time": run.total_time}


def _save_or_stop(run: _Run, stop: StopRequest, step: int) -> bool:
    """Save every --save_every steps; on a signal or at --stop_after, save and stop. Every rank must agree on
    a stop, or the collective save would hang. -> whether to leave the loop."""
    cfg, s = run.cfg, run.s
    # --stop_after at the horizon is the run's end: the final iteration evaluates and saves (a stop there would
    # save the final checkpoint unevaluated, and its --resume auto finds the run complete)
    stop_now = stop.requested or (cfg.stop_after > 0 and step == cfg.stop_after < run.t.num_iterations)
    if s.world_size > 1:
        flag = torch.tensor(float(stop_now), device=s.device)
        stop_now = s.accelerator.reduce(flag, reduction="sum").item() > 0
    if stop_now or (cfg.save_every > 0 and step % cfg.save_every == 0 and step < run.t.num_iterations):
        s.print0(f"saved {run.save(step)}")
    if stop_now:
        # the command that continues the run keeps what it kept: a lower --keep_last is refused on resume
        keep = "" if cfg.keep_last == type(cfg)().keep_last else f" --keep_last {cfg.keep_last}"
        s.print0(f"stopped after step {step} of {run.t.num_iterations}; continue with --resume auto{keep} "
                 f"(exit code {EXIT_STOPPED})")
        run.result["stopped_at"] = step
    return stop_now


# ---- the end-of-run summary ----------------------------------------------------------------------


def _finish(run: _Run) -> dict:
    """The summary line, then Accelerate's end of training (trackers closed, the process group destroyed)."""
    s = run.s
    s.print0(f"peak memory: {peak_memory_gib(s.device_type):.2f}GiB | training time: {run.total_time / 60:.2f}m | "
             f"min val bpb: {run.min_val_bpb:.4f}")
    # end_training destroys the process group: let every rank finish its last collective first (a rank
    # tearing gloo down while another still talks to it aborts or hangs that one)
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()
    run.result["final_step"] = run.t.train_state.step
    return run.result
