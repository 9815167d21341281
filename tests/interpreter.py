"""Triton's CPU interpreter for kernel tests on machines without a GPU (when Triton is installed)."""

from __future__ import annotations

import importlib.util


def interpreter_runs_loops() -> bool:
    """Whether kernels with runtime loop bounds run under the interpreter here: Triton 3.6's interpreter turns
    a loop bound into a Python int in a way numpy 2 refuses, so it needs Triton and numpy < 2."""
    if importlib.util.find_spec("triton") is None:
        return False
    import numpy

    return int(numpy.__version__.split(".")[0]) < 2
