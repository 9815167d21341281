"""What a training run adds to saving and loading a checkpoint (checkpoint/store.py): an FSDP2 run's state,
which no rank holds whole, is written sharded by us with torch.distributed.checkpoint (checkpoint/sharded.py);
and the collective load of a checkpoint's training state (model, optimizers, RNG, loader, the loop's
TrainState), which picks its reader by the checkpoint's layout, so a run of one strategy resumes another's
checkpoint where it can."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat_unsloth.checkpoint import sharded, store
from nanochat_unsloth.checkpoint.meta import RunMeta, load_meta
from nanochat_unsloth.checkpoint.train_state import TrainState


@dataclass
class Checkpointed:
    """What a checkpoint holds of a run: the unwrapped model, the optimizers, the loader registered for
    checkpointing (in Accelerate's files), and the loop's TrainState (in meta.json; None: the meta is the
    caller's alone). `fsdp2`: the run shards its weights with FSDP2, so it saves and loads them itself
    (train/fsdp.py says why) instead of through Accelerate's save_state."""

    model: torch.nn.Module
    optimizers: list
    loader: object
    train_state: TrainState | None = None
    fsdp2: bool = False


def save_sharded_state(out_dir: Path, run: Checkpointed, process_index: int, step: int = 0, scaler=None) -> None:
    """Collective: an FSDP2 run's model and optimizer states written sharded (each rank its own shards, into
    `dcp/`), every rank's RNG state and the loader's state as Accelerate writes them."""
    from accelerate.checkpointing import save_accelerator_state, save_custom_state

    sharded.save_state(out_dir, run.model, run.optimizers)
    save_accelerator_state(str(out_dir), [], [], [], [], process_index, step, scaler)
    save_custom_state(run.loader, str(out_dir), 0)


def load_sharded_state(step_dir: Path, run: Checkpointed, process_index: int, scaler=None) -> None:
    """Collective: the model and optimizer states of a checkpoint into a run that loads them itself: a
    sharded checkpoint into any layout (DCP reshards it); an unsharded one (DDP, one process) into FSDP2
    shards, every rank reading the whole files and keeping its part. Then RNG and loader state."""
    from accelerate.checkpointing import load_accelerator_state, load_custom_state

    from nanochat_unsloth.train.fsdp import load_whole_model_state, shard_optimizer_state

    step_dir = Path(step_dir)
    if sharded.is_sharded_checkpoint(step_dir):
        sharded.load_state(step_dir, run.model, run.optimizers)
    else:
        load_whole_model_state(run.model, store.load_model_state_dict(step_dir, verify=False))
        for i, opt in enumerate(run.optimizers):
            path = step_dir / store.optimizer_file(i)
            opt.load_state_dict(shard_optimizer_state(torch.load(path, map_location="cpu", weights_only=False), opt))
    load_accelerator_state(str(step_dir), [], [], [], [], process_index, scaler)
    load_custom_state(run.loader, str(step_dir), 0)


def load_training_state(accelerator, step_dir: Path, run: Checkpointed, meta: RunMeta | None = None) -> None:
    """Collective: the model, optimizers, RNG and loader state of a checkpoint (see save_checkpoint), then
    the TrainState from its meta.json (`meta`, when the caller has read it already). An FSDP2 run, or a
    checkpoint an FSDP2 run wrote (sharded: DDP and one process resume it too), is loaded by us; anything else
    by Accelerate's load_state."""
    if run.fsdp2 or sharded.is_sharded_checkpoint(step_dir):
        load_sharded_state(step_dir, run, accelerator.process_index, accelerator.scaler)
    else:
        accelerator.load_state(str(step_dir))
    if run.train_state is not None:
        run.train_state.load_state_dict((meta or load_meta(step_dir, checksums=False)).to_dict())


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: RunMeta, keep_last: int, run: Checkpointed) -> Path:
    """Collective: `store.save_checkpoint` of `meta` with the TrainState's values, with an FSDP2 run saved
    sharded by us (train/fsdp.py says why) instead of by Accelerate's save_state."""
    if run.train_state is not None:
        meta = dataclasses.replace(meta, **run.train_state.state_dict())
    if not run.fsdp2:
        return store.save_checkpoint(accelerator, run_dir, step, meta, keep_last)
    return store.save_checkpoint(
        accelerator, run_dir, step, meta, keep_last, models=[run.model],
        write_state=lambda out_dir: save_sharded_state(out_dir, run, accelerator.process_index, accelerator.step,
                                                       accelerator.scaler))
