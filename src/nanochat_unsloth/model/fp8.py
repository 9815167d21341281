"""FP8 matmuls for the transformer blocks (`--fp8`): the same Linear layers on FP8 tensor cores.

A Linear layer costs three GEMMs per training step:

    forward         y  = x @ W.T
    backward        dx = dy @ W
                    dW = dy.T @ x

With `--fp8` each of them reads its operands in 8-bit floating point (`torch._scaled_mm`, cuBLAS's FP8
GEMM: about twice the bf16 rate on an H100) and writes its result in bf16 / fp32. Activations and
weights use e4m3 (3 mantissa bits), gradients e5m2 (more range, 2 mantissa bits), the usual split.
Scaling is "tensorwise": one fp32 scale per tensor per call, chosen so that the tensor's largest
magnitude lands on the format's largest value, from the tensor's own amax ("dynamic", the default).
`--fp8_scaling delayed` attaches a `DelayedScaling` state to activations and gradients instead: the scale
then comes from the amax the same layer saw one micro-step earlier, so the cast need not wait for a
reduction over the tensor (see the section below). It is faster per step, but its loss drifts away from
bf16's over a run (docs/PERF.md, "FP8 at equal quality"), so it is opt-in.

`--fp8_recipe` picks whose FP8 it is: ours (`tensorwise`, below), or torchao's float8 training
(`torchao_tensorwise`, `torchao_rowwise`), kept for a side-by-side (docs/PERF.md).

One converter, `convert_to_fp8(model, scaling, recipe)`, is the only way in: a model goes in,
the FP8 model comes out (its kernel set's `linear` replaced, the scaling state attached). Evaluation turns FP8 off:
in eval mode `fp8_linear` is the plain bf16 `F.linear`, so val bpb and samples are nanochat's math.

What stays exact: the parameters, their gradients' accumulation and the optimizer are unchanged (the
master weights stay fp32, `dW` comes back in fp32); lm_head, the softcap and the loss stay bf16/fp32;
evaluation and sampling take the plain bf16 `F.linear`. What changes: every block GEMM sees operands rounded to 8 bits, so each step is a
slightly noisier version of the bf16 step. docs/PERF.md has the speed ("Speed against nanochat, d20") and the
loss curves ("FP8 at equal quality").

Memory: the forward saves the e4m3 copies of x and W for the backward instead of the bf16 x, so the
saved matmul inputs take half the bytes.

Needs compute capability >= 8.9 (Ada, Hopper or newer) under CUDA; `convert_to_fp8` keeps bf16 with a
one-line notice elsewhere. The math itself also runs on the CPU (slowly: the tests use
it there at toy sizes).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanochat_unsloth.common import notice_once
from nanochat_unsloth.model.cpu_probe import op_runs
from nanochat_unsloth.model.ops import compute_dtype

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
    return x.detach().abs().amax().float()


def row_first_amax(x: Tensor) -> Tensor:
    """max|x| of a matrix, as the max of its row maxima. A reduction along rows iterates like the
    elementwise kernel that produces or casts the matrix, so torch.compile fuses the two into one read
    of the tensor; a whole-tensor reduction is a pass of its own. Only worth it where nothing waits
    for the result (delayed scaling): a cast that needs it still waits for the second stage."""
    return x.detach().abs().amax(dim=1).amax().float()


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
    if a.device.type == "cpu" and not cpu_scaled_mm_runs(a.dtype, b.dtype, out_dtype):
        return _scaled_mm_reference(a, a_inv, b, b_inv, out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _scaled_mm_reference(a: Tensor, a_inv: Tensor, b: Tensor, b_inv: Tensor, out_dtype: torch.dtype) -> Tensor:
    """PyTorch's own CPU FP8 GEMM without oneDNN, op for op: scale each operand in fp32, an fp32 matmul, one
    rounding to the output dtype."""
    return torch.matmul(a.float() * a_inv, b.float() * b_inv).to(out_dtype)


# (a dtype, b dtype, out dtype) -> whether torch._scaled_mm runs on this CPU (cpu_scaled_mm_runs)
_CPU_SCALED_MM: dict[tuple[torch.dtype, torch.dtype, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result  # compiled code calls it once, eagerly, and keeps the answer
def cpu_scaled_mm_runs(a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether torch._scaled_mm of these dtypes runs on this CPU: PyTorch sends it to oneDNN by the CPU's flags
    (AMX), and oneDNN held to fewer instructions refuses it (model/cpu_probe.py). Tried once per process on
    16 x 16 operands laid out as the real calls lay them out; where refused, `_scaled_mm_reference` runs."""
    key = (a_dtype, b_dtype, out_dtype)
    if key not in _CPU_SCALED_MM:
        one = torch.ones((), dtype=torch.float32)
        a, b = torch.zeros(16, 16).to(a_dtype), _column_major(torch.zeros(16, 16).to(b_dtype))
        ok, why = op_runs(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=out_dtype))
        if not ok:
            notice_once(f"FP8 on this CPU: oneDNN refuses torch._scaled_mm ({why}); using PyTorch's reference "
                        "FP8 GEMM (fp32 math) instead")
        _CPU_SCALED_MM[key] = ok
    return _CPU_SCALED_MM[key]


