"""An FSDP2 run's sharded checkpoint on 2 gloo ranks (run by tests/test_fsdp_checkpoint.py, not collected by pytest).

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/fsdp_checkpoint_e2e.py BASE OUT      # FSDP2 save, FSDP2 resume, DDP resume
    python tests/fsdp_checkpoint_e2e.py BASE OUT   # one process (no process group) resumes the same checkpoint

Accelerate runs FSDP only on GPUs, so the tiny GPT is sharded here with `fully_shard` (one unit per Block and the
root, as configs/accelerate/fsdp2.yaml does) under Accelerate's MULTI_CPU state, and trained with the loop's own
optimizers, step and checkpoint functions. On 2 ranks:

1. SAVE_STEP steps, then `train.checkpoint.save_checkpoint` as the loop saves an FSDP2 run, into
   BASE/runs/fsdp/step_00000N/; the state at the save is gathered here, for the test to compare with;
2. one more step: the straight run;
3. a fresh FSDP2 model and optimizers load the checkpoint (`load_training_state`) and take that step;
4. a plain model under DDP with the loop's DDP optimizers (`ShardedAdamW` keeps rows of the moments) loads it
   too: its state right after loading, whole, and the loss of the same step; before that step it saves that
   state in its own layout (BASE/runs/ddp/), and
5. a fresh FSDP2 model loads that DDP checkpoint and takes the step; then, with a NaN in one rank's shard,
   its save is refused; and a save whose write fails on rank 1 alone is refused on every rank.

On one process: the plain model and optimizers load it without a process group and take the step as 2
micro-steps; then, in a process group of one, an FSDP2 model loads it too (DCP reshards 2 ranks' pieces into one
rank's) and takes that step. Writes OUT/result_<world size>.pt (rank 0).
"""

import argparse
import dataclasses
import errno
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from nanochat_unsloth.checkpoint import store
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.store import NonFiniteWeights
from nanochat_unsloth.common import UserError
from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.model.gpt import GPTConfig
from nanochat_unsloth.shards.manifest import ShardManifest
from nanochat_unsloth.train import checkpoint as ckpt
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.config import TrainConfig
from nanochat_unsloth.train.fsdp import full_tensor
from nanochat_unsloth.train.step import optimizer_step
from cpu_launch import exit_without_finalization, free_port  # tests/ is sys.path[0] when run as a script

TAG = "fsdp"
B, T, DEPTH = 2, 32, 2
GLOBAL_MICRO_BATCHES = 2  # per optimizer step, over all processes
SAVE_STEP = 2
NUM_ITERATIONS = 100


class Position:
    """A Stateful stand-in for the loader the loop registers for checkpointing."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def batch(window: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + window)
    w = torch.randint(0, vocab_size, (B * T + 1,), generator=g)
    return w[:-1].view(B, T).int(), w[1:].view(B, T).long()


def fully_shard_model(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole_state(model, optimizers) -> dict:
    """Every weight and optimizer state tensor, whole, by parameter name (DTensors gathered: a collective)."""
    names = {p: name for name, p in model.named_parameters()}
    weights = {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}
    states = {}
    for opt in optimizers:
        for p, state in opt.state.items():
            states[names[p]] = {k: full_tensor(v).clone() if torch.is_tensor(v) else v for k, v in state.items()}
    return {"weights": weights, "optim": states}


def whole_optim_state(model, optimizers) -> dict:
    """By parameter name, from each optimizer's state_dict (ShardedAdamW's gathers its rows: a collective)."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    names = {p: name for name, p in model.named_parameters()}
    out, offset = {}, 0
    for opt in optimizers:
        packed = opt.state_dict()
        ids = [i for group in packed["param_groups"] for i in group["params"]]
        for i, p in zip(ids, params[offset:offset + len(ids)]):
            out[names[p]] = {k: full_tensor(v).clone() if torch.is_tensor(v) else v
                             for k, v in packed["state"][i].items()}
        offset += len(ids)
    return out


