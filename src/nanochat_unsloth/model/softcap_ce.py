"""The fused loss's per-chunk work in one Triton kernel: softcap, log-sum-exp, loss and dL/dz of a row.

`lm_head_loss.py` makes one chunk of logits z = h @ W.T at a time and needs, per row with target t,

    s = c * tanh(z / c)                                    the softcap (c = 15 in nanochat)
    loss = logsumexp(s) - s[t]                             (0 where t is ignored)
    dz = scale * (softmax(s) - onehot(t)) * (1 - (s / c)^2)   (0 where t is ignored)

`lm_head_loss._ce_chunk_grad` is that math in torch (the CPU path and the reference). Inductor's fusion of
it fell well short of the bandwidth the pass needs (docs/perf-log/2026-11-28.md, "A Triton kernel for the
fused loss's chunk"). Here one program takes one row in two passes over it:

    pass 1: the sum of exp(s - c). Since |s| <= c, the shift c bounds every term by 1 and below by
            exp(-2c), so no running maximum is needed (which softmax kernels otherwise keep);
            lse = c + log(sum).
    pass 2: recompute s, write dz over z in place (each element is read before it is written, by the
            same program), so a chunk needs one buffer of logits instead of two.

tanh(y) is 1 - 2 / (exp(2y) + 1): one exp2 and one division, accurate to a few fp32 ulps of 1 (absolute
~1e-7, far below the bf16 rounding of z itself). All math is fp32; dz is rounded once to z's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nanochat_unsloth.model.ops import IGNORE_INDEX

try:  # CPU installs have no Triton: there the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - GPU images have it
    triton = None

# Elements of a row per loop iteration, and warps per program (one program per row). Fixed, not autotuned:
# every process sums a row in the same order.
BLOCK = 4096
NUM_WARPS = 8
# exp(s - c) >= exp(-2c) must stay a normal fp32 number: c <= 43 (exp(-86) ~ 4e-38); nanochat's is 15
MAX_SOFTCAP = 40.0


def supported(z: Tensor, targets: Tensor, softcap: float) -> bool:
    """What the kernel handles: a CUDA (rows, vocab) chunk with contiguous rows, one target per row."""
    return (triton is not None and z.is_cuda and z.dim() == 2 and z.stride(1) == 1
            and z.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and targets.shape == (z.size(0),) and 0.0 < float(softcap) <= MAX_SOFTCAP)


def ce_chunk_grad(z: Tensor, targets: Tensor, softcap: float, grad_scale: Tensor) -> tuple[Tensor, Tensor]:
    """`lm_head_loss._ce_chunk_grad`'s contract: (sum of the valid rows' losses, dz in z's dtype).
    dz is z itself, overwritten: the caller must not need z afterwards."""
    losses = _launch(z, targets, softcap, grad_scale, with_grad=True)
    return losses.sum(), z


def ce_chunk_losses(z: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """`lm_head_loss._ce_chunk_losses`'s contract: per-row fp32 losses (0 where ignored); z is left as is."""
    return _launch(z, targets, softcap, None, with_grad=False)


def _launch(z: Tensor, targets: Tensor, softcap: float, grad_scale: Tensor | None, with_grad: bool) -> Tensor:
    n_rows, vocab = z.shape
    targets = targets.contiguous()  # one per row, read at row * 1
    losses = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    if n_rows:
        scale = grad_scale if grad_scale is not None else losses  # unread without the gradient
        _ce_kernel[(n_rows,)](z, targets, scale, losses, vocab, z.stride(0), float(softcap), 1.0 / float(softcap),
                              IGNORE=IGNORE_INDEX, WITH_GRAD=with_grad, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return losses


if triton is not None:
    TWO_LOG2E = tl.constexpr(2.0 * math.log2(math.e))  # a global a kernel reads must be a constexpr object

    @triton.jit
    def _softcap(z, c, inv_c):
        # (s, t) with t = tanh(z / c) = 1 - 2 / (exp(2z/c) + 1) and s = c * t; exp overflowing to inf gives 1
        t = 1.0 - 2.0 / (tl.exp2(z * (inv_c * TWO_LOG2E)) + 1.0)
        return c * t, t

    @triton.jit
    def _ce_kernel(Z, TARGETS, SCALE, LOSSES, vocab, stride, c, inv_c,
                   IGNORE: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride
        cols = tl.arange(0, BLOCK)
        target = tl.load(TARGETS + row)
        valid = target != IGNORE
        safe = tl.where(valid, target, 0)

        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            mask = start + cols < vocab
            z = tl.load(z_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            s, _ = _softcap(z, c, inv_c)
            acc += tl.where(mask, tl.exp(s - c), 0.0)
        lse = c + tl.log(tl.sum(acc, axis=0))
        # a target past the vocab reads nothing (the torch path raises on it; this one must not read out of bounds)
        s_target, _ = _softcap(tl.load(z_row + safe, mask=safe < vocab, other=0.0).to(tl.float32), c, inv_c)
        tl.store(LOSSES + row, tl.where(valid, lse - s_target, 0.0))

        if WITH_GRAD:
            g = tl.where(valid, tl.load(SCALE).to(tl.float32), 0.0)
            for start in range(0, vocab, BLOCK):
                idx = start + cols
                mask = idx < vocab
                z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)
                s, t = _softcap(z, c, inv_c)
                p = tl.exp(s - lse) - tl.where(idx == safe, 1.0, 0.0)
                tl.store(z_row + idx, (p * g * (1.0 - t * t)).to(Z.dtype.element_ty), mask=mask)