# `--fp8_recipe`: our tensorwise GEMMs, or torchao's float8 training of the block Linears (its recipe names)
TORCHAO_RECIPES = {"torchao_tensorwise": "tensorwise", "torchao_rowwise": "rowwise"}
RECIPE_CHOICES = ("tensorwise", *TORCHAO_RECIPES)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPE_CHOICES:
        raise ValueError(f"--fp8_recipe {recipe!r}: choose one of {', '.join(RECIPE_CHOICES)}")


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


def check_scaling_mode(mode: str) -> str:
    """`--fp8_scaling`: delayed, or dynamic (every tensor from its own amax); train/resolve.py decides auto."""
    if mode not in SCALING_CHOICES:
        raise ValueError(f"--fp8_scaling {mode!r}: choose one of {', '.join(SCALING_CHOICES)} "
                         "(train/resolve.py decides auto)")
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
        # Set by share_input_history: whose x_amax this layer's input uses, and whether it records it.
        # Plain attributes (not submodules): the module tree, state_dict and to_empty stay as they were.
        object.__setattr__(self, "_input_owner", None)
        self.records_input = True

    @property
    def input_scaling(self) -> "DelayedScaling":
        """The state whose `x_amax` scales this layer's input: its own, or the owner of a shared history."""
        return self if self._input_owner is None else self._input_owner

    def histories(self) -> tuple[Tensor, ...]:
        """The amax buffers this layer scales from once active: each must hold a recorded (positive) amax."""
        return self.input_scaling.x_amax, self.grad_amax

    def reset(self) -> None:
        with torch.no_grad():
            self.x_amax.zero_()
            self.grad_amax.zero_()
        self.active = False


def attach_delayed_scaling(blocks: nn.Module) -> None:
    """Give every Linear inside `blocks` a DelayedScaling, as `layer.fp8_scaling` (its `fp8_linear` uses it)."""
    for module in list(blocks.modules()):
        if isinstance(module, nn.Linear) and not hasattr(module, "fp8_scaling"):
            module.fp8_scaling = DelayedScaling().to(module.weight.device)


def share_input_history(*layers: nn.Linear) -> None:
    """Layers that read the same input tensor (a block's q, k and v) scale it from one history.

    Their histories would hold the same amax anyway (same tensor), but as three buffers they make three
    casts of the tensor that torch.compile cannot tell apart: the compiled block then computed three e4m3
    copies of the normed x and kept two of them for backward, where dynamic scaling's three identical
    casts were one (docs/perf-log/2026-11-24.md, "... delayed scaling, explained and fixed"). With one history
    the casts are one expression, computed and kept once. Pass the layers in the order the forward calls
    them: the first owns the history, the last records the new amax, so every cast of the micro-step reads the
    previous micro-step's value.
    """
    owner = layers[0].fp8_scaling
    for layer in layers:
        object.__setattr__(layer.fp8_scaling, "_input_owner", None if layer.fp8_scaling is owner else owner)
        layer.fp8_scaling.records_input = layer is layers[-1]


def delayed_scalings(model: nn.Module) -> list[DelayedScaling]:
    return [m for m in model.modules() if isinstance(m, DelayedScaling)]


def start_delayed_scaling(model: nn.Module) -> bool:
    """Switch every layer to delayed scaling once all of them have a positive amax history.

    Called after each optimizer step. Returns True when delayed scaling is (now) on. Costs one host sync
    per call until the switch, none after it.
    """
    scalings = delayed_scalings(model)
    if not scalings:
        return False
    if all(s.active for s in scalings):
        return True
    history = torch.stack([a for s in scalings for a in s.histories()])
    if not bool((history > 0).all()):
        return False
    for s in scalings:
        s.active = True
    return True


