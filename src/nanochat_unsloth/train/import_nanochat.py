"""`nanochat-unsloth convert --from-nanochat`: nanochat's checkpoint as a step of our run, which
`train --resume auto` continues with a fresh optimizer state.

It lives in train/ because what it writes is the state a run would hold at the imported step: the run's
optimizers (built fresh around nanochat's weights), TrainConfig's defaults for the settings nanochat's meta
lacks, and the loader's position. Reading nanochat's layout, and the tokenizer that travels with the weights,
are convert/'s (a floor below); the command itself meets the export and this import in the top-level CLI.
"""

from __future__ import annotations

from pathlib import Path

from nanochat_unsloth.checkpoint import layouts, store
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.resume import RESUME_GUARDED_FIELDS, RESUME_MODEL_FIELDS
from nanochat_unsloth.common import UserError, absolute_path
from nanochat_unsloth.convert import nanochat_layout as layout
from nanochat_unsloth.convert.cli import copy_tokenizer, plan_tokenizer_copy


def import_from_nanochat(source: str | Path, out: str | Path, step: int | None = None,
                         shards: str | Path | None = None, world_size: int = 1, force: bool = False,
                         log=print) -> Path:
    """Write nanochat's checkpoint as `<out>/step_XXXXXX/`: a complete Accelerate checkpoint our loop resumes.

    The weights and the step count are nanochat's; the optimizers are freshly built (nanochat's optim file
    is a rank-0 shard under DDP, so it cannot be trusted to be whole); the train loader is placed where
    our loop's would be after `step` steps, so the data continues instead of restarting.
    """
    from accelerate import Accelerator

    from nanochat_unsloth.shards.loader import TokenShardLoader
    from nanochat_unsloth.tokenizer import load_checked_tokenizer
    from nanochat_unsloth.shards.manifest import ShardManifest
    from nanochat_unsloth.model.build import build_model
    from nanochat_unsloth.model.gpt import GPTConfig
    from nanochat_unsloth.train import optim
    from nanochat_unsloth.train.config import TrainConfig

    loaded = layouts.load_nanochat_checkpoint(source, step)
    s, model_config = loaded.step, loaded.model_config
    run_dir = absolute_path(out)
    out_base = run_dir.parent.parent
    if world_size < 1:
        raise UserError(f"--world-size {world_size}: must be at least 1")

    # ---- check everything first
    src_tok = loaded.base_dir / "tokenizer"
    copy_pair = plan_tokenizer_copy(src_tok, out_base / "tokenizer", None, force)
    encoding, tokenizer_sha = load_checked_tokenizer(src_tok, loaded.path.name, vocab_size=model_config["vocab_size"],
                                                     fix="this is not the tokenizer it was trained with")
    n_vocab = encoding.n_vocab
    train_config = layout.train_config_from_nanochat_meta(loaded.meta, run_dir.name, TrainConfig().to_dict())
    derived = GPTConfig.from_depth(train_config["depth"], train_config["max_seq_len"], n_vocab)
    if layouts.model_config_kwargs(vars(derived)) != model_config:
        raise UserError(f"{loaded.path.parent / layouts.meta_file(s)}: model_config {model_config} is not what depth "
                        f"{train_config['depth']} gives ({vars(derived)}); our trainer builds models from --depth, "
                        "so it could not resume this one")
    step_dir = run_dir / store.step_dir_name(s)
    # the run dir's checkpoints are another history: a later one is what --resume auto would pick, an earlier
    # one what the resumed run's saves would prune; --force sets them aside (previous_N/), never deletes them
    existing = [n for n, _ in store.list_checkpoints(run_dir)]
    if step_dir.exists() and not force:
        raise UserError(f"{step_dir} already exists; pass --force to set the run dir's checkpoints aside "
                        "(moved to previous_N/, not deleted), or another --out")
    if existing and not force:
        raise UserError(f"{run_dir} already holds checkpoints of another run (steps {', '.join(map(str, existing))}), "
                        "which --resume auto would pick or the resumed run would prune; import into a fresh --out, "
                        "or --force to set them aside (moved to previous_N/, not deleted)")
    grad_accum = optim.grad_accum_steps(train_config["total_batch_size"], train_config["device_batch_size"],
                                        train_config["max_seq_len"], world_size)
    shards_dir = Path(shards).expanduser() if shards else out_base / "shards"
    manifest = ShardManifest.load(shards_dir)  # clear error if there are no shards yet
    loader = TokenShardLoader(shards_dir, "train", train_config["device_batch_size"], train_config["max_seq_len"],
                              rank=0, world_size=world_size, grad_accum=grad_accum, tokenizer_sha256=tokenizer_sha)
    # where our loop's loader stands after s steps: s * grad_accum batches yielded by each rank
    cursor = s * grad_accum
    epoch = loader.global_window(cursor - 1) // loader.num_windows if cursor else 0
    loader.load_state_dict({**loader.state_dict(), "cursor": cursor, "epoch": epoch})

    # ---- build the state our loop would hold at step s, and save it the way the loop does
    log(f"importing {loaded.path} (step {s}) -> {step_dir}")
    copy_tokenizer(src_tok, out_base / "tokenizer", copy_pair, log)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = build_model(GPTConfig(**model_config), device="cpu")  # rotary tables; the weights are replaced next
    model.load_state_dict(loaded.state_dict, strict=True, assign=True)  # assign: keep nanochat's dtypes
    optimizers = optim.build_optimizers(  # after assign: they must hold the loaded parameters
        model, embedding_lr=train_config["embedding_lr"], unembedding_lr=train_config["unembedding_lr"],
        matrix_lr=train_config["matrix_lr"], weight_decay=train_config["weight_decay"],
    )
    model, *optimizers = accelerator.prepare(model, *optimizers)
    accelerator.register_for_checkpointing(loader)
    try:
        num_iterations = optim.resolve_num_iterations(
            train_config["num_iterations"], train_config["target_flops"], train_config["target_param_data_ratio"],
            model.num_params(), model.estimate_flops(), train_config["total_batch_size"])
    except UserError:
        num_iterations = None
    meta = RunMeta(model_config=model_config, train_config=train_config, tokenizer_sha256=tokenizer_sha,
                   val_bpb=loaded.meta.get("val_bpb"), world_size=world_size, grad_accum=grad_accum,
                   num_iterations=num_iterations, fresh_optimizer=True, imported_from=str(loaded.path),
                   # the loader's position is a place in these shards: a resume on others is refused as a run's is
                   shards_sha256=manifest.fingerprint())
    lock = store.lock_run(run_dir)  # not while a training run of this tag is writing
    try:
        if store.list_checkpoints(run_dir) or step_dir.exists():
            aside = store.set_aside(run_dir)
            log(f"--force: moved {run_dir}'s checkpoints and metrics to {aside}")
        final = store.save_checkpoint(accelerator, run_dir, s, meta, keep_last=0)  # keep_last=0: delete nothing
    finally:
        lock.release()
    log(f"wrote {final}: nanochat's weights at step {s}, with a FRESH optimizer state (Muon momentum and AdamW "
        f"moments start from zero) and the data position of step {s}")
    log(f"continue with: nanochat-unsloth train --base-dir {out_base} --model-tag {run_dir.name} --resume auto"
        + resume_flags(train_config))
    return final


def resume_flags(train_config: dict) -> str:
    """The flags a resume must repeat: the model shape, and every guarded setting that is not our default."""
    from nanochat_unsloth.train.config import TrainConfig

    default = TrainConfig().to_dict()
    names = list(RESUME_MODEL_FIELDS) + [f for f in RESUME_GUARDED_FIELDS if train_config.get(f) != default.get(f)]
    return "".join(f" --{name} {train_config[name]}" for name in names if name in train_config)
