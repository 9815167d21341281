"""The kernel seam: the few ops the model's speed depends on, behind one small dataclass.

`GPT` never calls `F.rms_norm`, `scaled_dot_product_attention` or `cross_entropy` itself; it calls
`self.ops.<op>`. A faster implementation (Unsloth's fused Triton kernels) only has to provide the same
four callables with the same math, and the model file stays untouched.

    rms_norm(x)                                        weightless RMSNorm over the last dim
    apply_rotary(x, cos, sin)                          x: (B, T, H, D); cos/sin: (1, T, 1, D/2) bf16
    attention(q, k, v, enable_gqa)                     q: (B, H, T, D), k/v: (B, Hkv, T, D); causal
    lm_head_loss(x, weight, targets, softcap, reduction)
                                                       fp32 cross-entropy of softcapped logits,
                                                       ignore_index=-1; reduction mean|sum|none (flat)

"torch" is the reference, on CPU and GPU. "unsloth" is wired in by a later change; until then, and
whenever CUDA or the packages are missing, it falls back to "torch" with a one-line notice.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_CHOICES = ("torch", "unsloth")


@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable[[Tensor], Tensor]
    apply_rotary: Callable[[Tensor, Tensor, Tensor], Tensor]
    attention: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    lm_head_loss: Callable[[Tensor, Tensor, Tensor, float, str], Tensor]


# -----------------------------------------------------------------------------
# The torch reference: nanochat b399e43's math, op for op


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
                           ignore_index=-1, reduction=reduction)


TORCH_KERNELS = Kernels(
    name="torch",
    rms_norm=torch_rms_norm,
    apply_rotary=torch_apply_rotary,
    attention=torch_attention,
    lm_head_loss=torch_lm_head_loss,
)


# -----------------------------------------------------------------------------
# Choosing an implementation


def get_kernels(name: str = "torch") -> Kernels:
    """The implementation behind `--kernels NAME`."""
    if name == "torch":
        return TORCH_KERNELS
    if name == "unsloth":
        try:
            return _unsloth_kernels()
        except (ImportError, NotImplementedError) as e:
            _notice_once(f"--kernels unsloth: {e}; falling back to --kernels torch")
            return TORCH_KERNELS
    raise ValueError(f"--kernels {name!r} is not a kernel set; choose one of: {', '.join(KERNEL_CHOICES)}")


def _unsloth_kernels() -> Kernels:
    """Placeholder for the Unsloth kernel set (a later change fills it in).

    Raises ImportError when it cannot work here (no CUDA, `unsloth_zoo` missing) and NotImplementedError
    while the kernels are not wired in; `get_kernels` turns both into a fallback to torch.
    """
    if not torch.cuda.is_available():
        raise ImportError("the unsloth kernels need a CUDA GPU and none is available")
    try:
        import unsloth_zoo  # noqa: F401  (imported lazily: heavy, GPU-only, and optional)
    except ImportError as e:
        raise ImportError(f"unsloth_zoo is not importable ({e}); pip install 'nanochat-unsloth[gpu]'") from e
    raise NotImplementedError("the unsloth kernels are not wired in yet")


_NOTICES_SHOWN: set[str] = set()


def _notice_once(message: str) -> None:
    # One line per process and message; only the main rank speaks (RANK is set by torchrun / accelerate).
    if message in _NOTICES_SHOWN:
        return
    _NOTICES_SHOWN.add(message)
    if os.environ.get("RANK", "0") == "0":
        print(f"notice: {message}", file=sys.stderr, flush=True)