def scaling_state(model: nn.Module) -> Tensor | None:
    """The delayed-scaling state as one float32 vector (x_amax, grad_amax, active per layer), or None.

    The buffers are not in the model's state_dict (nanochat's keys stay as they are), so a checkpoint
    carries this instead: a resumed run then scales its first step as the uninterrupted run would,
    rather than starting over dynamically (another step's numerics, and one more compilation).
    """
    scalings = delayed_scalings(model)
    if not scalings:
        return None
    return torch.stack([v for s in scalings for v in (
        s.x_amax.float(), s.grad_amax.float(), s.x_amax.new_tensor(float(s.active)))])


def load_scaling_state(model: nn.Module, values: list[float]) -> bool:
    """Restore `scaling_state`'s values; False (nothing changed) when the model's layers differ."""
    scalings = delayed_scalings(model)
    if len(values) != 3 * len(scalings) or not scalings:
        return False
    with torch.no_grad():
        for i, s in enumerate(scalings):
            s.x_amax.fill_(values[3 * i])
            s.grad_amax.fill_(values[3 * i + 1])
    for i, s in enumerate(scalings):
        # a history that holds no amax (another scaling's state, resumed with --force) scales nothing: the
        # layer records one first
        s.active = bool(values[3 * i + 2]) and all(float(a) > 0 for a in s.histories())
    return True


# -----------------------------------------------------------------------------
# The three GEMMs of a Linear


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W.T with all three GEMMs in FP8. x: (M, K) in the compute dtype, W: (N, K) parameter.

    `x_scale_amax` is the amax that sets x's scale (x's own, or the history's). `grad_amax` (a
    DelayedScaling buffer, or None) is the output gradient's amax history: read for the scale when
    `delayed`, overwritten with this backward's amax either way. Fast accumulation in the forward GEMM
    only: the backward's GEMMs keep full accumulation (nanochat's FP8 does the same).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, x_scale_amax: Tensor, grad_amax: Tensor | None,
                delayed: bool, w8: Tensor | None = None, w_inv: Tensor | None = None,
                w8_cm: Tensor | None = None) -> Tensor:
        # cuBLAS's FP8 GEMM takes only row-major first operands: quantizing keeps the input's layout
        x = x.contiguous()
        x8, x_inv = quantize_with_amax(x, x_scale_amax, E4M3)
        if w8 is None:
            # The weights change every optimizer step (and c_proj starts at zero): always their own amax.
            w8, w_inv = quantize_tensorwise(weight, E4M3)
        # W8 (N, K) row-major, so W8.t() is (K, N) column-major: no copy
        y = _scaled_mm(x8, x_inv, w8.t(), w_inv, x.dtype, fast_accum=True)
        # the backward's GEMMs read the FP8 copies: 1 byte per element instead of x's 2; dX reads W8
        # column-major, cached (`WeightCache`) or made in backward
        ctx.w_column_major = w8_cm is not None
        ctx.save_for_backward(x8, w8 if w8_cm is None else w8_cm, x_inv, w_inv,
                              *(() if grad_amax is None else (grad_amax,)))
        ctx.weight_dtype = weight.dtype
        ctx.delayed = delayed
        ctx.has_history = grad_amax is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        saved = ctx.saved_tensors  # indexed, not popped: Dynamo traces list.pop on it as a tuple method
        x8, w8, x_inv, w_inv = saved[0], saved[1], saved[2], saved[3]
        w8_cm = w8 if ctx.w_column_major else _column_major(w8)
        history = saved[4] if ctx.has_history else None
        grad_y = grad_y.contiguous()
        if ctx.delayed:
            g8, g_inv = quantize_with_amax(grad_y, history * MARGIN, E5M2)
            history.copy_(row_first_amax(grad_y))  # the next micro-step's scale
        else:
            amax = tensor_amax(grad_y)
            g8, g_inv = quantize_with_amax(grad_y, amax, E5M2)
            if history is not None:
                history.copy_(amax)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _scaled_mm(g8, g_inv, w8_cm, w_inv, grad_y.dtype, fast_accum=False)
        if ctx.needs_input_grad[1]:
            # dW = dy.T @ x, straight into the parameter's dtype (fp32 master weights: no bf16 rounding)
            grad_w = _scaled_mm(g8.t().contiguous(), g_inv, _column_major(x8), x_inv, ctx.weight_dtype,
                                fast_accum=False)
        return grad_x, grad_w, None, None, None, None, None, None