def main(base: Path, out: Path):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = GLOBAL_MICRO_BATCHES // world
    manifest = ShardManifest.load(base / "shards")
    config = GPTConfig.from_depth(DEPTH, T, manifest.tokenizer.vocab_size)
    run_dir = store.run_dir_for(base, TAG)
    step_dir = run_dir / store.step_dir_name(SAVE_STEP)

    def step_with(model, raw, optimizers, step):
        # the loader's rule: the step's windows do not depend on how (world, accum) split them
        windows = iter([step * GLOBAL_MICRO_BATCHES + m * world + rank for m in range(accum)])
        res = optimizer_step(accelerator, model, raw, optimizers, lambda: batch(next(windows), config.vocab_size),
                             accum, step, NUM_ITERATIONS,
                             global_mean=lambda t: accelerator.reduce(t, reduction="mean").item())
        return res.global_loss

    def fresh(sharded: bool):
        raw = build_model(config, ModelOptions(kernels="torch"), "cpu", seed=1)  # other weights than the run's
        if sharded:
            fully_shard_model(raw, world)
        return raw, optim.build_optimizers(raw)

    result = {"world_size": world}
    if world > 1:
        model = build_model(config, ModelOptions(kernels="torch"), "cpu", seed=0)
        fully_shard_model(model, world)
        optimizers = optim.build_optimizers(model)
        result["losses"] = [step_with(model, model, optimizers, s) for s in range(SAVE_STEP)]
        train_config = TrainConfig(depth=DEPTH, max_seq_len=T, device_batch_size=B, model_tag=TAG,
                                   total_batch_size=B * T * GLOBAL_MICRO_BATCHES).to_dict()
        meta = RunMeta(model_config=dataclasses.asdict(config), train_config=train_config,
                       tokenizer_sha256=manifest.tokenizer.sha256, shards_sha256=manifest.fingerprint(),
                       world_size=world, grad_accum=accum, device_type="cpu", num_iterations=NUM_ITERATIONS)
        state = ckpt.Checkpointed(model, optimizers, Position(SAVE_STEP), fsdp2=True)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_checkpoint(accelerator, run_dir, SAVE_STEP, meta, 2, state)
        result["saved"] = whole_state(model, optimizers)
        result["straight_loss"] = step_with(model, model, optimizers, SAVE_STEP)
        result["straight"] = whole_state(model, optimizers)["weights"]

        raw, opts = fresh(sharded=True)
        position = Position()
        ckpt.load_training_state(accelerator, step_dir, ckpt.Checkpointed(raw, opts, position, fsdp2=True))
        result["fsdp2_position"] = position.value
        result["fsdp2_loss"] = step_with(raw, raw, opts, SAVE_STEP)
        result["fsdp2"] = whole_state(raw, opts)["weights"]

        raw, opts = fresh(sharded=False)
        ddp, *opts = accelerator.prepare(raw, *opts)
        position = Position()
        accelerator.register_for_checkpointing(position)
        ckpt.load_training_state(accelerator, step_dir, ckpt.Checkpointed(raw, opts, position))
        result["ddp_position"] = position.value
        result["ddp_loaded"] = {"weights": {k: v.detach().clone() for k, v in raw.named_parameters()},
                                "optim": whole_optim_state(raw, opts)}
        # ... and saves it in its own (unsharded) layout, which an FSDP2 run resumes in turn
        ddp_dir = store.run_dir_for(base, "ddp")
        if accelerator.is_main_process:
            ddp_dir.mkdir(parents=True, exist_ok=True)
        store.save_checkpoint(accelerator, ddp_dir, SAVE_STEP, meta, 2)
        result["ddp_loss"] = step_with(ddp, raw, opts, SAVE_STEP)

        raw, opts = fresh(sharded=True)
        ckpt.load_training_state(accelerator, ddp_dir / store.step_dir_name(SAVE_STEP),
                                 ckpt.Checkpointed(raw, opts, Position(), fsdp2=True))
        result["from_ddp_loss"] = step_with(raw, raw, opts, SAVE_STEP)
        result["from_ddp"] = whole_state(raw, opts)["weights"]

        # a NaN in one rank's shard only: the save is refused on every rank, before anything is written
        with torch.no_grad():
            if rank == 1:
                raw.transformer.wte.weight.to_local()[0, 0] = float("nan")
        try:
            ckpt.save_checkpoint(accelerator, run_dir, SAVE_STEP + 1, meta, 2,
                                 ckpt.Checkpointed(raw, opts, Position(), fsdp2=True))
            result["nan_refused"] = None
        except NonFiniteWeights as e:
            result["nan_refused"] = str(e)

        # rank 1's own file (its RNG state, written after DCP's collective save) fails: every rank raises the one
        # line, instead of rank 0 waiting for it in the next collective
        import accelerate.checkpointing

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        if rank == 1:
            accelerate.checkpointing.save_accelerator_state = no_space
        try:
            ckpt.save_checkpoint(accelerator, run_dir, SAVE_STEP + 2, meta, 2, state)
            result["rank_failure"] = None
        except UserError as e:
            result["rank_failure"] = str(e)
    else:
        raw, opts = fresh(sharded=False)
        ckpt.load_training_state(accelerator, step_dir, ckpt.Checkpointed(raw, opts, Position()))
        result["loaded"] = {"weights": {k: v.detach().clone() for k, v in raw.named_parameters()},
                            "optim": whole_optim_state(raw, opts)}
        result["loss"] = step_with(raw, raw, opts, SAVE_STEP)
        result["weights"] = {k: v.detach().clone() for k, v in raw.named_parameters()}

        # FSDP2 on one rank: DCP reshards the 2 ranks' pieces into this rank's (whole) DTensor shards
        torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
        raw, opts = fresh(sharded=True)
        ckpt.load_training_state(accelerator, step_dir, ckpt.Checkpointed(raw, opts, Position(), fsdp2=True))
        result["fsdp2_one_rank_loaded"] = whole_state(raw, opts)
        result["fsdp2_one_rank_loss"] = step_with(raw, raw, opts, SAVE_STEP)
    if accelerator.is_main_process:
        torch.save(result, out / f"result_{world}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    main(args.base, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    exit_without_finalization()
