"""All the step math of base training, as nanochat b399e43's `base_train.py` / `gpt.py` / `muon.py` do it.

- Muon for every matrix inside the blocks (sharded across ranks under DDP), AdamW for wte and lm_head
- or `--optimizer adamw8bit`: bitsandbytes AdamW8bit for everything, on a cosine schedule
- the LR multiplier (warmup / constant / warmdown) and Muon's momentum ramp, computed from the step
- the training horizon (--num_iterations > --target_flops > --target_param_data_ratio)
- gradient accumulation steps and gradient clipping

Everything here is a pure function of its arguments or a torch Optimizer, so resuming at step s only
needs the optimizers' state_dicts and s.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat_unsloth.common import UserError, notice_once
from nanochat_unsloth.train import bf16_gemm
from nanochat_unsloth.train.bf16_gemm import NATIVE, Bf16Math
from nanochat_unsloth.train.dist_adamw import ShardedAdamW, rank_and_world_size
from nanochat_unsloth.train.fsdp import apply_full_update, full_tensor, is_dtensor
from nanochat_unsloth.model.gpt import GPT

OPTIMIZER_CHOICES = ("muon", "adamw8bit")

# -----------------------------------------------------------------------------
# Muon


def _newtonschulz5(G: Tensor, steps: int, math: Bf16Math = NATIVE) -> Tensor:
    # Quintic Newton-Schulz towards the orthogonal factor of G (Keller Jordan's Muon). The coefficients
    # maximise the slope at zero: singular values land roughly in (0.5, 1.5) instead of exactly 1, which
    # trains as well and needs only 5 steps. bf16 is enough for this iteration; `math` says how bf16 is
    # carried out (bf16_gemm.py), and each `round` stands where a bf16 program stores a bf16 result.
    a, b, c = 3.4445, -4.7750, 2.0315
    X = math.round(G)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        X = X.mT
    norm = math.round(math.round(X.norm(dim=(-2, -1), keepdim=True)) + 1e-7)
    X = math.round(X / norm)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = math.mm(X, X.mT)
        B = math.round(b * A + math.mm(math.round(c * A), A))  # c * A @ A parses as (c * A) @ A
        X = math.round(a * X + math.mm(B, X))
    return (X.mT if tall else X).bfloat16()


_compiled_newtonschulz5 = None


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, math: Bf16Math | None = None) -> Tensor:
    """Approximately orthogonalise G (..., rows, cols), batched over leading dims; returns bf16.

    CUDA: native bf16, compiled with torch.compile. CPU: eager (no compiler toolchain needed), with the
    process's bf16 choice (`bf16_gemm.configure_cpu_bf16`) unless `math` is given.
    """
    global _compiled_newtonschulz5
    if not G.is_cuda:
        return _newtonschulz5(G, steps, math or bf16_gemm.math_for(G))
    if _compiled_newtonschulz5 is None:
        _compiled_newtonschulz5 = torch.compile(_newtonschulz5)
    return _compiled_newtonschulz5(G, steps)


# Newton-Schulz input per batched call on one process: large enough that d20's groups (<= 0.5 GiB) go in
# one call as before, small enough that depth 48 does not run out of memory in the optimizer.
NS_SLICE_BYTES = 1 << 30


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for the 2-D matrices inside the transformer blocks.

    Per matrix p with gradient g (nanochat's Muon):
        buf = lerp(buf, g, 1 - momentum)
        u   = lerp(g, buf, momentum)           (Nesterov; u = buf without)
        p  -= lr * sqrt(max(1, rows/cols)) * NS5(u)

    Parameters are grouped by shape (groups sorted by shape, so every rank builds the same groups) and
    the same-shape matrices are orthogonalised as one batched Newton-Schulz.

    Distributed: when torch.distributed is initialised with world_size > 1, the gradients must already
    be averaged (DDP does it in backward). Within a shape group, matrix i belongs to rank i % world_size;
    each rank runs Newton-Schulz only on its own matrices, then one all_gather per group (async, so it
    overlaps the next group's Newton-Schulz) hands every rank every orthogonalised update, and every
    rank applies all of them. Gathering the bf16 updates rather than the fp32 weights moves half the
    bytes and leaves the weights bitwise identical across ranks.

    State: every rank keeps the momentum buffer of every matrix (the lerp is cheap next to
    Newton-Schulz, and the grads are the same on every rank), so the state is replicated and any rank's
    `state_dict()` is the complete, correct state: checkpoints saved by the main process alone resume
    exactly, on any world size. The cost is one fp32 buffer per matrix on each rank, as without DDP.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only takes 2-D matrices; give embeddings, the lm_head and vectors to AdamW")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == shape]} for shape in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = rank_and_world_size()
        gathers = []
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if any(p.grad is None for p in params):
                raise RuntimeError("Muon: every matrix needs a gradient (was part of the model unused?)")
            rows, cols = params[0].shape
            step_scale = -group["lr"] * max(1.0, rows / cols) ** 0.5
            momentum = group["momentum"]

            grads = [p.grad for p in params]
            bufs = [self._momentum_buffer(p) for p in params]
            torch._foreach_lerp_(bufs, grads, 1.0 - momentum)

            if world_size == 1 and not is_dtensor(grads[0]):
                # One process: orthogonalise the group in slices of bounded size. Stacking all of a
                # group's matrices at once needs a group-sized fp32 copy plus the bf16 Newton-Schulz
                # workspace (at depth 48, 192 matrices of 3072x3072: >10 GiB), which is what limits depth.
                per_slice = max(1, NS_SLICE_BYTES // (rows * cols * grads[0].element_size()))
                for lo in range(0, len(params), per_slice):
                    chunk = range(lo, min(lo + per_slice, len(params)))
                    updates = torch.stack([torch.lerp(grads[i], bufs[i], momentum) if group["nesterov"]
                                           else bufs[i] for i in chunk])
                    for i, u in zip(chunk, zeropower_via_newtonschulz5(updates, group["ns_steps"])):
                        params[i].add_(u, alpha=step_scale)
                continue

            # this rank's share: matrices rank, rank + W, rank + 2W, ...
            mine = range(rank, len(params), world_size)
            updates = torch.empty((len(mine), rows, cols), dtype=grads[0].dtype, device=grads[0].device)
            if is_dtensor(grads[0]):
                # FSDP2: grads and momentum are dim-0 shards (the lerp above ran on them). Newton-Schulz
                # needs whole matrices and gathering one is a collective, so every rank gathers every
                # matrix and keeps its own.
                for i in range(len(params)):
                    u = full_tensor(torch.lerp(grads[i], bufs[i], momentum) if group["nesterov"] else bufs[i])
                    if i % world_size == rank:
                        updates[i // world_size].copy_(u)
            else:
                for j, i in enumerate(mine):
                    if group["nesterov"]:
                        torch.lerp(grads[i], bufs[i], momentum, out=updates[j])
                    else:
                        updates[j].copy_(bufs[i])
            ortho = zeropower_via_newtonschulz5(updates, group["ns_steps"])

            if world_size == 1:  # FSDP2 on one process
                for p, u in zip(params, ortho):
                    apply_full_update(p, u, step_scale)  # p.add_(u, alpha=step_scale) unless FSDP2-sharded
                continue
            # Pad every rank's share to the same count so one all_gather_into_tensor moves them all.
            per_rank = -(-len(params) // world_size)
            padded = ortho.new_zeros((per_rank, rows, cols))
            padded[:len(mine)] = ortho
            gathered = ortho.new_empty((world_size * per_rank, rows, cols))
            work = dist.all_gather_into_tensor(gathered, padded, async_op=True)
            gathers.append((work, params, gathered, per_rank, step_scale))

        for work, params, gathered, per_rank, step_scale in gathers:
            work.wait()
            for i, p in enumerate(params):
                # matrix i was the (i // W)-th of rank i % W
                apply_full_update(p, gathered[(i % world_size) * per_rank + i // world_size], step_scale)
        return loss

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        return state["momentum_buffer"]


# -----------------------------------------------------------------------------
# The two optimizers

ADAMW_BETAS = (0.8, 0.95)  # nanochat's, for the lm_head and wte
ADAMW_SETTINGS = dict(betas=ADAMW_BETAS, eps=1e-10)
MUON_MOMENTUM = 0.95  # the value `muon_momentum` ramps to; each step sets its own
# Muon scales a matrix's LR by sqrt(max(1, rows/cols)); the tallest block matrix is the MLP's c_fc,
# 4*n_embd x n_embd, so no matrix's step is larger than 2 x --matrix_lr.
MUON_LARGEST_LR_SCALE = 2.0
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def largest_lrs(n_embd: int) -> dict[str, float]:
    """The largest value of each LR flag whose step fits in float32, at this width.

    torch converts a step's scale to the weights' dtype and stops mid-run with a traceback above it
    ("value cannot be converted to type float without overflow"). The largest are AdamW's first step,
    lr x (n_embd/768)^-0.5 / (1 - beta1) (its bias correction), and Muon's lr x 2; the schedule's
    multiplier never exceeds 1. (Weight decay multiplies without that check: a huge product there only
    makes the weights non-finite, which the training loop stops on.)
    """
    adamw = FLOAT32_MAX * (1 - ADAMW_BETAS[0]) / (n_embd / 768) ** -0.5
    return {"embedding_lr": adamw, "unembedding_lr": adamw, "matrix_lr": FLOAT32_MAX / MUON_LARGEST_LR_SCALE}


def check_lrs_fit_float32(n_embd: int, **lrs: float) -> None:
    """Refuse, in one line naming the flag, an LR above `largest_lrs` (flag name -> value in `lrs`)."""
    limits = largest_lrs(n_embd)
    for flag, lr in lrs.items():
        if lr > limits[flag]:
            raise UserError(f"--{flag} {lr:g}: too large: at n_embd {n_embd} (--depth) its optimizer step does not "
                            f"fit in float32 and would stop the run with an overflow; use at most "
                            f"{limits[flag]:.3g}")


def adamw_groups(model: GPT, embedding_lr: float, unembedding_lr: float) -> list[dict]:
    """nanochat's AdamW groups [lm_head, wte]: LRs tuned at width 768, scaled as 1/sqrt(n_embd/768)."""
    lr_scale = (model.config.n_embd / 768) ** -0.5
    return [dict(params=list(model.lm_head.parameters()), lr=unembedding_lr * lr_scale),
            dict(params=list(model.transformer.wte.parameters()), lr=embedding_lr * lr_scale)]


