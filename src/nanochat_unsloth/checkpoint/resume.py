"""What a resume must agree with, checked before any state is loaded, each refusal one line: the model
shape and the settings that make it the same run (or --force), the tokenizer and the shards it trained on
(or --force), and a horizon ahead of the checkpoint's step. The loop's own state that a resume restores
(its step, loss EMA and FP8 scaling histories) is train_state.py's.

`cfg` is the run's TrainConfig (train/config.py, a floor above): read by attribute, its defaults by
`type(cfg)()`."""

from __future__ import annotations

from pathlib import Path

from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.common import UserError, notice_once
from nanochat_unsloth.shards.manifest import ShardManifest

# Fields whose change on --resume would make the run no longer the same run (refused unless --force).
# The model shape is never overridable: the weights would not load. A checkpoint without a field (written
# before the field existed) counts as having the field's default.
RESUME_MODEL_FIELDS = ("depth", "max_seq_len")
RESUME_GUARDED_FIELDS = (
    "device_batch_size", "total_batch_size", "num_iterations", "target_flops", "target_param_data_ratio",
    "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip",
    "warmup_ratio", "warmdown_ratio", "final_lr_frac", "seed", "optimizer", "cpu_bf16",
    "fp8", "fp8_scaling", "fp8_recipe", "loss_chunk_mb", "compile", "lean_checkpoint",
)
# Speed and memory settings: the same step math within bf16 rounding (test_kernels_parity_gpu.py), so a resume
# may change them, and is told in one notice. Those that default to `auto` are compared as the runs resolved
# them (RunMeta.resolved), so a resume on a machine that resolves them otherwise is told too; the ones also in
# RESUME_GUARDED_FIELDS are refused first when their flags differ.
RESUME_NOTICED_FIELDS = ("kernels", "memory", "lean_blocks", "lean_checkpoint", "fp8_weight_cache", "compile",
                         "cuda_graphs", "cpu_bf16", "loss_chunk_mb")
# a value a checkpoint's meta may hold under its former name: --kernels unsloth was fused's before 2026-11-28
FORMER_NAMES = {"kernels": {"unsloth": "fused"}}
# FP8 settings removed on 2026-12-06 (they measured no gain at equal quality), with the value that meant "off":
# a run that used one cannot continue the same step math
REMOVED_FIELDS = {"fp8_warmdown": "fp8", "fp8_bf16_ends": 0, "fp8_lm_head": False}
# values removed on 2026-12-06 for the same reason: the flag stays, that choice of it is gone
REMOVED_VALUES = {"fp8_scaling": ("delayed_grad",)}
# rows per micro-batch from which `--fp8_scaling auto` meant delayed scaling before 2026-12-06
FORMER_DELAYED_MIN_ROWS = 16384


def check_resume_compatible(meta: RunMeta, cfg, resolved: dict | None = None) -> None:
    """The model shape must match; batch and optimizer settings too, unless --force. Another number of
    processes needs neither: the loader keeps every step's tokens when the batch settings are the same.
    `resolved`: this run's `auto`s as resolved (ResolvedOptions.to_dict()), for the notice of what changed."""
    saved = meta.train_config
    model_diff = [f for f in RESUME_MODEL_FIELDS if f in saved and saved[f] != getattr(cfg, f)]
    if model_diff:
        desc = ", ".join(f"--{f}={saved[f]} (now {getattr(cfg, f)})" for f in model_diff)
        raise UserError(f"cannot resume: the checkpoint's model differs: {desc}; use the checkpoint's settings")
    if not saved:
        return
    # an optimizer's state fits only that optimizer (Muon's momentum and AdamW's moments of two matrices are not
    # one AdamW's moments of all of them), so --force cannot override this one: the load would fail mid-way
    was_optimizer = saved.get("optimizer", type(cfg)().optimizer)
    if was_optimizer != cfg.optimizer:
        raise UserError(f"cannot resume: the checkpoint holds --optimizer {was_optimizer}'s state, which --optimizer "
                        f"{cfg.optimizer} cannot take (not even with --force); resume with --optimizer {was_optimizer}")
    removed = [f"--{f} {saved[f]}" for f, off in REMOVED_FIELDS.items() if saved.get(f, off) != off]
    removed += [f"--{f} {saved[f]}" for f, values in REMOVED_VALUES.items() if saved.get(f) in values]
    if removed and not cfg.force:
        raise UserError(f"cannot resume: the run was started with {', '.join(removed)}, a setting removed on "
                        "2026-12-06; continue it with the release that started it, or pass --force to go on without")
    notice_fp8_scaling_change(meta, cfg)
    # a field the checkpoint lacks (it predates the field) was the field's default then
    defaults = type(cfg)().to_dict()
    was = {f: saved.get(f, defaults[f]) for f in RESUME_GUARDED_FIELDS}
    guarded = [f for f in RESUME_GUARDED_FIELDS if was[f] != getattr(cfg, f)]
    if "fp8_scaling" in guarded and cfg.fp8_scaling == auto_fp8_scaling(meta):
        guarded.remove("fp8_scaling")  # naming what `auto` chose for this run is the same run
    if guarded and not cfg.force:
        desc = ", ".join(f"--{f}={was[f]} (now {getattr(cfg, f)})" for f in guarded)
        raise UserError(f"cannot resume: the run was started with {desc}; pass the same settings, or --force to override")
    notice_speed_changes(meta, cfg, resolved)


