"""What a training run adds to saving and loading a checkpoint (checkpoint/store.py): an FSDP2 run's state,
which no rank holds whole, is gathered and saved by us in the unsharded layout, and loaded back into
shards; and the collective load of a checkpoint's training state (model, optimizers, RNG, loader)."""

from __future__ import annotations

from pathlib import Path

import torch

from nanochat_unsloth.checkpoint import store
from nanochat_unsloth.checkpoint.meta import RunMeta


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
    load_whole_model_state(run.model, store.load_model_state_dict(step_dir, verify=False))
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


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: RunMeta, keep_last: int = 2,
                    sharded: ShardedRun | None = None) -> Path:
    """Collective: `store.save_checkpoint`, with an FSDP2 run (`sharded`) saved whole by us (train/fsdp.py)
    instead of by Accelerate's save_state."""
    if sharded is None:
        return store.save_checkpoint(accelerator, run_dir, step, meta, keep_last)
    return store.save_checkpoint(
        accelerator, run_dir, step, meta, keep_last, models=[sharded.model],
        write_state=lambda out_dir: save_sharded_state(out_dir, sharded, accelerator.process_index,
                                                       accelerator.is_main_process, accelerator.step,
                                                       accelerator.scaler))
