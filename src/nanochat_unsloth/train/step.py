"""One optimizer step: grad_accum micro-batches, clip, schedules, update. Shared by the training loop
and benchmarks/train_throughput.py, so the benchmark times exactly what training runs.

It returns tensors, not floats: reading them (`.item()`) is a host sync, and the caller decides when.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nanochat_unsloth.train import fp8, optim


class NonFiniteLoss(RuntimeError):
    """The run diverged. Raised before the update, so no weight changes and nothing is saved."""


@dataclass
class StepResult:
    loss: Tensor  # mean loss over this process's micro-batches (reduce across ranks for the global mean)
    grad_norm: Tensor | None  # global grad norm before clipping; None when clipping is off
    lrm: float  # the LR multiplier used
    global_loss: float | None = None  # mean over the whole global batch, when `global_mean` was given


def optimizer_step(accelerator, model, raw_model, optimizers, next_batch: Callable[[], tuple[Tensor, Tensor]],
                   grad_accum: int, step: int, num_iterations: int, *, grad_clip: float = 1.0,
                   warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0,
                   global_mean: Callable[[Tensor], float] | None = None) -> StepResult:
    """Run step `step` (0-based).

    `global_mean(local_mean_loss) -> float` reduces the loss over ranks (a host sync); when given, a
    non-finite loss raises NonFiniteLoss before the optimizers touch the weights.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        # DDP all-reduces gradients only on the last micro-step
        sync_ctx = accelerator.no_sync(model) if micro_step < grad_accum - 1 else contextlib.nullcontext()
        with sync_ctx, accelerator.autocast():
            loss = model(x, y)
            loss_sum += loss.detach()
            # each backward adds into .grad: normalise once, here (we do not use accelerator.accumulate)
            accelerator.backward(loss / grad_accum)
    mean_loss = loss_sum / grad_accum
    global_loss = None
    if global_mean is not None:
        global_loss = global_mean(mean_loss)
        if not math.isfinite(global_loss):
            raise NonFiniteLoss(f"non-finite loss {global_loss} at step {step}")
    grad_norm = optim.clip_grad_norm(raw_model.parameters(), grad_clip) if grad_clip > 0 else None
    lrm = optim.apply_schedules(optimizers, step, num_iterations, warmup_ratio=warmup_ratio,
                                warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    fp8.start_delayed_scaling(raw_model, x.numel())  # --fp8: once every layer has an amax history
    return StepResult(loss=mean_loss, grad_norm=grad_norm, lrm=lrm, global_loss=global_loss)