def notice_speed_changes(meta: RunMeta, cfg, resolved: dict | None) -> None:
    """One notice naming every speed or memory setting this resume runs otherwise than the checkpoint's run:
    each as both runs resolved it where both recorded that, else as its flag (a field the checkpoint lacks: the
    default's)."""
    defaults = type(cfg)().to_dict()

    def flag(config: dict, name: str):
        value = config.get(name, defaults[name])
        return FORMER_NAMES.get(name, {}).get(value, value)

    was_resolved, now_resolved = meta.resolved or {}, resolved or {}
    changed = [(f, was_resolved[f], now_resolved[f]) if f in was_resolved and f in now_resolved
               else (f, flag(meta.train_config, f), flag(cfg.to_dict(), f)) for f in RESUME_NOTICED_FIELDS]
    changed = [f"--{f} {was} -> {now}" for f, was, now in changed if was != now]
    if changed:
        notice_once(f"--resume changes {', '.join(changed)}: speed and memory settings only, the step math "
                    "stays the same within bf16 rounding")


def auto_fp8_scaling(meta: RunMeta) -> str | None:
    """What `--fp8_scaling auto` chose for the checkpoint's run (None: the run named a scaling): as it resolved
    it, or, for a checkpoint that predates the record, `auto`'s rule of before 2026-12-06 (delayed from
    FORMER_DELAYED_MIN_ROWS rows per micro-batch)."""
    saved = meta.train_config
    if saved.get("fp8_scaling", "auto") != "auto":
        return None
    if meta.resolved and meta.resolved.get("fp8_scaling"):
        return meta.resolved["fp8_scaling"]
    rows = saved.get("device_batch_size", 0) * saved.get("max_seq_len", 0)
    return "delayed" if rows >= FORMER_DELAYED_MIN_ROWS else "dynamic"


def notice_fp8_scaling_change(meta: RunMeta, cfg) -> None:
    """A run that `auto` scaled delayed, resumed with `auto`, goes on with dynamic scaling (auto's choice since
    2026-12-06), which it is told."""
    saved = meta.train_config
    if cfg.fp8 and saved.get("fp8") and cfg.fp8_scaling == "auto" and auto_fp8_scaling(meta) == "delayed":
        notice_once("--fp8_scaling auto: this run started with delayed FP8 scaling, and continues with dynamic "
                    "scaling (auto's choice since 2026-12-06: delayed scaling's loss drifts from bf16's); pass "
                    "--fp8_scaling delayed to keep the old scaling")


def check_resume_data(meta: RunMeta, resume_dir: Path, manifest: ShardManifest, shards_dir: Path, force: bool,
                      log=print) -> None:
    """The checkpoint's tokens: its tokenizer must be the shards'; its shards (their fingerprint, recorded
    since 2026-12-06) must be these unless --force, which continues on them with a notice."""
    if meta.tokenizer_sha256 not in (None, manifest.tokenizer.sha256):
        raise UserError(f"{resume_dir}: trained with another tokenizer than the shards in {shards_dir}")
    saved, now = meta.shards_sha256, manifest.fingerprint()
    if saved in (None, now):
        return
    if not force:
        raise UserError(f"cannot resume: {resume_dir} was trained on other shards than those in {shards_dir} "
                        f"(fingerprint {saved[:12]} vs {now[:12]} now); point --shards / --base-dir at the run's "
                        "shards, or pass --force to continue on these")
    log(f"--force: continuing {resume_dir} on other shards ({shards_dir}, fingerprint {now[:12]} instead of "
        f"{saved[:12]}): the run no longer trains on the data it started with")


def check_keep_last(meta: RunMeta, cfg) -> None:
    """A resume of the tag's own run must not prune what the run kept: its saves prune the checkpoints the run
    saved before it, and a --keep_last lower than the run's (the default 2, when a run with --keep_last 0 is
    continued with plain `--resume auto`) would delete them at the first save. Refused unless --force."""
    was = meta.train_config.get("keep_last", type(cfg)().keep_last)
    if cfg.force or cfg.keep_last == 0 or (was != 0 and cfg.keep_last >= was):
        return
    kept = "keep every checkpoint" if was == 0 else f"keep the newest {was}"
    raise UserError(f"cannot resume: the run was started with --keep_last {was} ({kept}), and --keep_last "
                    f"{cfg.keep_last} would delete the checkpoints it kept; pass --keep_last {was}, or --force to "
                    f"prune them to {cfg.keep_last}")


def check_horizon_ahead(step: int, num_iterations: int, cfg, resume_dir: Path) -> None:
    """A resume must have steps left: a horizon at or behind the checkpoint's step would train backwards
    (negative LR multipliers) or pretend to finish, and a --stop_after behind it would never stop."""
    if num_iterations <= step:
        flag = next(f for f in ("num_iterations", "target_flops", "target_param_data_ratio") if getattr(cfg, f) > 0)
        raise UserError(f"{resume_dir} is at step {step}, and --{flag} {getattr(cfg, flag)} gives a horizon of "
                        f"{num_iterations} steps: nothing is left to train; pass a horizon beyond step {step}")
    if 0 < cfg.stop_after <= step:
        raise UserError(f"--stop_after {cfg.stop_after} is not after the checkpoint's step {step} ({resume_dir}), "
                        f"so the run would never stop there; pass a step between {step + 1} and {num_iterations}")


def check_resume(meta: RunMeta, cfg, resume_dir: Path, manifest: ShardManifest, shards_dir: Path,
                 num_iterations: int, log=print, resolved: dict | None = None) -> bool:
    """Everything a resume must agree with, refused in one line before any state is loaded: the settings,
    the tokens, and a horizon ahead of the checkpoint. -> True when the checkpoint is this run's finished
    end (its step is the horizon it was saved with): nothing to train, nothing wrong."""
    check_resume_compatible(meta, cfg, resolved)
    check_resume_data(meta, resume_dir, manifest, shards_dir, cfg.force, log)
    step = meta.step
    if step == num_iterations == meta.num_iterations:
        return True
    check_horizon_ahead(step, num_iterations, cfg, resume_dir)
    return False
