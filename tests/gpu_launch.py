"""What the GPU tests share: the environment their launches run in, and how they report what they measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

# this workplace's GPU machines: NVLink multicast off for NCCL, torch's symmetric memory and NVSHMEM
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def gpu_env() -> dict:
    return {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}


def record(name: str, values: dict) -> None:
    """Print a measurement as JSON (visible with `pytest -s`) and add it to $MULTI_GPU_TEST_OUT when set."""
    print(name, json.dumps(values))
    out = os.environ.get("MULTI_GPU_TEST_OUT")
    if out:
        path = Path(out)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = values
        path.write_text(json.dumps(data, indent=1))
