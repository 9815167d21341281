"""FP8 matmuls for the transformer blocks (`--fp8`): the same Linear layers on FP8 tensor cores.

A Linear layer costs three GEMMs per training step:

    forward         y  = x @ W.T
    backward        dx = dy @ W
                    dW = dy.T @ x

With `--fp8` each of them reads its operands in 8-bit floating point (`torch._scaled_mm`, cuBLAS's FP8
GEMM: about twice the bf16 rate on an H100) and writes its result in bf16 / fp32. Activations and
weights use e4m3 (3 mantissa bits), gradients e5m2 (more range, 2 mantissa bits), the usual split.
Scaling is "tensorwise": one fp32 scale per tensor per call, chosen so that the tensor's largest
magnitude lands on the format's largest value (dynamic scaling: no state, nothing to tune or save).

What stays exact: the parameters, their gradients' accumulation and the optimizer are unchanged (the
master weights stay fp32, `dW` comes back in fp32); lm_head, the softcap and the loss stay bf16/fp32;
evaluation and sampling (no autograd) take the plain bf16 `F.linear`, so val bpb is measured with
nanochat's math. What changes: every block GEMM sees operands rounded to 8 bits, so each step is a
slightly noisier version of the bf16 step. docs/PERF.md has the speed and the loss curves.

Memory: the forward saves the e4m3 copies of x and W for the backward instead of the bf16 x, so the
saved matmul inputs take half the bytes.

Needs compute capability >= 8.9 (Ada, Hopper or newer) under CUDA; `kernels.get_kernels` falls back
to bf16 with a one-line notice elsewhere. The math itself also runs on the CPU (slowly: the tests use
it there at toy sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nanochat_unsloth.train.kernels import compute_dtype

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2  # gradients
_AMAX_FLOOR = 1e-12  # an all-zero tensor (zero-initialised c_proj weights at step 0) gets a finite scale
ROW_MULTIPLE = 16  # cuBLAS's FP8 GEMM needs every dimension, the B*T rows included, a multiple of 16


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """(True, "") where `--fp8` runs fast, else (False, why)."""
    if device.type != "cuda":
        return False, f"FP8 matmuls need a CUDA GPU (this run is on {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"FP8 matmuls need compute capability 8.9+ (this GPU has {major}.{minor})"
    return True, ""


def quantize_tensorwise(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x8, inv_scale) with x ~= x8.float() * inv_scale: one scale for the whole tensor.

    The scale maps max|x| to the format's largest finite value. The clamp keeps fp32 rounding of
    `x * scale` at the top of the range from overflowing the cast (e4m3fn has no inf: it would give
    nan); inside the fused cast kernel it costs nothing.
    """
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=_AMAX_FLOOR)
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


def _column_major(t: Tensor) -> Tensor:
    # cuBLAS's FP8 GEMM wants its second operand column-major: same shape, transposed storage.
    return t.t().contiguous().t()


def _scaled_mm(a: Tensor, a_inv: Tensor, b: Tensor, b_inv: Tensor, out_dtype: torch.dtype,
               fast_accum: bool) -> Tensor:
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W.T with all three GEMMs in FP8. x: (M, K) in the compute dtype, W: (N, K) parameter."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        # cuBLAS's FP8 GEMM takes only row-major first operands: quantizing keeps the input's layout
        x = x.contiguous()
        x8, x_inv = quantize_tensorwise(x, E4M3)
        w8, w_inv = quantize_tensorwise(weight, E4M3)
        # W8 (N, K) row-major, so W8.t() is (K, N) column-major: no copy. Fast accumulation in the
        # forward only (the common recipe: the backward's long reductions keep full accumulation).
        y = _scaled_mm(x8, x_inv, w8.t(), w_inv, x.dtype, fast_accum=True)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)  # 1 byte per element instead of x's 2
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = quantize_tensorwise(grad_y.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _scaled_mm(g8, g_inv, _column_major(w8), w_inv, grad_y.dtype, fast_accum=False)
        if ctx.needs_input_grad[1]:
            # dW = dy.T @ x, straight into the parameter's dtype (fp32 master weights: no bf16 rounding)
            grad_w = _scaled_mm(g8.t().contiguous(), g_inv, _column_major(x8), x_inv, ctx.weight_dtype,
                                fast_accum=False)
        return grad_x, grad_w


def fp8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 GEMMs while training; plain `F.linear` without autograd."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight)  # evaluation and sampling: nanochat's bf16 math
    x2d = x.reshape(-1, x.size(-1)).to(compute_dtype(x))
    y = _Fp8Matmul.apply(x2d, weight)
    return y.view(*x.shape[:-1], weight.size(0))
