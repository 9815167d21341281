"""What tests/test_deepspeed.py (CPU) and tests/test_deepspeed_cuda.py (GPUs) share: the accelerate configs, how
to run tests/deepspeed_e2e.py, and how far its weights are from the reference step's."""

from __future__ import annotations

from pathlib import Path

import torch

ZERO2, ZERO3, ZERO3_OFFLOAD = (f"configs/accelerate/deepspeed_{n}.yaml" for n in ("zero2", "zero3", "zero3_offload"))
ADAMW_WEIGHTS = ["transformer.wte.weight", "lm_head.weight"]  # every other weight is a block matrix, Muon's


def e2e_argv(out: Path, grad_clips: str, *extra: str) -> tuple[str, ...]:
    return ("tests/deepspeed_e2e.py", str(out), "--grad-clips", grad_clips, *extra)


def load_result(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=False)


def largest_gap(run: dict, ref: dict, step: int, names) -> float:
    """max |W - W_ref| after `step`, relative to the reference step's largest update, over tensors `names`."""
    worst = 0.0
    for name in names:
        update = (ref["weights"][step][name] - ref["weights"][step - 1][name]).abs().max().item()
        gap = (run["weights"][step][name].float() - ref["weights"][step][name].float()).abs().max().item()
        worst = max(worst, gap / update)
    return worst
