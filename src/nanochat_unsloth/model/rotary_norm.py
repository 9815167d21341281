"""The attention prologue of q and k in one kernel each way: rotary embedding, then the weightless RMSNorm.

nanochat applies `rms_norm(apply_rotary(x, cos, sin))` to q and to k in every block (ops.torch_rotary_norm
is that math, op for op). Under torch.compile Inductor fuses it, but its backward runs as several passes over
q and k (docs/perf-log/2026-11-28.md, "The attention prologue as one Triton kernel each way"). Here each
direction is one pass per row of head_dim values:

    forward   y = rotate(x)                      y1 = x1*cos + x2*sin,  y2 = x2*cos - x1*sin
              out = y * r,  r = 1/sqrt(mean(y^2) + eps)
    backward  dy = r * (g - out * mean(g * out))  (RMSNorm's gradient without a weight)
              dx1 = dy1*cos - dy2*sin,  dx2 = dy1*sin + dy2*cos   (the rotation transposed)

The forward saves only x (as the torch path saves it) and the backward recomputes y and r in registers.
Intermediates are fp32 and each output is rounded once, as Inductor's fused kernels round; eps is
F.rms_norm's default (float32's for bf16 input: it computes in float32). The kernels are Triton (the GPU
image's 3.6), registered as a torch custom op with its autograd, so torch.compile keeps them as one node
inside a compiled block.
`rotary_norm(x, cos, sin)` takes them on CUDA for shapes they handle and falls back to the torch
reference anywhere else. tests/test_kernels_parity_gpu.py checks them against the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nanochat_unsloth.model.ops import torch_rotary_norm

try:  # CPU installs have no Triton: there only the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - GPU images have it
    triton = None

# The launch shape: rows of head_dim values per Triton program, and warps per program. Fixed rather than
# autotuned, so that every process of a run reduces each row in the same order (benchmarks/rope_norm_micro.py
# --sweep times the alternatives).
ROWS_PER_PROGRAM = 16
NUM_WARPS = 2


def _supported(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Shapes and layouts the kernels handle: a CUDA (B, T, H, D) tensor with D a power of two >= 16, the
    last dim contiguous, and (1, T, 1, D/2) tables."""
    if triton is None or not x.is_cuda or x.dim() != 4:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    d = x.size(-1)
    return (d >= 16 and d & (d - 1) == 0 and x.stride(-1) == 1 and cos.shape == sin.shape
            and tuple(cos.shape) == (1, x.size(1), 1, d // 2) and cos.stride() == sin.stride()
            and cos.stride(-1) == 1 and cos.dtype == sin.dtype)


def rms_norm_eps(dtype: torch.dtype) -> float:
    """F.rms_norm's default eps: that of the type it computes in (float32 for bf16 / fp16 inputs)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def rotary_norm(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`rms_norm(apply_rotary(x, cos, sin))` with the fused kernels where they apply, else the torch reference."""
    if _supported(x, cos, sin):
        return _rotary_norm_op(x, cos, sin, rms_norm_eps(x.dtype))
    return torch_rotary_norm(x, cos, sin)


# -----------------------------------------------------------------------------
# The kernels

if triton is not None:
    @triton.jit
    def _load_rows(X, rows, cols, sb, st, sh, T, H, mask, HALF: tl.constexpr):
        # row index -> (b, t, h) of a (B, T, H, D) tensor with any strides but the last
        h = rows % H
        t = (rows // H) % T
        b = rows // (H * T)
        off = (b * sb + t * st + h * sh)[:, None] + cols[None, :]
        x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + off + HALF, mask=mask, other=0.0).to(tl.float32)
        return x1, x2, t

    @triton.jit
    def _rotate_and_scale(X, COS, SIN, rows, cols, sxb, sxt, sxh, sct, T, H, mask, eps, HALF: tl.constexpr):
        # y = rotate(x) and r = 1/sqrt(mean(y^2) + eps), in fp32, with the tables the backward also needs
        x1, x2, t = _load_rows(X, rows, cols, sxb, sxt, sxh, T, H, mask, HALF)
        table = (t * sct)[:, None] + cols[None, :]
        c = tl.load(COS + table, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c + x2 * s
        y2 = x2 * c - x1 * s
        r = 1.0 / tl.sqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * HALF) + eps)
        return y1, y2, r, c, s

    @triton.jit
    def _fwd_kernel(X, COS, SIN, OUT, n_rows, T, H, sxb, sxt, sxh, sct, eps,
                    HALF: tl.constexpr, ROWS: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, HALF)
        mask = (rows < n_rows)[:, None]
        y1, y2, r, c, s = _rotate_and_scale(X, COS, SIN, rows, cols, sxb, sxt, sxh, sct, T, H, mask, eps, HALF)
        out = rows[:, None] * (2 * HALF) + cols[None, :]  # OUT is contiguous (B, T, H, D)
        tl.store(OUT + out, (y1 * r[:, None]).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + out + HALF, (y2 * r[:, None]).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(G, X, COS, SIN, DX, n_rows, T, H, sgb, sgt, sgh, sxb, sxt, sxh, sct, eps,
                    HALF: tl.constexpr, ROWS: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, HALF)
        mask = (rows < n_rows)[:, None]
        y1, y2, r, c, s = _rotate_and_scale(X, COS, SIN, rows, cols, sxb, sxt, sxh, sct, T, H, mask, eps, HALF)
        g1, g2, _ = _load_rows(G, rows, cols, sgb, sgt, sgh, T, H, mask, HALF)
        n1 = y1 * r[:, None]
        n2 = y2 * r[:, None]
        dot = (tl.sum(g1 * n1, axis=1) + tl.sum(g2 * n2, axis=1)) / (2 * HALF)
        dy1 = r[:, None] * (g1 - n1 * dot[:, None])
        dy2 = r[:, None] * (g2 - n2 * dot[:, None])
        out = rows[:, None] * (2 * HALF) + cols[None, :]  # DX is contiguous (B, T, H, D)
        tl.store(DX + out, (dy1 * c - dy2 * s).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + out + HALF, (dy1 * s + dy2 * c).to(DX.dtype.element_ty), mask=mask)


def _grid(n_rows: int) -> tuple[int]:
    return (-(-n_rows // ROWS_PER_PROGRAM),)


@torch.library.custom_op("nanochat_unsloth::rotary_norm", mutates_args=())
def _rotary_norm_op(x: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    B, T, H, D = x.shape
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    n_rows = B * T * H
    if n_rows:
        _fwd_kernel[_grid(n_rows)](x, cos, sin, out, n_rows, T, H, x.stride(0), x.stride(1), x.stride(2),
                                   cos.stride(1), eps, HALF=D // 2, ROWS=ROWS_PER_PROGRAM, num_warps=NUM_WARPS)
    return out


@_rotary_norm_op.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("nanochat_unsloth::rotary_norm_backward", mutates_args=())
def _rotary_norm_backward_op(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    B, T, H, D = x.shape
    dx = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    n_rows = B * T * H
    if n_rows:
        _bwd_kernel[_grid(n_rows)](grad, x, cos, sin, dx, n_rows, T, H, grad.stride(0), grad.stride(1),
                                   grad.stride(2), x.stride(0), x.stride(1), x.stride(2), cos.stride(1), eps,
                                   HALF=D // 2, ROWS=ROWS_PER_PROGRAM, num_warps=NUM_WARPS)
    return dx


@_rotary_norm_backward_op.register_fake
def _(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    x, cos, sin, eps = inputs
    ctx.save_for_backward(x, cos, sin)
    ctx.eps = eps


def _backward(ctx, grad: Tensor):
    x, cos, sin = ctx.saved_tensors
    return _rotary_norm_backward_op(grad, x, cos, sin, ctx.eps), None, None, None


_rotary_norm_op.register_autograd(_backward, setup_context=_setup_context)
