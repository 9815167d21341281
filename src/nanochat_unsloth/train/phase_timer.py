"""Where one training step's wall time goes on this rank: `--profile_step N`.

The step marks its phase boundaries (data, forward+backward, the last micro-step's backward with DDP's
gradient all-reduce, the loss reduction, clipping, the optimizers). On the profiled step every mark
synchronizes the device, so each phase's time is its own device work plus the waiting it causes on this
rank; on every other step the marks cost nothing. Comparing the ranks' files shows which rank the others
wait for, and in which phase. On CUDA the same step also runs under torch.profiler.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from nanochat_unsloth.common import atomic_write_json


class PhaseTimer:
    """Accumulates wall seconds per phase between `mark`s; a disabled timer does nothing at all."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._last = time.perf_counter()
            _profiler_marker("phase_start")

    def mark(self, phase: str) -> None:
        """The work since the previous mark belongs to `phase`."""
        if not self.enabled:
            return
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
        _profiler_marker(f"phase_end:{phase}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _profiler_marker(name: str) -> None:
    # an empty range in a running torch.profiler's trace, so the kernels between two marks can be told to
    # a phase (benchmarks/train_throughput.py --profile does); nothing when no profiler runs
    with torch.profiler.record_function(name):
        pass


DISABLED = PhaseTimer(torch.device("cpu"), enabled=False)


@contextmanager
def profiled_step(out_dir: Path, rank: int, step: int, device: torch.device, enabled: bool):
    """Yield the step's PhaseTimer; when enabled, write `<out_dir>/rank<r>.json` (phases, CPU time, CPU
    affinity, peak memory) and, on CUDA, run the step under torch.profiler into `rank<r>_trace.json.gz`."""
    if not enabled:
        yield DISABLED
        return
    from torch.profiler import ProfilerActivity, profile

    timer = PhaseTimer(device, enabled=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    prof = profile(activities=activities) if device.type == "cuda" else nullcontext()
    with prof:
        timer.start()
        yield timer
        timer.mark("rest")
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank, "step": step, "wall_s": wall, "phases_s": timer.seconds,
        # a rank whose process got little CPU while its step took long was starved of CPU, not GPU
        "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
    }
    if device.type == "cuda":
        record["top_kernels"] = [
            {"name": e.key[:120], "device_ms": e.device_time_total / 1e3, "count": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:25]
        ]
        # the profiler gzips by the name's ending, so the temp name (renamed into place) keeps .json.gz
        tmp = out_dir / f".rank{rank}_trace.{os.getpid()}.tmp.json.gz"
        try:
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, out_dir / f"rank{rank}_trace.json.gz")
        finally:
            tmp.unlink(missing_ok=True)  # a failed export leaves no half-written temp beside the run
    # a profile read while a run still goes (or after a kill) is whole or absent, never cut short
    atomic_write_json(out_dir / f"rank{rank}.json", record)
