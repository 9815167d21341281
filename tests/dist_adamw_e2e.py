"""ShardedAdamW in the training path, end to end (run by tests/test_dist_adamw.py, not collected by pytest).

    python tests/dist_adamw_e2e.py OUT                                   # 1 process, 2 micro-steps per step
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/dist_adamw_e2e.py OUT  # 2 x 1 micro-step

A tiny GPT, `optim.build_optimizers` with its AdamW swapped for a ShardedAdamW over the same groups (what
build_optimizers does for world size > 1 once it is wired in), Accelerate's DDP, `step.optimizer_step`,
then `save_state` mid-run and `load_state` into a fresh model and optimizers. Writes OUT/result.pt.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from nanochat_unsloth.train import optim
from nanochat_unsloth.train.dist_adamw import ShardedAdamW
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.train.step import optimizer_step
from cpu_launch import exit_without_finalization  # tests/ is sys.path[0] when run as a script

# vocab 65: wte / lm_head rows split 33 + 32, so the padded gather runs
CONFIG = GPTConfig(sequence_len=16, vocab_size=65, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
B, T = 2, 16
GLOBAL_MICRO_BATCHES = 2  # per optimizer step, over all processes
STEPS, SAVE_AT = 6, 3


def batch(window: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + window)
    w = torch.randint(0, CONFIG.vocab_size, (B * T + 1,), generator=g)
    return w[:-1].view(B, T).int(), w[1:].view(B, T).long()


def setup():
    accelerator = Accelerator(mixed_precision="no")
    set_seed(0)
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device=accelerator.device)
    torch.manual_seed(0)
    model.init_weights()
    adamw, muon = optim.build_optimizers(model)
    if accelerator.num_processes > 1 and not isinstance(adamw, ShardedAdamW):  # until build_optimizers does it
        adamw = ShardedAdamW(adamw.param_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    raw = model
    model, adamw, muon = accelerator.prepare(model, adamw, muon)
    return accelerator, model, raw, [adamw, muon]


def train(accelerator, model, raw, optimizers, start, stop):
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = GLOBAL_MICRO_BATCHES // world
    losses = []
    for step in range(start, stop):
        # the loader's rule: the step's windows do not depend on how (world, accum) split them
        windows = iter([step * GLOBAL_MICRO_BATCHES + m * world + rank for m in range(accum)])
        out = optimizer_step(accelerator, model, raw, optimizers, lambda: batch(next(windows)), accum, step,
                             STEPS, global_mean=lambda t: accelerator.reduce(t, reduction="mean").item())
        losses.append(out.global_loss)
    return losses


def main(out: Path):
    accelerator, model, raw, optimizers = setup()
    losses = train(accelerator, model, raw, optimizers, 0, SAVE_AT)
    accelerator.save_state(str(out / "ckpt"))  # every rank calls ShardedAdamW.state_dict(); rank 0 writes
    losses += train(accelerator, model, raw, optimizers, SAVE_AT, STEPS)
    weights = {k: v.detach().clone() for k, v in raw.state_dict().items()}

    accelerator, model, raw, optimizers = setup()  # a fresh process's view: new model, new optimizers
    accelerator.load_state(str(out / "ckpt"))     # every rank loads the main process's file
    losses_resumed = train(accelerator, model, raw, optimizers, SAVE_AT, STEPS)
    weights_resumed = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    if accelerator.is_main_process:
        torch.save(dict(losses=losses, losses_resumed=losses_resumed, weights=weights,
                        weights_resumed=weights_resumed, save_at=SAVE_AT, world_size=accelerator.num_processes,
                        adamw_class=type(optimizers[0].optimizer).__name__), out / "result.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    exit_without_finalization()
