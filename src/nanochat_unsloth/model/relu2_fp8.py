"""The FP8 MLP's backward glue in one Triton kernel: ReLU^2's derivative, the e5m2 gradient in both layouts
and its amax.

With `--fp8` and delayed scaling, the backward of the MLP's `h = relu(u)^2` (u = c_fc's output) hands c_fc's
two backward GEMMs the gradient dr = dL/du as e5m2, once row-major (dx = dr @ W) and once transposed
(dW = dr.T @ x: Hopper's FP8 GEMM takes only K-major operands), and records max|dr| for the next
micro-step's scale:

    dr   = where(u > 0, dh * 2u, 0)            rounded to dh's dtype, as autograd hands it on
    g8   = e5m2(clamp(dr * scale, +-max))     (M, N) and its transpose (N, M)
    amax = max |dr|

`fp8._relu2_grad_to_e5m2` is that math in torch (the CPU path and the reference). Inductor's fusion of it
moved about 2.7 times the bytes the pass needs (docs/PERF.md, "The FP8 MLP glue kernel"). Here one
program takes a tile of dh and u, keeps dr in registers, stores the e5m2 tile and its transpose (Triton
routes the transposed store through shared memory) and folds the tile's max into the amax with an atomic
max. Every output is elementwise or a max, so it does not depend on the tile shape or the order of the
programs: the launch shape is autotuned without changing a bit of the result (tests/test_relu2_fp8.py
runs every shape).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # CPU installs have no Triton: there the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - GPU images have it
    triton = None

E5M2 = torch.float8_e5m2
E5M2_MAX = torch.finfo(E5M2).max


def supported(dh: Tensor, u: Tensor) -> bool:
    """What the kernel handles: contiguous CUDA matrices of one shape and a 16- or 32-bit float dtype."""
    return (triton is not None and dh.is_cuda and dh.dim() == 2 and dh.shape == u.shape
            and dh.dtype == u.dtype and dh.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and dh.is_contiguous() and u.is_contiguous())


def relu2_grad_e5m2(dh: Tensor, u: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(g8, g8 transposed and contiguous, amax as a 0-dim fp32 tensor) of the math above; `scale` is a
    0-dim fp32 tensor on the GPU (the delayed scale: read by the kernel, never by the host)."""
    return _relu2_grad_e5m2_op(dh, u, scale)


# Launch shapes (rows, columns per tile; warps per program) that the GPU autotunes among. Triton's CPU
# interpreter cannot autotune: there (and in the tests) a shape is passed explicitly.
CONFIGS = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8))

if triton is not None:
    FMAX = tl.constexpr(E5M2_MAX)  # a global a kernel reads must be a constexpr object

    @triton.jit
    def _relu2_grad_e5m2_kernel(DH, U, SCALE, G8, G8T, AMAX, M, N, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dh = tl.load(DH + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + off, mask=mask, other=0.0).to(tl.float32)
        # dh * 2u is exact in fp32 for 16-bit inputs; rounding it to dh's dtype gives autograd's gradient
        dr = tl.where(u > 0, dh * (2.0 * u), 0.0).to(DH.dtype.element_ty).to(tl.float32)
        q = tl.minimum(tl.maximum(dr * tl.load(SCALE), -FMAX), FMAX).to(G8.dtype.element_ty)
        tl.store(G8 + off, q, mask=mask)
        off_t = cols.to(tl.int64)[:, None] * M + rows[None, :]
        tl.store(G8T + off_t, tl.trans(q), mask=tl.trans(mask))
        tl.atomic_max(AMAX, tl.max(tl.max(tl.abs(dr), axis=1), axis=0))

    _autotuned_kernel = triton.autotune(
        configs=[triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in CONFIGS], key=["M", "N"],
    )(_relu2_grad_e5m2_kernel)


def launch(dh: Tensor, u: Tensor, scale: Tensor, config: tuple[int, int, int] | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel on (M, N) inputs: autotuned among CONFIGS, or at one `config` (bm, bn, warps)."""
    M, N = dh.shape
    g8 = torch.empty((M, N), dtype=E5M2, device=dh.device)
    g8t = torch.empty((N, M), dtype=E5M2, device=dh.device)
    amax = torch.zeros((), dtype=torch.float32, device=dh.device)  # |dr| >= 0: the atomic max starts at 0
    if M and N:
        if config is None:
            def grid(meta):
                return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
            _autotuned_kernel[grid](dh, u, scale, g8, g8t, amax, M, N)
        else:
            bm, bn, warps = config
            _relu2_grad_e5m2_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                dh, u, scale, g8, g8t, amax, M, N, BM=bm, BN=bn, num_warps=warps)
    return g8, g8t, amax


@torch.library.custom_op("nanochat_unsloth::relu2_grad_e5m2", mutates_args=())
def _relu2_grad_e5m2_op(dh: Tensor, u: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return launch(dh, u, scale)


@_relu2_grad_e5m2_op.register_fake
def _(dh: Tensor, u: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    M, N = dh.shape
    return (torch.empty((M, N), dtype=E5M2, device=dh.device), torch.empty((N, M), dtype=E5M2, device=dh.device),
            torch.empty((), dtype=torch.float32, device=dh.device))
