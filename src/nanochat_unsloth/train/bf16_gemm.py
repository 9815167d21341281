"""bf16 GEMMs whose speed does not depend on the CPU's bf16 support.

A bf16 GEMM (a GPU's tensor cores, or a CPU with AVX-512-BF16 / AMX) takes bf16 inputs, accumulates in
fp32 and rounds the result to bf16. A CPU without bf16 instructions gets the same function from oneDNN's
emulation, many times slower than an fp32 GEMM of the same size (docs/perf-log/2026-11-28.md, "CPU: bf16
GEMMs on CPUs without bf16 instructions"), which made Muon's Newton-Schulz the whole cost of a CPU training
step.

Two implementations of the same arithmetic, behind one small interface (`round`, `mm`):

    native    tensors are bf16; `mm` is torch's bf16 matmul. The GPU path, and CPUs with fast bf16.
    emulated  tensors are fp32 holding bf16 values; `mm` is an fp32 matmul of those values, rounded to
              bf16. Exactly representable inputs, fp32 accumulation, one rounding: a bf16 GEMM up to the
              order of its fp32 accumulation, at fp32 speed.

Code written against the interface (Newton-Schulz in optim.py) runs unchanged on either. A run sets once
which one its CPU uses (`configure_cpu_bf16`); CUDA tensors always take the native path. `--cpu_bf16 auto`
(decided in train/resolve.py from model/cpu_probe.py's probes) is native only on a CPU with bf16
instructions (AVX-512-BF16 or AMX) where a bf16 matmul runs at all (oneDNN held to fewer instructions than
the CPU lists, e.g. by ONEDNN_MAX_CPU_ISA, may refuse it) and a timed probe also finds it fast. Every other
CPU emulates without timing anything: a timing alone flipped between processes under load on an AVX-512
CPU whose bf16 is only a few times slower, and processes of one run that disagree compute slightly
different updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import cpu_probe

CHOICES = ("native", "emulated")


@dataclass(frozen=True)
class Bf16Math:
    """How bf16 arithmetic is carried out: `round(x)` holds x's values rounded to bf16, `mm(a, b)` is a
    bf16 GEMM of two such tensors. Elementwise math between them is plain torch arithmetic, followed by
    `round` where a bf16 program would store a bf16 result."""

    name: str
    round: Callable[[Tensor], Tensor]
    mm: Callable[[Tensor, Tensor], Tensor]


def _round_native(x: Tensor) -> Tensor:
    return x.bfloat16()


def _round_emulated(x: Tensor) -> Tensor:
    return x.bfloat16().float()


NATIVE = Bf16Math("native", _round_native, torch.matmul)
EMULATED = Bf16Math("emulated", _round_emulated, lambda a, b: _round_emulated(torch.matmul(a, b)))

_cpu_choice: Bf16Math | None = None


def configure_cpu_bf16(choice: str) -> Bf16Math:
    """Set, once per process, how CPU tensors run bf16 GEMMs: `native` or `emulated` (train/resolve.py decides
    `--cpu_bf16 auto`). A CPU whose oneDNN refuses bf16 matmuls is refused `native` in one line."""
    global _cpu_choice
    if choice not in CHOICES:
        raise ValueError(f"--cpu_bf16 {choice!r} is not one of: {', '.join(CHOICES)} "
                         "(train/resolve.py decides auto)")
    if choice == "native" and (why := cpu_probe.bf16_refusal()) is not None:
        raise UserError(f"--cpu_bf16 native: this CPU's oneDNN refuses bf16 matmuls ({why}); "
                        "use --cpu_bf16 auto or emulated")
    _cpu_choice = NATIVE if choice == "native" else EMULATED
    return _cpu_choice


def cpu_math() -> Bf16Math:
    """This process's choice for CPU tensors: a run's resolved --cpu_bf16 (`configure_cpu_bf16`); in a process
    that set none (library code, tests), `auto`'s, decided on first use, as a run here would decide it."""
    if _cpu_choice is None:
        from nanochat_unsloth.train.resolve import cpu_bf16_for  # the rule's one home

        configure_cpu_bf16(cpu_bf16_for("auto", "cpu"))
    return _cpu_choice


def math_for(t: Tensor) -> Bf16Math:
    """The implementation for tensors on t's device: CUDA (and every other accelerator) is native."""
    return cpu_math() if t.device.type == "cpu" else NATIVE