def build_optimizers(model: GPT, *, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                     matrix_lr: float = 0.02, weight_decay: float = 0.0,
                     fused: bool | None = None) -> list[torch.optim.Optimizer]:
    """[AdamW(lm_head, wte), Muon(every block matrix)], as nanochat's `GPT.setup_optimizers`.

    The AdamW LRs were tuned at width 768 and scale as 1/sqrt(n_embd/768). Every group records its
    `initial_lr` for `apply_schedules`. Pass the unwrapped model (not a DDP / compiled wrapper).
    `fused=None` uses fused AdamW when every parameter is on CUDA.
    """
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    n_covered = len(matrix_params) + len(embedding_params) + len(lm_head_params)
    assert n_covered == len(list(model.parameters())), "a parameter is in no optimizer group"

    if fused is None:
        fused = all(p.is_cuda for p in embedding_params + lm_head_params)
    # world size > 1: each rank keeps 1/W of the Adam moments (ZeRO-1, see dist_adamw.py); the same math
    adamw_cls = ShardedAdamW if rank_and_world_size()[1] > 1 else torch.optim.AdamW
    adamw = adamw_cls(adamw_groups(model, embedding_lr, unembedding_lr), **ADAMW_SETTINGS,
                      weight_decay=weight_decay, fused=fused)
    muon = Muon(matrix_params, lr=matrix_lr, momentum=MUON_MOMENTUM)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def build_adamw8bit_optimizers(model: GPT, *, lr: float = 3e-4, embedding_lr_frac: float = 0.1,
                               weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.95),
                               eps: float = 1e-8, warmup_ratio: float = 0.02) -> list[torch.optim.Optimizer]:
    """[AdamW8bit(everything)]: the seed's recipe, for `--optimizer adamw8bit`.

    LR `lr * (n_embd/768)**-0.5` for every matrix and the lm_head, `embedding_lr_frac` of that for wte,
    decoupled weight decay on all parameters, and a cosine schedule with `warmup_ratio` linear warmup
    (recorded in the groups: `apply_schedules` reads it). The 8-bit moments are bitsandbytes state, part
    of `state_dict()`, so checkpoints resume them. Without CUDA or bitsandbytes: torch AdamW with the same
    groups and a one-line notice. Pass the unwrapped model.
    """
    embedding_params = list(model.transformer.wte.parameters())
    embedding_ids = {id(p) for p in embedding_params}
    other_params = [p for p in model.parameters() if id(p) not in embedding_ids]
    lr_scale = (model.config.n_embd / 768) ** -0.5
    groups = [dict(params=other_params, lr=lr * lr_scale),
              dict(params=embedding_params, lr=lr * embedding_lr_frac * lr_scale)]
    on_cuda = all(p.is_cuda for p in model.parameters())
    adamw8bit = adamw8bit_class(on_cuda)
    if adamw8bit is not None:
        opt = adamw8bit(groups, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=on_cuda)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
        group["schedule"] = "cosine"
        group["warmup_ratio"] = warmup_ratio
    return [opt]


