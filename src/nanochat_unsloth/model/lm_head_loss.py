"""The fused, chunked lm_head + softcap + cross-entropy of the `fused` kernel set.

Per chunk of R rows: z = h @ W.T (bf16 GEMM, as nanochat's lm_head), then one pass computes the fp32
softcap, the log-sum-exp, the per-row loss and dz = dL/dz in bf16 (on CUDA the Triton kernel of
`softcap_ce.py`, which writes dz over z; elsewhere `_ce_chunk_grad`, its torch reference); two more GEMMs
turn dz into dL/dh (rows of a preallocated buffer) and dL/dW (accumulated in place). The same three GEMMs
as the unfused loss, but the logits are read twice and written once per chunk instead of materialised in
bf16 and fp32 with a saved log-softmax: less memory traffic and only one chunk of logits alive. Backward
only scales the saved gradients by the incoming grad.

`--loss_chunk_mb` sets the chunk size; the result does not depend on it beyond fp32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nanochat_unsloth.model import softcap_ce
from nanochat_unsloth.model.ops import IGNORE_INDEX, compute_dtype

# bf16 logits + their gradient per chunk: 8 chunks of 8192 rows at d20 B=32 (the Triton kernel writes the
# gradient over the logits, so on CUDA a chunk takes half of it)
DEFAULT_CHUNK_MB = 2048.0


def _upcast(z: Tensor) -> Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 math (fp64 stays fp64, for tests)


def _softcapped_losses(z: Tensor, targets: Tensor, softcap: float):
    """(s, lse, valid, safe, losses): the softcapped logits in fp32, their log-sum-exp, which rows count,
    the targets with ignored ones at 0, and the per-row CE losses (0 where ignored)."""
    s = softcap * torch.tanh(_upcast(z) / softcap)
    lse = torch.logsumexp(s, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    s_target = s.gather(1, safe.unsqueeze(1)).squeeze(1)
    return s, lse, valid, safe, torch.where(valid, lse - s_target, torch.zeros_like(lse))


def _ce_chunk_grad(z: Tensor, targets: Tensor, softcap: float, grad_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of the CE losses of the chunk's valid rows, and dz = d(grad_scale * sum)/dz in z's dtype."""
    s, lse, valid, safe, losses = _softcapped_losses(z, targets, softcap)
    # dL/ds = softmax(s) - onehot(target); ds/dz = 1 - tanh^2 = 1 - (s / softcap)^2
    p = torch.exp(s - lse.unsqueeze(1))
    onehot = torch.arange(s.size(1), device=s.device).unsqueeze(0) == safe.unsqueeze(1)
    row_scale = torch.where(valid, grad_scale, torch.zeros_like(grad_scale)).unsqueeze(1)
    dz = (p - onehot.to(p.dtype)) * row_scale * (1.0 - (s / softcap) ** 2)
    return losses.sum(), dz.to(z.dtype)


