"""The training loop: nanochat's base_train, with Accelerate owning devices, precision and processes.

Read top to bottom: setup -> data -> model -> optimizers -> resume -> the step loop. The step math
(schedules, Muon, AdamW, clipping) lives in `optim.py`; this file only sequences it. Everything that
can be refused (flags, trackers, the run lock, shards, the val split, the CORE eval bundle) is checked
before the model is built; --no_repeat_data, which needs the horizon, right after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import torch

from nanochat_unsloth.checkpoint import store
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.resume import check_resume
from nanochat_unsloth.checkpoint.train_state import TrainState
from nanochat_unsloth.common import EXIT_STOPPED, Diverged, UserError, disk_failure_message, get_base_dir
from nanochat_unsloth.eval.metrics import evaluate_bpb, greedy_completions
from nanochat_unsloth.model import cpu_probe, fp8
from nanochat_unsloth.model.build import build_model
from nanochat_unsloth.model.gpt import PROMISED_FLOPS_H100, GPTConfig
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
from nanochat_unsloth.train.resolve import model_options, resolve
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


def diverged_notice(e: Diverged, run_dir: Path) -> str:
    """What a diverged run says before it exits: nothing of it was saved, so the newest checkpoint is good."""
    last = store.newest_checkpoint(run_dir)
    if last is None:
        return f"{e}. Stopping: no checkpoint was saved before it; lower the LRs and start again"
    return (f"{e}. Stopping: the last good checkpoint, {last}, is kept; lower the LRs and continue it with "
            "--resume auto --force")


def eval_steps_for(cfg: TrainConfig, world_size: int, val_loader: TokenShardLoader) -> int:
    """Val batches per rank per evaluation (0: --eval_tokens 0, none). Refuses a budget below one batch."""
    if cfg.eval_tokens == 0:
        return 0
    per_batch = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.eval_tokens < per_batch:
        raise UserError(f"--eval_tokens {cfg.eval_tokens:,} is less than one val batch on every process "
                        f"({cfg.device_batch_size} x {cfg.max_seq_len} x {world_size} = {per_batch:,}); raise it, "
                        "or pass --eval_tokens 0 to train without val evaluation")
    return min(cfg.eval_tokens // per_batch, val_loader.batches_per_rank)


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


def _train(cfg: TrainConfig, locks: list) -> dict:
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import set_seed

    # ---- setup -----------------------------------------------------------------------------------
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
    rank, world_size = accelerator.process_index, accelerator.num_processes
    master = accelerator.is_main_process
    print0 = accelerator.print
    set_seed(cfg.seed)
    # every `auto` decided once, before the model exists (the CPU bf16 probe times clean matmuls)
    resolved = resolve(cfg, device, world_size, deepspeed_zero.zero_stage(accelerator))
    print0(resolved.line())
    if device_type == "cpu":
        bf16_gemm.configure_cpu_bf16(resolved.cpu_bf16)
        print0(cpu_probe.bf16_summary(resolved.cpu_bf16))

    # the main process holds the lock for the run's life; a refused rank 0 takes the other ranks down
    # with it (the launcher stops every worker when one fails)
    if master:
        locks.append(store.lock_run(run_dir))
    shards_dir = Path(cfg.shards) if cfg.shards else base_dir / "shards"
    tokenizer_dir = base_dir / "tokenizer"
    manifest = ShardManifest.load(shards_dir)
    vocab_size = manifest.tokenizer.vocab_size
    encoding, _ = load_checked_tokenizer(
        tokenizer_dir, f"the shards in {shards_dir}", manifest.tokenizer.sha256, vocab_size,
        fix="re-run prep with it, or point --base-dir at the matching tokenizer")
    token_bytes = load_token_bytes(tokenizer_dir, device)
    core_bundle = core_bundle_for(cfg.core_metric_every, base_dir)  # a missing eval bundle: refused now

    # ---- data: before the model, so shards too short for --max_seq_len or a val split too small for
    # one evaluation are refused in seconds; each shard's sha256 and token ids are checked here once ----
    grad_accum = optim.grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world_size)
    t_verify = time.time()
    train_loader = TokenShardLoader(
        shards_dir, "train", cfg.device_batch_size, cfg.max_seq_len, rank=rank, world_size=world_size,
        grad_accum=grad_accum, device=device, tokenizer_sha256=manifest.tokenizer.sha256, verify_checksums=True,
    )
    val_loader = TokenShardLoader(
        shards_dir, "val", cfg.device_batch_size, cfg.max_seq_len, rank=rank, world_size=world_size,
        device=device, tokenizer_sha256=manifest.tokenizer.sha256, verify_checksums=True,
    )
    eval_steps = eval_steps_for(cfg, world_size, val_loader)
    print0(f"shards: {manifest.totals()['train']['tokens']:,} train / {manifest.totals()['val']['tokens']:,} val "
           f"tokens, checksums verified in {time.time() - t_verify:.1f}s")
    train_loader.allow_new_layout = cfg.force
    zero = deepspeed_zero.configure(accelerator, cfg, grad_accum)  # None unless DeepSpeed; refusals here

    # ---- model -----------------------------------------------------------------------------------
    model_config = GPTConfig.from_depth(cfg.depth, cfg.max_seq_len, vocab_size)
    options = model_options(cfg, resolved)
    try:  # what only the build can tell: --lean_blocks against the model's depth, torchao for its recipes
        model = build_model(model_config, options, device, cfg.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    raw_model = model  # uncompiled, unwrapped: sampling and checkpoint naming use it
    n_lean = model.block_memory.count(cfg.memory)
    what = "checkpointed" if cfg.memory == "lean" else "recomputing their MLP"
    partial_lean = f" ({n_lean} of {cfg.depth} blocks {what})" if 0 < n_lean < cfg.depth else ""
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()
    print0(f"model: depth {cfg.depth}, n_embd {model_config.n_embd}, heads {model_config.n_head}, "
           f"{num_params:,} params, {flops_per_token:e} FLOPs/token, kernels={model.ops.label}, memory={cfg.memory}"
           f"{partial_lean}, "
           f"optimizer={cfg.optimizer}")

    # ---- horizon and batch -----------------------------------------------------------------------
    num_iterations = optim.resolve_num_iterations(
        cfg.num_iterations, cfg.target_flops, cfg.target_param_data_ratio, num_params, flops_per_token,
        cfg.total_batch_size,
    )
    print0(f"batch: {cfg.device_batch_size} x {cfg.max_seq_len} x {world_size} procs x {grad_accum} accum "
           f"= {cfg.total_batch_size:,} tokens/step; {num_iterations:,} steps")
    print0(data_budget_line(num_iterations, cfg.total_batch_size, grad_accum * world_size, train_loader.num_windows,
                            manifest.totals()["train"]["tokens"], shards_dir, cfg.no_repeat_data))

    # ---- optimizers, accelerate, compile ----------------------------------------------------------
    prepared = prepare_for_training(
        accelerator, raw_model, options, cfg.optimizer, embedding_lr=cfg.embedding_lr,
        unembedding_lr=cfg.unembedding_lr, matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
    )
    model, optimizers = prepared.model, prepared.optimizers
    sharded_weights = accelerator.distributed_type == DistributedType.FSDP
    train_state = TrainState(raw_model, accelerator)  # the step, the loss EMA, the FP8 scaling histories
    # FSDP2: checkpoints are saved sharded and loaded by us, not by Accelerate (train/fsdp.py says why)
    checkpointed = ckpt.Checkpointed(raw_model, optimizers, train_loader, train_state, fsdp2=sharded_weights)
    # FSDP2 and ZeRO-3: no rank holds whole weights, so any forward of the raw model is a collective
    whole_weights_nowhere = sharded_weights or bool(zero and zero.partitioned_weights)
    accelerator.register_for_checkpointing(train_loader)

    # ---- resume ----------------------------------------------------------------------------------
    metrics_path = run_dir / "metrics.jsonl"
    eval_path = run_dir / "eval.jsonl"
    start_step = 0
    resume = store.find_resume(run_dir, cfg.resume, print0)  # verifies sha256; --resume auto skips damaged ones
    if cfg.resume and resume is None:
        if store.list_checkpoints(run_dir) and not cfg.force:
            raise UserError(f"--resume {cfg.resume}: no checkpoint in {run_dir} verifies (each is named above); pass "
                            "--force to start over (they are moved to previous_N/, not deleted)")
        print0(f"--resume {cfg.resume}: no checkpoint in {run_dir} yet, starting from step 0")
    if resume is not None:
        resume_dir, meta = resume
        start_step = meta.step
        if check_resume(meta, cfg, resume_dir, manifest, shards_dir, num_iterations, print0):
            # the run's own final checkpoint: load nothing, evaluate nothing, write nothing
            print0(f"{resume_dir}: the run is already complete (step {start_step} of {num_iterations}); "
                   "nothing to do")
            return {"start_step": start_step, "num_iterations": num_iterations, "run_dir": str(run_dir),
                    "val_bpb": [], "already_complete": True, "final_step": start_step}
        deepspeed_zero.check_resume(meta, zero, resume_dir)
        # load_state restores the optimizers' param_groups too; keep this run's LRs (they differ from the
        # checkpoint's only when --force allowed it)
        initial_lrs = [[group["initial_lr"] for group in opt.param_groups] for opt in optimizers]
        ckpt.load_training_state(accelerator, resume_dir, checkpointed, meta)
        for opt, lrs in zip(optimizers, initial_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["initial_lr"] = lr
        if train_loader.notice:
            print0(train_loader.notice)
        if train_state.notice:
            print0(train_state.notice)
        if meta.fresh_optimizer:
            print0(f"resuming from imported weights at step {start_step} with a fresh optimizer state")
        print0(f"resumed from {resume_dir} at step {start_step}")
        if master:  # what came after this step (a rollback's newer checkpoints, later records) moves aside
            store.start_branch(run_dir, start_step, print0)
    elif store.list_checkpoints(run_dir):  # every rank checks, so every rank raises (none is left waiting)
        if not cfg.force:
            raise UserError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, "
                            "--model_tag to start another run, or --force to start over")
        if master:  # starting over: set the old run aside (never delete it), so --resume auto cannot pick it
            aside = store.set_aside(run_dir)
            print0(f"--force: moved the previous run's checkpoints and metrics to {aside}")
    if master and resume is None:  # records of a run that never saved are another branch's: aside too
        store.start_branch(run_dir, 0, print0)
    accelerator.wait_for_everyone()
    trackers.start_trackers(accelerator, tracker_names, cfg.run, run_dir, cfg.to_dict())

    def meta_for(step, val_bpb):
        return RunMeta(
            model_config=dataclasses.asdict(model_config),
            train_config=cfg.to_dict(),
            tokenizer_sha256=manifest.tokenizer.sha256,
            shards_sha256=manifest.fingerprint(),
            val_bpb=val_bpb,
            world_size=world_size,
            grad_accum=grad_accum,
            device_type=device_type,
            num_iterations=num_iterations,
            cpu_bf16=resolved.cpu_bf16,
            resolved=resolved.to_dict(),
            deepspeed=zero.describe() if zero else None,
        )

    def log_jsonl(path: Path, record: dict):
        if master:
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk, a size limit: one line (a torn line is dropped on resume)
                raise UserError(disk_failure_message(path, e)) from None

    def save(step: int) -> Path:
        """Collective. Weights holding NaN or inf are not saved: the run stops on the last good checkpoint."""
        try:
            return ckpt.save_checkpoint(accelerator, run_dir, step, meta_for(step, val_bpb), cfg.keep_last,
                                        checkpointed)
        except Diverged as e:
            print0(diverged_notice(e, run_dir))
            raise

    # ---- the step loop ---------------------------------------------------------------------------
    stop = StopRequest()
    stop.install()
    val_bpb, min_val_bpb = None, float("inf")
    total_time = 0.0
    result = {"start_step": start_step, "num_iterations": num_iterations, "run_dir": str(run_dir), "val_bpb": []}
    while True:
        step = train_state.step  # optimizer steps complete so far
        last_step = step == num_iterations

        # once in a while: val bits per byte (all ranks take part)
        if eval_steps and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            model.eval()
            with accelerator.autocast():
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)  # iter() restarts the val split
            model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
            log_jsonl(eval_path, {"step": step, "val_bpb": val_bpb})
            result["val_bpb"].append((step, val_bpb))
            accelerator.log({"val/bpb": val_bpb}, step=step)

        # once in a while: nanochat's CORE metric (all ranks take part; the uncompiled model, as shapes vary)
        if core_bundle is not None and core_due(cfg.core_metric_every, step, last_step):
            core = run_core_metric(raw_model, encoding, core_bundle, device, cfg.core_metric_max_per_task,
                                   accelerator.autocast, not whole_weights_nowhere, step, print0)
            log_jsonl(eval_path, core)
            accelerator.log(tracker_values(core), step=step)

        # once in a while: greedy samples of nanochat's prompts (uncompiled model). Under FSDP and ZeRO-3 every
        # rank holds a shard of the weights, so every rank must run the forward; otherwise only the main one does.
        if (master or whole_weights_nowhere) and (
                last_step or (cfg.sample_every > 0 and step > 0 and step % cfg.sample_every == 0)):
            raw_model.eval()
            with accelerator.autocast():
                for text in greedy_completions(raw_model, encoding):
                    print0(f"  sample: {text!r}")
            raw_model.train()

        if last_step:
            save(step)
            break

        # ---- one optimizer step: grad_accum micro-batches on every process -----------------------
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        try:
            with profiled_step(run_dir / "profile", rank, step, device, step == cfg.profile_step) as timer:
                out = (zero.optimizer_step if zero else optimizer_step)(
                    accelerator, model, raw_model, optimizers, lambda: next(train_loader), grad_accum, step,
                    num_iterations, grad_clip=cfg.grad_clip, warmup_ratio=cfg.warmup_ratio,
                    warmdown_ratio=cfg.warmdown_ratio, final_lr_frac=cfg.final_lr_frac,
                    global_mean=lambda t: accelerator.reduce(t, reduction="mean").item(), timer=timer,
                    cuda_graphs=prepared.cuda_graphs,
                )
        except Diverged as e:
            print0(diverged_notice(e, run_dir))
            raise
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device_type == "cuda" else 0.0
            suggest_fp8 = not raw_model.ops.fp8 and fp8.fp8_supported(device)[0]
            raise UserError(out_of_memory_advice(cfg.device_batch_size, cfg.memory, cfg.lean_blocks, suggest_fp8,
                                                 peak_memory_gib(device_type), total)) from None
        step_loss, lrm, grad_norm = out.global_loss, out.lrm, out.global_grad_norm
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        train_state.step += 1
        step = train_state.step  # `step` optimizer steps are now complete

        # ---- logging ------------------------------------------------------------------------------
        debiased = train_state.record_loss(step_loss)
        tok_per_sec = cfg.total_batch_size / dt
        mfu = 100 * flops_per_token * cfg.total_batch_size / dt / (PROMISED_FLOPS_H100 * world_size)
        if step - start_step > 10:
            total_time += dt
        mem = peak_memory_gib(device_type)
        gn = f" grad norm: {grad_norm:.4f} |" if grad_norm is not None else ""
        print0(f"step {step - 1:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | "
               f"loss: {debiased:.6f} (raw {step_loss:.4f}) |{gn} lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
               f"tok/sec: {tok_per_sec:,.0f} | mfu: {mfu:.2f} | mem: {mem:.1f}GiB | total time: {total_time / 60:.2f}m")
        record = {"step": step - 1, "loss": step_loss, "smooth_loss": debiased, "lrm": lrm, "grad_norm": grad_norm,
                  "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, "peak_mem_gib": mem, "time": time.time()}
        if device_type == "cuda":  # cumulative; a retry frees cached blocks and synchronizes: a slow step's sign
            record["alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
        log_jsonl(metrics_path, record)
        accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "time") and v is not None},
                        step=step - 1)

        # ---- checkpoints and stops ----------------------------------------------------------------
        stop_now = stop.requested or (cfg.stop_after > 0 and step == cfg.stop_after)
        if world_size > 1:  # every rank must agree, or the collective save would hang
            flag = torch.tensor(float(stop_now), device=device)
            stop_now = accelerator.reduce(flag, reduction="sum").item() > 0
        if stop_now or (cfg.save_every > 0 and step % cfg.save_every == 0 and step < num_iterations):
            print0(f"saved {save(step)}")
        if stop_now:
            print0(f"stopped after step {step} of {num_iterations}; continue with --resume auto "
                   f"(exit code {EXIT_STOPPED})")
            result["stopped_at"] = step
            break
    stop.settle()

    print0(f"peak memory: {peak_memory_gib(device_type):.2f}GiB | training time: {total_time / 60:.2f}m | "
           f"min val bpb: {min_val_bpb:.4f}")
    # end_training destroys the process group: let every rank finish its last collective first (a rank
    # tearing gloo down while another still talks to it aborts or hangs that one)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result["final_step"] = train_state.step
    return result

