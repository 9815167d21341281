"""Memory modes: what each block keeps for backward.

    --memory fast   every block keeps its activations for backward (nanochat)
    --memory lean   per-block activation checkpointing: a block keeps only its input, and backward
                    re-runs its forward: about one extra forward for nearly all activation memory, so
                    deeper models and larger batches fit. `--lean_blocks K` checkpoints only the first K
                    blocks: a point between the two (for a budget that lean undershoots and fast overshoots).
    --memory selective
                    recompute only the MLP (its c_fc GEMM and ReLU^2) in backward: the MLP's 4*n_embd-wide
                    hidden activation, the largest tensor a block keeps, is not stored, for one c_fc GEMM per
                    block instead of lean's whole block forward. `--lean_blocks K` limits it to K blocks too.

Lean has two implementations (`--lean_checkpoint offload|torch`; its `auto`, offload where it can run, is
decided in train/resolve.py with `offload_checkpoint_runs`):
    offload   Unsloth's offloaded checkpointing (unsloth_zoo, LGPL-3.0): the saved block inputs go to
              pinned CPU memory, so the GPU keeps even less. CUDA + unsloth_zoo only; elsewhere lean falls
              back to torch's with a one-line notice.
    torch     torch.utils.checkpoint (non-reentrant) around the compiled block; works on every device
docs/PERF.md, "The memory frontier", has the speed and memory of each mode.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from nanochat_unsloth.common import notice_once

MEMORY_CHOICES = ("fast", "lean", "selective")
LEAN_CHOICES = ("offload", "torch")


def check_memory_mode(memory: str) -> str:
    if memory not in MEMORY_CHOICES:
        raise ValueError(f"--memory {memory!r} is not a memory mode; choose one of: {', '.join(MEMORY_CHOICES)}")
    return memory


def block_memory_modes(memory: str, lean_blocks: int, n_layer: int) -> list[str]:
    """The memory mode of each block: under lean (or selective), the first `lean_blocks` blocks are
    checkpointed (or recompute their MLP); -1: all.

    Checkpointing only some blocks spends the memory a budget leaves on speed: each block kept whole
    skips its recomputed forward. Which blocks does not matter for speed or memory (all are alike);
    the first ones are chosen.
    """
    check_memory_mode(memory)
    if lean_blocks < -1 or lean_blocks > n_layer:
        raise ValueError(f"--lean_blocks {lean_blocks} is outside -1..{n_layer} (the model has {n_layer} blocks; "
                         "-1 = all)")
    if memory == "fast":
        if lean_blocks not in (-1, 0):
            raise ValueError(f"--lean_blocks {lean_blocks} needs --memory lean or selective")
        return ["fast"] * n_layer
    n = n_layer if lean_blocks == -1 else lean_blocks
    return [memory] * n + ["fast"] * (n_layer - n)


def out_of_memory_advice(device_batch_size: int, memory: str, lean_blocks: int, suggest_fp8: bool,
                         peak_gib: float, total_gib: float) -> str:
    """The one-line error for a training step that ran out of GPU memory: what to change, cheapest first.

    Ordered by what each costs in speed (docs/PERF.md, "The memory frontier"): recomputing part of the blocks
    (`--lean_blocks K`, when a recompute mode is on), the MLP recomputed (selective), a smaller micro-batch
    (the step's math is unchanged: more gradient accumulation), whole blocks recomputed (lean).
    """
    where = f"out of GPU memory (peak {peak_gib:.1f} of {total_gib:.1f} GiB) at --device_batch_size={device_batch_size}"
    where += f" --memory={memory}" + (f" --lean_blocks={lean_blocks}" if lean_blocks != -1 else "")
    options = []
    if memory != "fast" and lean_blocks != -1:
        options.append("raise --lean_blocks (or -1: all blocks)")
    if memory == "fast":
        options.append("add --memory selective (the MLP recomputed in backward)")
    if device_batch_size > 1:
        options.append(f"lower --device_batch_size to {device_batch_size // 2} (same step math, more accumulation)")
    if memory != "lean":
        options.append("use --memory lean (every block recomputed)")
    if suggest_fp8:
        options.append("add --fp8 (smaller saved tensors)")
    if memory == "lean" and lean_blocks == -1 and device_batch_size == 1:
        options.append("the model itself does not fit: a smaller --depth, or FSDP2 over several GPUs (docs/MULTI_GPU.md)")
    return where + ": " + "; or ".join(options) + " (docs/PERF.md lists the memory of each setting)"


# -----------------------------------------------------------------------------
# Recomputing the MLP (--memory selective)


def _recompute_every_op(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_every_op_contexts():
    return create_selective_checkpoint_contexts(_recompute_every_op)


def checkpoint_recomputed(fn: Callable, *args: Tensor) -> Tensor:
    """`fn(*args)` keeping only its inputs for backward, which re-runs it: a selective MLP's region.

    Every op inside is tagged MUST_RECOMPUTE through a selective-checkpoint context rather than left to
    plain `checkpoint`: inside a compiled block, torch 2.11 did not honour a plain non-reentrant
    checkpoint around the FP8 matmul (an autograd.Function): plain checkpoint tags the region
    PREFER_RECOMPUTE, and the partitioner kept the MLP's bf16 pre-activation as if there were no checkpoint
    (as in fast mode); with every op tagged MUST_RECOMPUTE it is not kept (benchmarks/activation_memory.py
    measures it; docs/perf-log/2026-11-24.md, "Why selective saved nothing under FP8, and the repair").
    Eager, the two are the same thing.
    """
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,
                                             context_fn=_recompute_every_op_contexts)


# -----------------------------------------------------------------------------
# Running one block


def _torch_checkpoint(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Nothing in a block draws random numbers, so there is no RNG state to stash and restore.
    return torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False, preserve_rng_state=False)


def _offload_checkpoint(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    gc = import_unsloth_module("unsloth_zoo.gradient_checkpointing")
    return gc.unsloth_offloaded_gradient_checkpoint(block, x, cos, sin)


_LEAN_IMPLS: dict[tuple[str, str], Callable] = {}


def check_lean_checkpoint(want: str) -> str:
    if want not in LEAN_CHOICES:
        raise ValueError(f"--lean_checkpoint {want!r}: choose one of {', '.join(LEAN_CHOICES)} "
                         "(train/resolve.py decides auto)")
    return want


def offload_checkpoint_runs(device: torch.device) -> bool:
    """Whether Unsloth's offloaded checkpointing runs on `device` (CUDA, and unsloth_zoo imports). When it does
    not, a one-line notice says so (once) and lean mode checkpoints with torch.utils.checkpoint."""
    try:
        if device.type != "cuda":
            raise ImportError("offloaded checkpointing needs a CUDA GPU")
        import_unsloth_module("unsloth_zoo.gradient_checkpointing")
    except ImportError as e:
        notice_once(f"--memory lean: Unsloth's offloaded checkpointing is unavailable ({e}); "
                    "using torch.utils.checkpoint")
        return False
    return True


def lean_checkpoint_impl(device: torch.device, want: str = "torch") -> Callable:
    """The checkpointing function lean mode uses on `device` (resolved once per device type and choice)."""
    key = (device.type, want)
    if key not in _LEAN_IMPLS:
        check_lean_checkpoint(want)
        offload = want == "offload" and offload_checkpoint_runs(device)
        _LEAN_IMPLS[key] = _offload_checkpoint if offload else _torch_checkpoint
    return _LEAN_IMPLS[key]


def run_block(memory: str, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor,
              compiled: Callable | None = None, lean_checkpoint: str = "torch") -> Tensor:
    """One block's forward under the memory mode (checkpointed only when training with grad).

    `compiled` is the block's compiled twin (`compile.compile_for_training(..., "blocks")`); it is skipped under
    inference mode (`GPT.generate`: every new length would be a recompilation). Under a whole-model
    compile it is None, and the checks below fold away at trace time.
    """
    fn = block if compiled is None or torch.is_inference_mode_enabled() else compiled
    if memory == "lean" and block.training and torch.is_grad_enabled():
        return lean_checkpoint_impl(x.device, lean_checkpoint)(fn, x, cos, sin)
    return fn(x, cos, sin)


# -----------------------------------------------------------------------------
# Importing Unsloth without its global side effects


@contextlib.contextmanager
def _keep_torch_compile_settings():
    """Undo what Unsloth's imports do to process-wide torch.compile settings and to the PYTORCH_* / TORCH* /
    CUDA_* environment variables (which Inductor's compile workers, started later, would inherit)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    saved = [(cfg, cfg.get_config_copy()) for cfg in (dynamo_config, inductor_config)]
    prefixes = ("PYTORCH_", "TORCH", "CUDA_")
    saved_env = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated keys warn when read
            for cfg, snapshot in saved:
                for key, value in snapshot.items():
                    try:
                        if getattr(cfg, key) != value:
                            setattr(cfg, key, value)
                    except Exception:  # a read-only or removed key: leave it
                        pass
        for k in [k for k in os.environ if k.startswith(prefixes) and k not in saved_env]:
            del os.environ[k]
        os.environ.update(saved_env)


def import_unsloth_module(name: str):
    """Import an `unsloth_zoo` module, keeping torch.compile's global settings as they were."""
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("UNSLOTH_IS_PRESENT", "1")  # unsloth_zoo refuses to import without it
    with _keep_torch_compile_settings():
        return importlib.import_module(name)
