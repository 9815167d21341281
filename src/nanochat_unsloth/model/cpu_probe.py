"""What this CPU's PyTorch can run, found by running it on a tiny tensor.

PyTorch picks a CPU kernel from the feature flags the CPU reports (cpuinfo): an FP8 `_scaled_mm` goes to
oneDNN where the flags list AMX, a bf16 matmul to oneDNN's bf16 kernels on AVX-512. oneDNN itself may be
allowed fewer instructions than the flags list (ONEDNN_MAX_CPU_ISA=AVX2, or a hypervisor that reports more
than it runs); it then refuses the op with "could not create a primitive descriptor". So a capability is
decided by trying the op once per process, and the flags alone never decide that an op runs.
"""

from __future__ import annotations

from typing import Callable

ONEDNN_REFUSAL = "could not create a primitive descriptor"


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
