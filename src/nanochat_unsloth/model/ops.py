"""The kernel seam: the few ops the model's speed depends on, behind one small dataclass.

`GPT` never calls `F.rms_norm`, `scaled_dot_product_attention` or `cross_entropy` itself; it calls
`self.ops.<op>`. A faster implementation only has to provide the same five callables with the same
math, and the model file stays untouched.

    linear(x, layer)                                   x @ layer.weight.T (no bias): every block GEMM
    rms_norm(x)                                        weightless RMSNorm over the last dim
    apply_rotary(x, cos, sin)                          x: (B, T, H, D); cos/sin: (1, T, 1, D/2) bf16
    attention(q, k, v, enable_gqa)                     q: (B, H, T, D), k/v: (B, Hkv, T, D); causal
    lm_head_loss(x, weight, targets, softcap, reduction)
                                                       fp32 cross-entropy of softcapped logits,
                                                       ignore_index=-1; reduction mean|sum|none (flat)

Two sets:

- "torch": nanochat's math op for op, on CPU and GPU (the reference; the model is compiled whole).
- "unsloth": the GPU set. What differs is the loss: lm_head + softcap + cross-entropy fused and
  chunked over rows, so the `[tokens, vocab]` logits (8.6 GB bf16 + 17 GB fp32 at B=32, d20) never
  exist, and the gradients of x and W are computed during the forward. Two implementations:
  `unsloth_zoo`'s `unsloth_fused_ce_loss` ("zoo") and our own `chunked_lm_head_loss` ("chunked"; the
  default, see docs/PERF.md for the measurement that chose it). Norms, rotary and attention stay
  torch ops: under torch.compile Inductor fuses rotary with the QK norm, which separate Unsloth
  kernels could not. The training code compiles this set block by block (`memory.compile_for_training`).
  It needs CUDA and `unsloth_zoo` installed; without either it falls back to "torch" with a one-line
  notice.

Either set can take `fp8=True` (`--fp8`): `linear` then runs the three GEMMs of every block Linear
in FP8 (`fp8.py`); lm_head and the loss stay as they are. It needs CUDA with compute capability 8.9+;
elsewhere it falls back to bf16 with a one-line notice.

Knobs for benchmarking the variants (environment, read when the set is built):
    NANOCHAT_UNSLOTH_LOSS=chunked|zoo      which fused loss the "unsloth" set uses
    NANOCHAT_LOSS_CHUNK_MB=2048            logits bytes per chunk (bf16 logits + their gradient)

Importing anything from Unsloth goes through `import_unsloth_module`, which restores the global
torch.compile settings (dynamo / inductor config) that Unsloth's imports rewrite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNEL_CHOICES = ("torch", "unsloth")
LOSS_CHOICES = ("chunked", "zoo")
IGNORE_INDEX = -1


@dataclass(frozen=True)
class Kernels:
    name: str
    linear: Callable[[Tensor, nn.Linear], Tensor]
    rms_norm: Callable[[Tensor], Tensor]
    apply_rotary: Callable[[Tensor, Tensor, Tensor], Tensor]
    attention: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    lm_head_loss: Callable[[Tensor, Tensor, Tensor, float, str], Tensor]
    loss_impl: str = "torch"  # which lm_head_loss: torch | chunked | zoo (for logs and benchmarks)
    fp8: bool = False  # block GEMMs in FP8 (`linear` is fp8.fp8_linear)

    @property
    def label(self) -> str:
        return self.name + ("+fp8" if self.fp8 else "")


# -----------------------------------------------------------------------------
# The torch reference: nanochat b399e43's math, op for op


def torch_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    return F.linear(x, layer.weight)


def torch_rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def torch_apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate the pair (first half, second half) of the head dim; nanochat's sign convention.
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    # The tables are bf16; mixing them with e.g. fp16 would promote, so hand back x's own dtype.
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def torch_attention(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool = False) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)


def softcapped_logits(x: Tensor, weight: Tensor, softcap: float) -> Tensor:
    """logits = softcap * tanh(x @ W.T / softcap), in x's (autocast) dtype: the inference path."""
    logits = F.linear(x, weight)
    return softcap * torch.tanh(logits / softcap)


def torch_lm_head_loss(x: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                       reduction: str = "mean") -> Tensor:
    logits = softcapped_logits(x, weight, softcap).float()  # the loss itself in fp32
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


TORCH_KERNELS = Kernels(
    name="torch",
    linear=torch_linear,
    rms_norm=torch_rms_norm,
    apply_rotary=torch_apply_rotary,
    attention=torch_attention,
    lm_head_loss=torch_lm_head_loss,
)