def trains_in_fp8(x: Tensor, weight: Tensor, training: bool | None) -> bool:
    """Whether a Linear's forward is a training one, which runs in FP8: something in it is trained, and the
    module is in train mode (`training`), or, for a bare weight (None), autograd records the call.

    The module's mode, not autograd's, decides where it is known: a checkpointer that runs the training forward
    without autograd and re-runs it with autograd in backward (Unsloth's offloaded checkpointing, `--memory
    lean`) must quantise the first run as the second, or the loss comes from bf16 GEMMs and the gradients from
    FP8 ones. Evaluation and sampling run in eval mode, or in inference mode, and take nanochat's bf16 math
    (inference mode is checked eagerly only: Dynamo cannot trace the check, and compiled code never samples)."""
    if not (x.requires_grad or weight.requires_grad):
        return False
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        return False
    return torch.is_grad_enabled() if training is None else training


def fp8_matmul(x: Tensor, weight: Tensor, scaling: DelayedScaling | None = None,
               training: bool | None = None, cache: "WeightCache | None" = None) -> Tensor:
    """`F.linear(x, weight)` (no bias) with its GEMMs in FP8 in a training forward (`trains_in_fp8`); plain
    `F.linear` otherwise.

    With a `scaling` state the layer records its amaxes, and scales from them once the state is active. With
    an active `cache` the GEMMs read its copies of the quantised weight instead of quantising `weight` again.
    """
    if not trains_in_fp8(x, weight, training):
        return F.linear(x, weight)  # evaluation and sampling: nanochat's bf16 math
    x2d = x.reshape(-1, x.size(-1)).to(compute_dtype(x))
    delayed = scaling is not None and scaling.active
    if delayed:
        x_scale_amax = scaling.input_scaling.x_amax * MARGIN
        new_x_amax = row_first_amax(x2d)  # the next micro-step's scale
    else:
        x_scale_amax = new_x_amax = tensor_amax(x2d)
    cached = (cache.w8, cache.inv_scale, cache.w8_cm) if cache is not None and cache.active else ()
    y = _Fp8Matmul.apply(x2d, weight, x_scale_amax, None if scaling is None else scaling.grad_amax, delayed, *cached)
    if scaling is not None and scaling.records_input:
        with torch.no_grad():
            scaling.input_scaling.x_amax.copy_(new_x_amax)
    return y.view(*x.shape[:-1], weight.size(0))


def fp8_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """The kernel seam's `linear` with FP8 GEMMs: `layer`'s weight, delayed scaling, weight cache and mode."""
    return fp8_matmul(x, layer.weight, getattr(layer, "fp8_scaling", None), layer.training,
                      getattr(layer, "fp8_weight_cache", None))


# -----------------------------------------------------------------------------
# The weights' FP8 copies, once per optimizer step
#
# A weight changes only at the optimizer step, but every micro-step quantises it again: in the forward (a read
# of the fp32 weight for its amax, another for the cast) and, where the compiler's partitioner recomputes the
# cast rather than keep its result, in the backward too, plus the column-major copy dX reads. With
# `--fp8_weight_cache` the training step quantises every block weight once, before its first micro-step, into
# tensors the blocks read (the same function on the same weight, though eager: Inductor's in-graph cast may
# round a few elements differently), and switches the copies off when it ends, so nothing outside a step's
# micro-steps (evaluation, tests, a benchmark's own forward) can read a copy older than its weight. The price is
# 2 bytes per block parameter, held for the whole run.


class WeightCache:
    """One Linear's weight in e4m3 for the current optimizer step: `w8` row-major (the forward's operand), its
    column-major copy `w8_cm` (dX's), `inv_scale`. A plain object, not a module: it stays out of the
    state_dict, the buffers DDP broadcasts and `model.to`. The tensors are allocated once and rewritten in
    place, so compiled code and CUDA graphs keep reading the same storage."""

    def __init__(self):
        self.w8: Tensor | None = None
        self.w8_cm: Tensor | None = None
        self.inv_scale: Tensor | None = None
        self.active = False


