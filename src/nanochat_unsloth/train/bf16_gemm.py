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

Code written against the interface (Newton-Schulz in optim.py) runs unchanged on either. Each process
decides once which one its CPU should use (`--cpu_bf16 auto`); CUDA tensors always take the native path.
`auto` is native only on a CPU with bf16 instructions (AVX-512-BF16 or AMX) where a bf16 matmul runs at all
(oneDNN held to fewer instructions than the CPU lists, e.g. by ONEDNN_MAX_CPU_ISA, may refuse it:
model/cpu_probe.py) and a timed probe also finds it fast. Every other CPU emulates without timing anything:
a timing alone flipped between processes under load on an AVX-512 CPU whose bf16 is only a few times slower,
and processes of one run that disagree compute slightly different updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nanochat_unsloth.common import UserError
from nanochat_unsloth.model.cpu_probe import op_runs

CHOICES = ("auto", "native", "emulated")

# On a CPU with bf16 instructions `auto` still emulates when a bf16 matmul is this many times slower than
# an fp32 one: oneDNN then is not using them (bf16 instructions do twice the work of fp32 ones per cycle).
SLOW_BF16_FACTOR = 2.0
_PROBE_SIZE = 256


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
_cpu_probe: dict | None = None
_cpu_refusal: str | None = None  # oneDNN's words when it refused a bf16 matmul on this CPU


def bf16_matmul_runs() -> tuple[bool, str]:
    """Whether a bf16 matmul runs on this CPU at all (model/cpu_probe.py): (True, "") or (False, oneDNN's line)."""
    a = torch.ones(16, 16, dtype=torch.bfloat16)
    return op_runs(lambda: torch.matmul(a, a))


def probe_cpu_bf16(size: int = _PROBE_SIZE, repeats: int = 5) -> dict:
    """Time one size^3 matmul in bf16 and in fp32 on this CPU (best of `repeats` after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)

    def best_seconds(x: Tensor, y: Tensor) -> float:
        torch.matmul(x, y)  # warm-up: oneDNN builds its kernel on the first call
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(x, y)
            best = min(best, time.perf_counter() - t0)
        return best

    fp32_s = best_seconds(a, b)
    bf16_s = best_seconds(a.bfloat16(), b.bfloat16())
    flops = 2 * size**3
    return {"fp32_gflops": flops / fp32_s / 1e9, "bf16_gflops": flops / bf16_s / 1e9,
            "bf16_slowdown": bf16_s / fp32_s}


def cpu_has_bf16_instructions() -> bool:
    """AVX-512-BF16 or AMX tiles (x86); False where torch cannot tell (other architectures)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def configure_cpu_bf16(choice: str = "auto") -> Bf16Math:
    """Decide, once per process, how CPU tensors run bf16 GEMMs; returns the choice (see module doc)."""
    global _cpu_choice, _cpu_probe, _cpu_refusal
    if choice not in CHOICES:
        raise ValueError(f"--cpu_bf16 {choice!r} is not one of: {', '.join(CHOICES)}")
    _cpu_refusal = None
    if choice == "native" or (choice == "auto" and cpu_has_bf16_instructions()):
        ok, why = bf16_matmul_runs()
        _cpu_refusal = None if ok else why
        if not ok and choice == "native":
            raise UserError(f"--cpu_bf16 native: this CPU's oneDNN refuses bf16 matmuls ({why}); "
                            "use --cpu_bf16 auto or emulated")
    if choice == "auto":
        if not cpu_has_bf16_instructions() or _cpu_refusal is not None:
            _cpu_choice = EMULATED
            return _cpu_choice
        if _cpu_probe is None:
            _cpu_probe = probe_cpu_bf16()
        _cpu_choice = EMULATED if _cpu_probe["bf16_slowdown"] > SLOW_BF16_FACTOR else NATIVE
    else:
        _cpu_choice = NATIVE if choice == "native" else EMULATED
    return _cpu_choice


def cpu_bf16_summary() -> str:
    """One line for the run's log: the CPU's choice, and the probe's figures when it ran."""
    math = cpu_math()
    if _cpu_refusal is not None:
        return f"cpu bf16 GEMMs: {math.name} (oneDNN refuses bf16 matmuls here: {_cpu_refusal})"
    if _cpu_probe is None:
        why = "" if cpu_has_bf16_instructions() else " (no AVX-512-BF16/AMX on this CPU)"
        return f"cpu bf16 GEMMs: {math.name}{why}"
    return (f"cpu bf16 GEMMs: {math.name} (probe: bf16 {_cpu_probe['bf16_gflops']:.1f} vs fp32 "
            f"{_cpu_probe['fp32_gflops']:.1f} GFLOP/s)")


def cpu_math() -> Bf16Math:
    """This process's choice for CPU tensors (decided by the probe on first use if nobody configured it)."""
    return _cpu_choice if _cpu_choice is not None else configure_cpu_bf16("auto")


def math_for(t: Tensor) -> Bf16Math:
    """The implementation for tensors on t's device: CUDA (and every other accelerator) is native."""
    return cpu_math() if t.device.type == "cpu" else NATIVE