def adamw8bit_class(on_cuda: bool):
    """bitsandbytes' AdamW8bit, or None (after a one-line notice) when it cannot run here."""
    if not on_cuda:
        notice_once("--optimizer adamw8bit: bitsandbytes' 8-bit AdamW needs a CUDA GPU; using torch AdamW")
        return None
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        notice_once(f"--optimizer adamw8bit: bitsandbytes is not importable ({e}); using torch AdamW")
        return None
    return bnb.optim.AdamW8bit


def build_optimizers_for(name: str, model: GPT, *, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                         matrix_lr: float = 0.02, weight_decay: float = 0.0,
                         warmup_ratio: float = 0.0) -> list[torch.optim.Optimizer]:
    """`--optimizer NAME`: "muon" (nanochat's, with its LR flags) or "adamw8bit" (the seed's fixed recipe:
    only a nonzero `warmup_ratio` overrides its 2% warmup)."""
    if name == "muon":
        return build_optimizers(model, embedding_lr=embedding_lr, unembedding_lr=unembedding_lr,
                                matrix_lr=matrix_lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        return build_adamw8bit_optimizers(model, warmup_ratio=warmup_ratio if warmup_ratio > 0 else 0.02)
    raise ValueError(f"optimizer {name!r}: TrainConfig.validate admits only {', '.join(OPTIMIZER_CHOICES)}")


# -----------------------------------------------------------------------------
# Schedules: functions of the step, so a resumed run needs no scheduler state


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0,
                  warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac (nanochat's get_lr_multiplier)."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= warmdown_start(num_iterations, warmdown_ratio):
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final_lr_frac


def warmdown_start(num_iterations: int, warmdown_ratio: float = 0.2) -> int:
    """The step from which `lr_multiplier` decays (its value there is still 1)."""
    return num_iterations - round(warmdown_ratio * num_iterations)


def cosine_lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.02,
                         final_lr_frac: float = 0.0) -> float:
    """Linear warmup, then a half cosine from 1 down to final_lr_frac at the last step."""
    warmup_iters = round(warmup_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, num_iterations - warmup_iters))
    return final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def muon_momentum(step: int) -> float:
    """Muon's momentum ramps linearly from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, num_iterations: int,
                    warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                    final_lr_frac: float = 0.0) -> float:
    """Set every group's lr = initial_lr * lrm and Muon's momentum for this step; returns lrm.

    Groups marked `schedule="cosine"` (the adamw8bit recipe) use `cosine_lr_multiplier` with their own
    `warmup_ratio` instead; the returned lrm is then theirs.
    """
    lrm = lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac)
    momentum = muon_momentum(step)
    reported = lrm
    for opt in optimizers:
        # Accelerate hands back its wrapper (AcceleratedOptimizer); the Muon test must look inside it
        is_muon = isinstance(getattr(opt, "optimizer", opt), Muon)
        for group in opt.param_groups:
            if group.get("schedule") == "cosine":
                reported = cosine_lr_multiplier(step, num_iterations, group["warmup_ratio"], final_lr_frac)
                group["lr"] = group["initial_lr"] * reported
            else:
                group["lr"] = group["initial_lr"] * lrm
            if is_muon or group.get("use_muon"):  # use_muon: DeepSpeed's Muon groups (deepspeed_zero.py)
                group["momentum"] = momentum
    return reported


# -----------------------------------------------------------------------------
# Horizon, batch, clipping


def resolve_num_iterations(num_iterations: int, target_flops: float, target_param_data_ratio: float,
                           num_params: int, flops_per_token: int, total_batch_size: int) -> int:
    """The number of optimizer steps; the first horizon set (> 0) wins, in nanochat's order."""
    if num_iterations > 0:
        steps = num_iterations
        source = "--num_iterations"
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
        source = "--target_flops"
    elif target_param_data_ratio > 0:
        steps = int((target_param_data_ratio * num_params) // total_batch_size)
        source = "--target_param_data_ratio"
    else:
        raise UserError("no training horizon: set --num_iterations, --target_flops or "
                        "--target_param_data_ratio to a value > 0")
    if steps < 1:
        raise UserError(f"{source} gives {steps} optimizer steps at --total_batch_size={total_batch_size:,}; "
                        "raise it or lower --total_batch_size")
    return steps


def grad_accum_steps(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that all ranks together see total_batch_size tokens."""
    tokens_per_micro_step = device_batch_size * max_seq_len * world_size
    if total_batch_size <= 0 or total_batch_size % tokens_per_micro_step != 0:
        lower = max(1, total_batch_size // tokens_per_micro_step) * tokens_per_micro_step
        raise UserError(
            f"--total_batch_size={total_batch_size:,} tokens is not a positive multiple of "
            f"--device_batch_size x --max_seq_len x world size = {device_batch_size} x {max_seq_len} x "
            f"{world_size} = {tokens_per_micro_step:,}; use e.g. --total_batch_size={lower} "
            f"or change --device_batch_size")
    return total_batch_size // tokens_per_micro_step


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the global grad norm to max_norm (0 disables clipping) and return the pre-clip norm.

    The norm stays a tensor: the caller chooses when to pay the device sync of `.item()`.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    # disabled: still report the norm (for the log), computed in fp32 across mixed bf16/fp32 grads
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in parameters]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
