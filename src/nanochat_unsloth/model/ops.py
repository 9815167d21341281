"""The kernel interface: the few ops the model's speed depends on, and the torch reference for each.

`GPT` never calls `F.rms_norm`, `scaled_dot_product_attention` or `cross_entropy` itself; it calls
`self.ops.<op>`. A faster implementation provides the same five callables with the same math, and the
model file stays untouched:

    linear(x, layer)                                   x @ layer.weight.T (no bias): every block GEMM
    rms_norm(x)                                        weightless RMSNorm over the last dim
    rotary_norm(x, cos, sin)                           rms_norm(rotary(x)): q's and k's prologue;
                                                       x: (B, T, H, D); cos/sin: (1, T, 1, D/2) bf16
    attention(q, k, v, enable_gqa)                     q: (B, H, T, D), k/v: (B, Hkv, T, D); causal
    lm_head_loss(x, weight, targets, softcap, reduction)
                                                       fp32 cross-entropy of softcapped logits,
                                                       ignore_index=-1; reduction mean|sum|none (flat)

The sets themselves (`torch`, `fused`) are named and chosen in `build.py`; `fp8.py` swaps `linear`;
`rotary_norm.py` holds the fused set's prologue kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -1


@dataclass(frozen=True)
class Kernels:
    name: str
    linear: Callable[[Tensor, nn.Linear], Tensor]
    rms_norm: Callable[[Tensor], Tensor]
    rotary_norm: Callable[[Tensor, Tensor, Tensor], Tensor]
    attention: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    lm_head_loss: Callable[[Tensor, Tensor, Tensor, float, str], Tensor]
    fp8: bool = False  # block GEMMs in FP8 (`linear` is fp8.fp8_linear)

    @property
    def label(self) -> str:
        return self.name + ("+fp8" if self.fp8 else "")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs of an op on x run in: the autocast dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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


def torch_rotary_norm(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # rotary first, then QK norm (nanochat's order)
    return torch_rms_norm(torch_apply_rotary(x, cos, sin))


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
    rotary_norm=torch_rotary_norm,
    attention=torch_attention,
    lm_head_loss=torch_lm_head_loss,
)
