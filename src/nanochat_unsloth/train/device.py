"""nanochat's --device_type: cuda|cpu|mps, or "" to take the best one there is (CUDA > MPS > CPU)."""

from __future__ import annotations

import torch

from nanochat_unsloth.common import UserError


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device_type(requested: str) -> str:
    """The device type to train on; a requested one that is not here is refused in one line."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device_type cuda: no CUDA device is visible here; use --device_type cpu (or leave it "
                        "empty to autodetect)")
    if requested == "mps" and not _mps_available():
        raise UserError("--device_type mps: Apple's MPS backend is not available here; use --device_type cpu")
    return requested