# -----------------------------------------------------------------------------
# Our fused, chunked lm_head + softcap + cross-entropy
#
# Per chunk of R rows: z = h @ W.T (bf16 GEMM, as nanochat's lm_head), then one compiled elementwise/
# reduction pass computes the fp32 softcap, the log-sum-exp, the per-row loss and dz = dL/dz in bf16;
# two more GEMMs turn dz into dL/dh (rows of a preallocated buffer) and dL/dW (accumulated in place).
# The same three GEMMs as the unfused loss, but the logits are read ~3 times and written once per
# chunk instead of materialised in bf16 and fp32 with a saved log-softmax: less memory traffic and
# only one chunk of logits alive. Backward only scales the saved gradients by the incoming grad.


def _upcast(z: Tensor) -> Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 math (fp64 stays fp64, for tests)


def _ce_chunk_grad(z: Tensor, targets: Tensor, softcap: float, grad_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of the CE losses of the chunk's valid rows, and dz = d(grad_scale * sum)/dz in z's dtype."""
    s = softcap * torch.tanh(_upcast(z) / softcap)
    lse = torch.logsumexp(s, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    s_target = s.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss_sum = torch.where(valid, lse - s_target, torch.zeros_like(lse)).sum()
    # dL/ds = softmax(s) - onehot(target); ds/dz = 1 - tanh^2 = 1 - (s / softcap)^2
    p = torch.exp(s - lse.unsqueeze(1))
    onehot = torch.arange(s.size(1), device=s.device).unsqueeze(0) == safe.unsqueeze(1)
    row_scale = torch.where(valid, grad_scale, torch.zeros_like(grad_scale)).unsqueeze(1)
    dz = (p - onehot.to(p.dtype)) * row_scale * (1.0 - (s / softcap) ** 2)
    return loss_sum, dz.to(z.dtype)


def _ce_chunk_losses(z: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Per-row fp32 CE losses of the chunk (0 where ignored): the no-grad / reduction="none" path."""
    s = softcap * torch.tanh(_upcast(z) / softcap)
    lse = torch.logsumexp(s, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    s_target = s.gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - s_target, torch.zeros_like(lse))


_COMPILED: dict[str, Callable] = {}


def _chunk_fn(name: str, fn: Callable, device: torch.device) -> Callable:
    # Compiled on CUDA only (CPU runs need no compiler toolchain); one graph per chunk shape.
    if device.type != "cuda":
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def loss_chunk_rows(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk: bf16 logits and their bf16 gradient together near NANOCHAT_LOSS_CHUNK_MB (2 GiB),
    split evenly so that all chunks (but at most the last) have one shape."""
    budget = int(float(os.environ.get("NANOCHAT_LOSS_CHUNK_MB", "2048")) * 2**20)
    rows = max(1, budget // (4 * vocab_size))
    n_chunks = -(-n_rows // rows)
    return -(-n_rows // n_chunks)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs of an op on x run in: the autocast dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, softcap: float, reduction: str) -> Tensor:
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
            chunk_grad = _chunk_fn("grad", _ce_chunk_grad, device)
            rows = loss_chunk_rows(n, w.size(0))
            for i, a in enumerate(range(0, n, rows)):
                b = min(a + rows, n)
                hc = h[a:b]
                z = torch.mm(hc, w.t())
                loss_sum, dz = chunk_grad(z, t[a:b], softcap, scale)
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
        return dx, dw, None, None, None


def _chunked_token_losses(x: Tensor, weight: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Flat fp32 per-token losses without building all logits (no autograd)."""
    dtype = compute_dtype(x)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        h = x.reshape(-1, x.size(-1)).to(dtype)
        t = targets.reshape(-1)
        w = weight.to(dtype)
        out = torch.empty(h.size(0), dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        chunk_losses = _chunk_fn("losses", _ce_chunk_losses, x.device)
        rows = loss_chunk_rows(h.size(0), w.size(0))
        for a in range(0, h.size(0), rows):
            b = min(a + rows, h.size(0))
            out[a:b] = chunk_losses(torch.mm(h[a:b], w.t()), t[a:b], softcap)
    return out


@torch.compiler.disable  # an opaque region under whole-model compile; it compiles its own chunk kernel
def chunked_lm_head_loss(x: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                         reduction: str = "mean") -> Tensor:
    """Same contract as `torch_lm_head_loss`, one chunk of logits at a time."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean|sum|none, not {reduction!r}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if reduction == "none" or not needs_grad:
        losses = _chunked_token_losses(x, weight, targets, softcap)
        if reduction == "none":
            return losses
        total = losses.sum()
        if reduction == "sum":
            return total
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return _ChunkedLMHeadLoss.apply(x, weight, targets, softcap, reduction)


# -----------------------------------------------------------------------------
# Unsloth's fused loss (unsloth_zoo, AGPL-3.0: an optional extra)


def _zoo_lm_head_loss(x: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                      reduction: str = "mean") -> Tensor:
    if reduction == "none" or not torch.is_grad_enabled():
        return chunked_lm_head_loss(x, weight, targets, softcap, reduction)
    ce = import_unsloth_module("unsloth_zoo.fused_losses.cross_entropy_loss")
    # shift_labels=False: our targets are already the next tokens; ignore_index=-1 is nanochat's
    n_items = None if reduction == "mean" else torch.ones((), device=x.device)
    return ce.unsloth_fused_ce_loss(None, x, weight, None, targets, n_items=n_items, shift_labels=False,
                                    ignore_index=IGNORE_INDEX, logit_softcapping=softcap)


# -----------------------------------------------------------------------------
# Importing Unsloth without its global side effects


@contextlib.contextmanager
def _keep_torch_compile_settings():
    """Undo what Unsloth's imports do to process-wide torch.compile settings and allocator env vars."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    saved = [(cfg, cfg.get_config_copy()) for cfg in (dynamo_config, inductor_config)]
    env_keys = [k for k in os.environ if k.startswith(("PYTORCH_", "TORCH", "CUDA_"))]
    saved_env = {k: os.environ.get(k) for k in env_keys}
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated keys warn when read
            for cfg, snapshot in saved:
                for key, value in snapshot.items():
                    try:
                        if getattr(cfg, key) != value:
                            setattr(cfg, key, value)
                    except Exception:  # a read-only or removed key: leave it
                        pass
        for k in [k for k in os.environ if k.startswith(("PYTORCH_", "TORCH", "CUDA_"))]:
            if k not in saved_env:
                del os.environ[k]
        for k, v in saved_env.items():
            if v is not None:
                os.environ[k] = v


def import_unsloth_module(name: str):
    """Import an `unsloth_zoo` / `unsloth` module, keeping torch.compile's global settings as they were."""
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("UNSLOTH_IS_PRESENT", "1")  # unsloth_zoo refuses to import without it
    with _keep_torch_compile_settings():
        return importlib.import_module(name)


# -----------------------------------------------------------------------------
# Choosing an implementation


def get_kernels(name: str = "torch", fp8: bool = False) -> Kernels:
    """The implementation behind `--kernels NAME` (and `--fp8`)."""
    if name == "torch":
        ops = TORCH_KERNELS
    elif name == "unsloth":
        try:
            ops = _unsloth_kernels()
        except (ImportError, NotImplementedError) as e:
            notice_once(f"--kernels unsloth: {e}; falling back to --kernels torch")
            ops = TORCH_KERNELS
    else:
        raise ValueError(f"--kernels {name!r} is not a kernel set; choose one of: {', '.join(KERNEL_CHOICES)}")
    return with_fp8(ops) if fp8 else ops


def with_fp8(ops: Kernels) -> Kernels:
    """`ops` with its block GEMMs in FP8, or `ops` unchanged (and a notice) where FP8 cannot run fast."""
    from nanochat_unsloth.model import fp8

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ok, why = fp8.fp8_supported(device)
    if not ok:
        notice_once(f"--fp8: {why}; training in bf16")
        return ops
    return fp8_kernels(ops)


def fp8_kernels(ops: Kernels) -> Kernels:
    """`ops` with `linear` in FP8, whatever the device."""
    from nanochat_unsloth.model import fp8

    return dataclasses.replace(ops, linear=fp8.fp8_linear, fp8=True)


def _unsloth_kernels() -> Kernels:
    """The GPU set. Raises ImportError when it cannot work here (no CUDA, `unsloth_zoo` missing)."""
    if not torch.cuda.is_available():
        raise ImportError("the unsloth kernels need a CUDA GPU and none is available")
    loss = os.environ.get("NANOCHAT_UNSLOTH_LOSS", "chunked")
    if loss not in LOSS_CHOICES:
        raise ValueError(f"NANOCHAT_UNSLOTH_LOSS={loss!r}: choose one of {', '.join(LOSS_CHOICES)}")
    try:
        if loss == "zoo":
            import_unsloth_module("unsloth_zoo.fused_losses.cross_entropy_loss")
        elif importlib.util.find_spec("unsloth_zoo") is None:
            raise ImportError("No module named 'unsloth_zoo'")
    except ImportError as e:
        raise ImportError(f"unsloth_zoo is not importable ({e}); pip install 'nanochat-unsloth[gpu]'") from e
    return Kernels(
        name="unsloth",
        linear=torch_linear,
        rms_norm=torch_rms_norm,
        apply_rotary=torch_apply_rotary,
        attention=torch_attention,
        lm_head_loss=_zoo_lm_head_loss if loss == "zoo" else chunked_lm_head_loss,
        loss_impl=loss,
    )


_NOTICES_SHOWN: set[str] = set()


def notice_once(message: str) -> None:
    # One fallback notice per process and message (used by kernels, memory and optim); only the main rank speaks (RANK is set by torchrun / accelerate).
    if message in _NOTICES_SHOWN:
        return
    _NOTICES_SHOWN.add(message)
    if os.environ.get("RANK", "0") == "0":
        print(f"notice: {message}", file=sys.stderr, flush=True)