def _ce_chunk_losses(z: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Per-row fp32 CE losses of the chunk (0 where ignored): the no-grad / reduction="none" path."""
    return _softcapped_losses(z, targets, softcap)[-1]


def _chunk_grad(z: Tensor, targets: Tensor, softcap: float, grad_scale: Tensor) -> tuple[Tensor, Tensor]:
    if softcap_ce.supported(z, targets, softcap):
        return softcap_ce.ce_chunk_grad(z, targets, softcap, grad_scale)
    return _ce_chunk_grad(z, targets, softcap, grad_scale)


def _chunk_losses(z: Tensor, targets: Tensor, softcap: float) -> Tensor:
    if softcap_ce.supported(z, targets, softcap):
        return softcap_ce.ce_chunk_losses(z, targets, softcap)
    return _ce_chunk_losses(z, targets, softcap)


def loss_chunk_rows(n_rows: int, vocab_size: int, chunk_mb: float = DEFAULT_CHUNK_MB) -> int:
    """Rows per chunk: bf16 logits and their bf16 gradient together near `chunk_mb` (`--loss_chunk_mb`),
    split evenly so that all chunks (but at most the last) have one shape."""
    budget = int(float(chunk_mb) * 2**20)
    rows = max(1, budget // (4 * vocab_size))
    n_chunks = -(-n_rows // rows)
    return -(-n_rows // n_chunks)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, softcap: float, reduction: str,
                chunk_mb: float) -> Tensor:
        dtype = compute_dtype(x)
        device = x.device
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device.type, enabled=False):
            h = x.reshape(-1, x.size(-1)).to(dtype)
            t = targets.reshape(-1)
            w = weight.to(dtype)
            n = h.size(0)
            acc = torch.promote_types(dtype, torch.float32)  # fp32 (fp64 for tests)
            n_valid = (t != IGNORE_INDEX).sum()
            if reduction == "mean":  # an all-ignored batch gives loss 0 (F.cross_entropy gives nan)
                scale = 1.0 / n_valid.clamp(min=1).to(acc)
            else:
                scale = torch.ones((), dtype=acc, device=device)
            dx = torch.empty_like(h) if need_dx else None
            dw = torch.empty_like(w) if need_dw else None
            total = torch.zeros((), dtype=acc, device=device)
            rows = loss_chunk_rows(n, w.size(0), chunk_mb)
            for i, a in enumerate(range(0, n, rows)):
                b = min(a + rows, n)
                hc = h[a:b]
                z = torch.mm(hc, w.t())
                loss_sum, dz = _chunk_grad(z, t[a:b], softcap, scale)
                del z
                total += loss_sum
                if dx is not None:
                    torch.mm(dz, w, out=dx[a:b])
                if dw is not None:
                    if i == 0:
                        torch.mm(dz.t(), hc, out=dw)
                    else:
                        dw.addmm_(dz.t(), hc)
                del dz
            loss = total * scale
        ctx.save_for_backward(*(g for g in (dx, dw) if g is not None))
        ctx.has = (dx is not None, dw is not None)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = iter(ctx.saved_tensors)
        dx = dw = None
        if ctx.has[0]:
            dx = (next(saved) * grad_out).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.has[1]:
            dw = (next(saved) * grad_out).to(ctx.w_dtype)
        return dx, dw, None, None, None, None


def _chunked_token_losses(x: Tensor, weight: Tensor, targets: Tensor, softcap: float, chunk_mb: float) -> Tensor:
    """Flat fp32 per-token losses without building all logits (no autograd)."""
    dtype = compute_dtype(x)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        h = x.reshape(-1, x.size(-1)).to(dtype)
        t = targets.reshape(-1)
        w = weight.to(dtype)
        out = torch.empty(h.size(0), dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        rows = loss_chunk_rows(h.size(0), w.size(0), chunk_mb)
        for a in range(0, h.size(0), rows):
            b = min(a + rows, h.size(0))
            out[a:b] = _chunk_losses(torch.mm(h[a:b], w.t()), t[a:b], softcap)
    return out


@torch.compiler.disable  # an opaque region under whole-model compile: its kernel is Triton's, launched eagerly
def chunked_lm_head_loss(x: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                         reduction: str = "mean", chunk_mb: float = DEFAULT_CHUNK_MB) -> Tensor:
    """Same contract as `torch_lm_head_loss`, one chunk of logits at a time."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean|sum|none, not {reduction!r}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if reduction == "none" or not needs_grad:
        losses = _chunked_token_losses(x, weight, targets, softcap, chunk_mb)
        if reduction == "none":
            return losses
        total = losses.sum()
        if reduction == "sum":
            return total
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return _ChunkedLMHeadLoss.apply(x, weight, targets, softcap, reduction, chunk_mb)


@dataclass(frozen=True)
class ChunkedLMHeadLoss:
    """`chunked_lm_head_loss` with its chunk budget bound: the `lm_head_loss` op of the fused set."""

    chunk_mb: float = DEFAULT_CHUNK_MB

    def __call__(self, x: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                 reduction: str = "mean") -> Tensor:
        return chunked_lm_head_loss(x, weight, targets, softcap, reduction, self.chunk_mb)
