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

from nanochat_unsloth.common import Diverged
from nanochat_unsloth.model import fp8
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.phase_timer import DISABLED, PhaseTimer


class NonFiniteLoss(Diverged):
    """A step's loss or gradient norm is not finite. Raised before the update, so no weight changes."""


@dataclass
class StepResult:
    loss: Tensor  # mean loss over this process's micro-batches (reduce across ranks for the global mean)
    grad_norm: Tensor | None  # global grad norm before clipping; None when clipping is off and unchecked
    lrm: float  # the LR multiplier used
    global_loss: float | None = None  # mean over the whole global batch, when `global_mean` was given
    global_grad_norm: float | None = None  # grad_norm read on the host, when `global_mean` was given


def optimizer_step(accelerator, model, raw_model, optimizers, next_batch: Callable[[], tuple[Tensor, Tensor]],
                   grad_accum: int, step: int, num_iterations: int, *, grad_clip: float = 1.0,
                   warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0,
                   global_mean: Callable[[Tensor], float] | None = None,
                   timer: PhaseTimer = DISABLED, cuda_graphs: bool = False) -> StepResult:
    """Run step `step` (0-based).

    `global_mean(local_mean_loss) -> float` reduces the loss over ranks (a host sync); when given, a
    non-finite loss or gradient norm raises NonFiniteLoss before the optimizers touch the weights (a
    finite loss can come with a non-finite gradient, whose update would write NaN). `timer` marks the
    phases of a profiled step (`--profile_step`). `cuda_graphs`: the model replays as CUDA graphs
    (`setup.TrainingModel.cuda_graphs`).
    """
    if cuda_graphs:
        _keep_grads(raw_model)
    loss_sum = torch.zeros((), device=accelerator.device)
    fp8.cache_weights(raw_model)  # --fp8_weight_cache: the block weights in FP8, once for all micro-steps
    try:
        for micro_step in range(grad_accum):
            last = micro_step == grad_accum - 1
            x, y = next_batch()
            timer.mark("data")
            # DDP all-reduces gradients only on the last micro-step
            sync_ctx = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync_ctx, accelerator.autocast():
                if cuda_graphs:  # a new replay: this micro-step's graph outputs may overwrite the previous one's
                    torch.compiler.cudagraph_mark_step_begin()
                loss = model(x, y)
                loss_sum += loss.detach()
                # each backward adds into .grad: normalise once, here (we do not use accelerator.accumulate)
                accelerator.backward(loss / grad_accum)
            timer.mark("fwd_bwd_last_with_grad_sync" if last else "fwd_bwd")
    finally:
        fp8.drop_weight_cache(raw_model)  # only the micro-steps read the copies: the weights change next
    mean_loss = loss_sum / grad_accum
    # the norm is queued before the loss's host sync, so reading it afterwards costs no second wait
    check = global_mean is not None
    grad_norm = optim.clip_grad_norm(raw_model.parameters(), grad_clip) if grad_clip > 0 or check else None
    timer.mark("clip")
    global_loss = global_norm = None
    if check:
        global_loss = global_mean(mean_loss)
        global_norm = grad_norm.item()  # after the gradients' all-reduce: the same on every rank
        bad = [f"{what} {value}" for what, value in (("loss", global_loss), ("gradient norm", global_norm))
               if not math.isfinite(value)]
        if bad:
            raise NonFiniteLoss(f"step {step}: non-finite {' and '.join(bad)}; the update was not applied")
    timer.mark("loss_reduce_host_sync")
    lrm = optim.apply_schedules(optimizers, step, num_iterations, warmup_ratio=warmup_ratio,
                                warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac)
    for opt in optimizers:
        opt.step()
        timer.mark(f"optimizer_{type(getattr(opt, 'optimizer', opt)).__name__}")
    model.zero_grad(set_to_none=not cuda_graphs)
    fp8.start_delayed_scaling(raw_model)  # --fp8: once every layer has an amax history
    return StepResult(loss=mean_loss, grad_norm=grad_norm, lrm=lrm, global_loss=global_loss,
                      global_grad_norm=global_norm)


def _keep_grads(model: torch.nn.Module) -> None:
    """Give every trainable parameter a zero .grad if it has none.

    Under CUDA graphs the backward's gradients live in the graph's memory pool. Autograd takes such a
    gradient as the parameter's .grad itself when .grad is None, and the next micro-step's replay then
    overwrites it (pytorch/pytorch#169545); an existing .grad is added into instead. So the grads are
    allocated once and zeroed, not freed, after each step.
    """
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
