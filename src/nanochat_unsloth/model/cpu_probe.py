"""What this CPU's PyTorch can run, found by running it on a tiny tensor.

PyTorch picks a CPU kernel from the feature flags the CPU reports (cpuinfo): an FP8 `_scaled_mm` goes to
oneDNN where the flags list AMX, a bf16 matmul to oneDNN's bf16 kernels on AVX-512. oneDNN itself may be
allowed fewer instructions than the flags list (ONEDNN_MAX_CPU_ISA=AVX2, or a hypervisor that reports more
than it runs); it then refuses the op with "could not create a primitive descriptor". So a capability is
decided by trying the op once per process, and the flags alone never decide that an op runs.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

ONEDNN_REFUSAL = "could not create a primitive descriptor"
_BF16_PROBE_SIZE = 256
_bf16_timing: dict | None = None  # probe_cpu_bf16's figures, once bf16_slowdown timed them
_bf16_refusal: str | None = None  # oneDNN's words when bf16_refusal found a bf16 matmul refused


def op_runs(op: Callable[[], object]) -> tuple[bool, str]:
    """(True, "") when `op()` runs; (False, oneDNN's first line) when oneDNN refuses it on this CPU. Any
    other error is a bug, not a missing capability, and is raised."""
    try:
        op()
    except RuntimeError as e:
        if ONEDNN_REFUSAL not in str(e):
            raise
        return False, str(e).strip().splitlines()[0]
    return True, ""


# -----------------------------------------------------------------------------
# bf16 matmuls: what train/resolve.py asks for `--cpu_bf16 auto` (train/bf16_gemm.py has the two ways)


def cpu_has_bf16_instructions() -> bool:
    """AVX-512-BF16 or AMX tiles (x86); False where torch cannot tell (other architectures)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def bf16_matmul_runs() -> tuple[bool, str]:
    """Whether a bf16 matmul runs on this CPU at all: (True, "") or (False, oneDNN's line)."""
    a = torch.ones(16, 16, dtype=torch.bfloat16)
    return op_runs(lambda: torch.matmul(a, a))


def bf16_refusal() -> str | None:
    """oneDNN's words when it refuses a bf16 matmul on this CPU, else None (kept for `bf16_summary`)."""
    global _bf16_refusal
    ok, why = bf16_matmul_runs()
    _bf16_refusal = None if ok else why
    return _bf16_refusal


def probe_cpu_bf16(size: int = _BF16_PROBE_SIZE, repeats: int = 5) -> dict:
    """Time one size^3 matmul in bf16 and in fp32 on this CPU (best of `repeats` after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)

    def best_seconds(x: torch.Tensor, y: torch.Tensor) -> float:
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


def bf16_slowdown() -> float:
    """How many times slower a bf16 matmul is than an fp32 one here: `probe_cpu_bf16`, timed once per process."""
    global _bf16_timing
    if _bf16_timing is None:
        _bf16_timing = probe_cpu_bf16()
    return _bf16_timing["bf16_slowdown"]


def bf16_summary(choice: str) -> str:
    """One line for a run's log: its CPU bf16 GEMMs (`choice`), and what the probes above found."""
    if _bf16_refusal is not None:
        return f"cpu bf16 GEMMs: {choice} (oneDNN refuses bf16 matmuls here: {_bf16_refusal})"
    if _bf16_timing is None:
        why = "" if cpu_has_bf16_instructions() else " (no AVX-512-BF16/AMX on this CPU)"
        return f"cpu bf16 GEMMs: {choice}{why}"
    return (f"cpu bf16 GEMMs: {choice} (probe: bf16 {_bf16_timing['bf16_gflops']:.1f} vs fp32 "
            f"{_bf16_timing['fp32_gflops']:.1f} GFLOP/s)")
