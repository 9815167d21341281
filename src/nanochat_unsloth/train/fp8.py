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

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """(x8, inv_scale) with x ~= x8.float() * inv_scale: one scale for the whole tensor, from its own amax.

    The scale maps max|x| to the format's largest finite value. The clamp keeps fp32 rounding of
    `x * scale` at the top of the range from overflowing the cast (e4m3fn has no inf: it would give
    nan); inside the fused cast kernel it costs nothing.
    """
    return quantize_with_amax(x, tensor_amax(x), dtype)


def tensor_amax(x: Tensor) -> Tensor:
    """max|x| in fp32. For a matrix, row maxima first: a reduction along rows iterates like the
    elementwise kernel that produces or casts the matrix, so torch.compile can fuse the two (one read
    of the tensor); a whole-tensor reduction would be a separate pass."""
    x = x.detach().abs()
    if x.dim() == 2:
        x = x.amax(dim=1)
    return x.amax().float()


def quantize_with_amax(x: Tensor, amax: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x8, inv_scale) with the scale that maps `amax` to the format's largest value. Values above
    `amax` saturate at +-max (the clamp) instead of overflowing."""
    fmax = torch.finfo(dtype).max
    scale = fmax / amax.float().clamp(min=_AMAX_FLOOR)
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


def _column_major(t: Tensor) -> Tensor:
    # cuBLAS's FP8 GEMM wants its second operand column-major: same shape, transposed storage.
    return t.t().contiguous().t()


def _scaled_mm(a: Tensor, a_inv: Tensor, b: Tensor, b_inv: Tensor, out_dtype: torch.dtype,
               fast_accum: bool) -> Tensor:
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


# -----------------------------------------------------------------------------
# Delayed scaling: the scale of a tensor from the amax its predecessor had
#
# Dynamic scaling needs a tensor's amax before it can cast it: one full read of the tensor for the
# reduction, then a second read for the cast, and neither can start before the tensor is complete.
# With a scale known in advance, the cast is a plain elementwise op that Inductor fuses into the
# kernel producing the tensor (the norm, ReLU^2, the rotary/norm backward), and the amax for the
# next use is a reduction in that same kernel. The known scale is the amax the same layer saw one
# micro-step earlier, times MARGIN (activations and gradients change little between micro-steps;
# a value above the predicted range saturates at the format's max instead of overflowing).

SCALING_CHOICES = ("delayed", "dynamic")


def scaling_mode() -> str:
    """NANOCHAT_FP8_SCALING=delayed (default) | dynamic (every tensor from its own amax; for comparison)."""
    mode = os.environ.get("NANOCHAT_FP8_SCALING", "delayed")
    if mode not in SCALING_CHOICES:
        raise ValueError(f"NANOCHAT_FP8_SCALING={mode!r}: choose one of {', '.join(SCALING_CHOICES)}")
    return mode


MARGIN = 2.0  # one binade of headroom: costs one binade at the bottom of e4m3's ~18 (e5m2's ~31)


class DelayedScaling(nn.Module):
    """The amax history of one Linear's input and output gradient (non-persistent buffers: not in the
    state_dict, rebuilt by the first step of every run).

    `active` stays False while the history is not trustworthy yet: until then the layer scales
    dynamically (and records amaxes). At initialisation lm_head is zero, so every block gradient of
    step 0 is exactly zero and a zero history would be meaningless; `start_delayed_scaling` switches
    the layers on once every recorded amax is positive. The switch is a Python attribute, so
    torch.compile compiles the block once per mode (twice in a run).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("x_amax", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("grad_amax", torch.zeros((), dtype=torch.float32), persistent=False)
        self.active = False

    def reset(self) -> None:
        with torch.no_grad():
            self.x_amax.zero_()
            self.grad_amax.zero_()
        self.active = False


def attach_delayed_scaling(blocks: nn.Module) -> None:
    """Give every Linear inside `blocks` a DelayedScaling, as `layer.fp8_scaling` (its `fp8_linear` uses it)."""
    for module in list(blocks.modules()):
        if isinstance(module, nn.Linear) and not hasattr(module, "fp8_scaling"):
            module.fp8_scaling = DelayedScaling()


def delayed_scalings(model: nn.Module) -> list[DelayedScaling]:
    return [m for m in model.modules() if isinstance(m, DelayedScaling)]


def start_delayed_scaling(model: nn.Module) -> bool:
    """Switch every layer to delayed scaling once all of them have a positive amax history.

    Called after each optimizer step. Returns True when delayed scaling is (now) on. Costs one host
    sync per call until the switch, none after it.
    """
    scalings = delayed_scalings(model)
    if not scalings:
        return False
    if all(s.active for s in scalings):
        return True
    history = torch.stack([a for s in scalings for a in (s.x_amax, s.grad_amax)])
    if not bool((history > 0).all()):
        return False
    for s in scalings:
        s.active = True
    return True


# -----------------------------------------------------------------------------
# The three GEMMs of a Linear


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W.T with all three GEMMs in FP8. x: (M, K) in the compute dtype, W: (N, K) parameter.

    `grad_amax` (a DelayedScaling buffer, or None) is the output gradient's amax history: read for the
    scale when `delayed`, overwritten with this backward's amax either way.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, x_scale_amax: Tensor | None, grad_amax: Tensor | None,
                delayed: bool) -> Tensor:
        # cuBLAS's FP8 GEMM takes only row-major first operands: quantizing keeps the input's layout
        x = x.contiguous()
        if x_scale_amax is None:
            x8, x_inv = quantize_tensorwise(x, E4M3)
        else:
            x8, x_inv = quantize_with_amax(x, x_scale_amax, E4M3)
        # The weights change every optimizer step (and c_proj starts at zero): always their own amax.
        w8, w_inv = quantize_tensorwise(weight, E4M3)
        # W8 (N, K) row-major, so W8.t() is (K, N) column-major: no copy. Fast accumulation in the
        # forward only (the common recipe: the backward's long reductions keep full accumulation).
        y = _scaled_mm(x8, x_inv, w8.t(), w_inv, x.dtype, fast_accum=True)
        saved = (x8, x_inv, w8, w_inv) + ((grad_amax,) if grad_amax is not None else ())
        ctx.save_for_backward(*saved)  # 1 byte per element instead of x's 2
        ctx.weight_dtype = weight.dtype
        ctx.delayed = delayed
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x8, x_inv, w8, w_inv, *history = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        if history and ctx.delayed:
            g8, g_inv = quantize_with_amax(grad_y, history[0] * MARGIN, E5M2)
        else:
            g8, g_inv = quantize_tensorwise(grad_y, E5M2)
        if history:
            history[0].copy_(tensor_amax(grad_y))  # the next micro-step's scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _scaled_mm(g8, g_inv, _column_major(w8), w_inv, grad_y.dtype, fast_accum=False)
        if ctx.needs_input_grad[1]:
            # dW = dy.T @ x, straight into the parameter's dtype (fp32 master weights: no bf16 rounding)
            grad_w = _scaled_mm(g8.t().contiguous(), g_inv, _column_major(x8), x_inv, ctx.weight_dtype,
                                fast_accum=False)
        return grad_x, grad_w, None, None, None


def fp8_matmul(x: Tensor, weight: Tensor, scaling: DelayedScaling | None = None) -> Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 GEMMs while training; plain `F.linear` without autograd.

    With a `scaling` state the layer records its amaxes, and scales from them once the state is active.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight)  # evaluation and sampling: nanochat's bf16 math
    x2d = x.reshape(-1, x.size(-1)).to(compute_dtype(x))
    if scaling is None:
        y = _Fp8Matmul.apply(x2d, weight, None, None, False)
    else:
        delayed = scaling.active
        x_scale_amax = scaling.x_amax * MARGIN if delayed else None
        y = _Fp8Matmul.apply(x2d, weight, x_scale_amax, scaling.grad_amax, delayed)
        with torch.no_grad():
            scaling.x_amax.copy_(tensor_amax(x2d))  # the next micro-step's scale
    return y.view(*x.shape[:-1], weight.size(0))


def fp8_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """The kernel seam's `linear` with FP8 GEMMs: `layer`'s weight, and its delayed scaling if it has one."""
    return fp8_matmul(x, layer.weight, getattr(layer, "fp8_scaling", None))