def attach_weight_cache(blocks: nn.Module) -> None:
    """Give every Linear inside `blocks` a WeightCache, as `layer.fp8_weight_cache` (`fp8_linear` reads it)."""
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            module.fp8_weight_cache = WeightCache()


def _weight_caches(model: nn.Module) -> list[tuple[nn.Linear, WeightCache]]:
    return [(m, m.fp8_weight_cache) for m in model.modules() if getattr(m, "fp8_weight_cache", None) is not None]


@torch.no_grad()
def cache_weights(model: nn.Module) -> None:
    """Quantise every cached Linear's weight as it is now, and switch its copies on. A weight that is a tensor
    subclass (FSDP2's DTensor, a shard between forwards) is left to quantise itself in its forward, where it is
    whole."""
    for layer, cache in _weight_caches(model):
        weight = layer.weight
        if type(weight) not in (Tensor, nn.Parameter):
            cache.active = False
            continue
        w8, inv = quantize_tensorwise(weight, E4M3)
        if cache.w8 is None or cache.w8.shape != w8.shape or cache.w8.device != w8.device:
            cache.w8 = torch.empty_like(w8)
            cache.w8_cm = _column_major(torch.empty_like(w8))
            cache.inv_scale = torch.empty_like(inv)
            for t in (cache.w8, cache.w8_cm, cache.inv_scale):
                torch._dynamo.mark_static_address(t)  # CUDA graphs read them in place, without a copy
        cache.w8.copy_(w8)
        cache.w8_cm.copy_(w8)  # into the column-major storage: the transposed copy
        cache.inv_scale.copy_(inv)
        cache.active = True


def drop_weight_cache(model: nn.Module) -> None:
    """Switch every copy off (the weights are about to change, or the step ended); the storage is kept."""
    for _, cache in _weight_caches(model):
        cache.active = False


# -----------------------------------------------------------------------------
# The converter


def convert_to_fp8(model: nn.Module, scaling: str = "dynamic", recipe: str = "tensorwise",
                   weight_cache: bool = False) -> nn.Module:
    """`--fp8`: the model with its block Linears' GEMMs in FP8 (ours, or torchao's for its `recipe`), or
    unchanged (and a notice) where FP8 cannot run fast. `weight_cache`: our recipe's block Linears get a
    WeightCache (`--fp8_weight_cache`), filled by the training step.

    `scaling="delayed"` attaches delayed-scaling state, only where a block's forward is not
    re-run in backward (not in checkpointed blocks, nor the MLP of selective ones): the
    re-run would quantise with a newer scale than the one it replays. Call it after `init_weights`.
    """
    check_scaling_mode(scaling)
    check_recipe(recipe)
    ok, why = fp8_supported(model.get_device())
    if not ok:
        notice_once(f"--fp8: {why}; training in bf16")
        return model
    if recipe in TORCHAO_RECIPES:
        return _convert_with_torchao(model, TORCHAO_RECIPES[recipe])
    set_linear(model, fp8_linear)
    if weight_cache:
        attach_weight_cache(model.transformer.h)
    if scaling == "delayed":
        for block, mode in zip(model.transformer.h, model.block_memory):
            if mode != "lean":
                attach_delayed_scaling(block if mode == "fast" else block.attn)
                share_input_history(block.attn.c_q, block.attn.c_k, block.attn.c_v)  # one normed x
    return model


def _torchao_linear(x: Tensor, layer: nn.Module) -> Tensor:
    """torchao's Float8Linear in a training forward (`trains_in_fp8`); nanochat's bf16 `F.linear` otherwise."""
    if trains_in_fp8(x, layer.weight, layer.training):
        return layer(x)
    return F.linear(x, layer.weight)


def _convert_with_torchao(model: nn.Module, recipe_name: str) -> nn.Module:
    """The block Linears as torchao's Float8Linear (`torchao.float8`, its named recipe), lm_head kept bf16."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ValueError("--fp8_recipe torchao_*: needs torchao (pip install torchao)") from None
    config = Float8LinearConfig.from_recipe_name(recipe_name)
    convert_to_float8_training(model.transformer.h, config=config)
    set_linear(model, _torchao_linear)
    return model


def set_linear(model: nn.Module, linear) -> None:
    """Give the model and every module that shares its kernel set the set with `linear` replaced."""
    ops = dataclasses.replace(model.ops, linear=linear, fp8=linear in (fp8_linear, _torchao_linear))
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
