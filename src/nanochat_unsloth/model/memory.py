"""Memory modes and how the model is compiled for training.

    --memory fast   every block keeps its activations for backward (nanochat)
    --memory lean   per-block activation checkpointing: a block keeps only its input, and backward
                    re-runs its forward. Costs about one extra forward (~a quarter of the step) and
                    frees nearly all activation memory, so deeper models and larger batches fit.
                    `--lean_blocks K` checkpoints only the first K blocks: a point between the two
                    (for a memory budget that lean undershoots and fast overshoots).
    --memory selective
                    recompute only the MLP (its c_fc GEMM and ReLU^2) in backward: the MLP's 4*n_embd-wide
                    hidden activation, the largest tensor a block keeps (~40% of its activations), is not
                    stored. Costs one c_fc GEMM per block (~1/9 of the block's GEMM work) where lean costs
                    the whole block forward: measured at d20 with --fp8, 5.5-8% of the step for 35% less
                    activation memory. `--lean_blocks K` limits it to the first K blocks too.

Lean has two implementations (NANOCHAT_LEAN_CHECKPOINT=auto|offload|torch selects; auto = offload):
    offload   Unsloth's offloaded checkpointing (unsloth_zoo, LGPL-3.0): the saved block inputs go to
              pinned CPU memory. The default: on the H100 it ran as fast as torch's and peaked 2.6 GiB
              lower (d20, B=32; docs/PERF.md). CUDA + unsloth_zoo only; elsewhere lean falls back to
              torch's with a one-line notice.
    torch     torch.utils.checkpoint (non-reentrant) around the compiled block; works on every device

Compilation (`compile_for_training`): "model" compiles the whole model once (nanochat's
torch.compile); "blocks" compiles each Block separately (regional compilation: the blocks share one
compiled graph, so compiling takes one block's time) and leaves the embedding, the final norm and the
loss outside. The torch kernels in fast mode use "model": their loss, logits and all, must be inside
the graph to stay fast and small. Lean mode uses "blocks": Unsloth's offloaded checkpoint cannot be
traced. The unsloth kernels use "blocks" too: their fused loss is a `torch.compiler.disable` region,
so "model" works (the graph ends before the loss) and measured 1.1-1.2% faster on the H100 at d20
B=32 (bf16 and --fp8), but with --fp8 it compiled for ~3 minutes instead of under one and is
unmeasured at smaller batches (docs/PERF.md).
NANOCHAT_COMPILE=model|blocks|none overrides, for benchmarks. NANOCHAT_INDUCTOR="key=value,..." sets
torch._inductor.config entries before compiling (e.g. `triton.tile_reductions=True`), for benchmarks too.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from nanochat_unsloth.model.ops import import_unsloth_module, notice_once

MEMORY_CHOICES = ("fast", "lean", "selective")
LEAN_CHOICES = ("auto", "offload", "torch")
COMPILE_CHOICES = ("model", "blocks", "none")


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

    Ordered by what each costs in speed, as measured at d20 on an H100 (docs/PERF.md): recomputing part of
    the blocks (`--lean_blocks K`, when a recompute mode is on), the MLP recomputed (selective, 6-8% with
    --fp8 for ~35% less activation memory), a smaller micro-batch (the step's math is unchanged: more
    gradient accumulation), whole blocks recomputed (lean, ~25% for ~90% less).
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
    (482 MiB kept per d20 block at B=8, as in fast mode). With every op tagged MUST_RECOMPUTE it keeps 322
    MiB (benchmarks/activation_memory.py, docs/PERF.md). Eager, the two are the same thing.
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


_LEAN_IMPLS: dict[str, Callable] = {}


def lean_checkpoint_impl(device: torch.device) -> Callable:
    """The checkpointing function lean mode uses on `device` (resolved once per device type)."""
    key = device.type
    if key not in _LEAN_IMPLS:
        want = os.environ.get("NANOCHAT_LEAN_CHECKPOINT", "auto")
        if want not in LEAN_CHOICES:
            raise ValueError(f"NANOCHAT_LEAN_CHECKPOINT={want!r}: choose one of {', '.join(LEAN_CHOICES)}")
        impl = _torch_checkpoint
        if want in ("auto", "offload"):
            try:
                if device.type != "cuda":
                    raise ImportError("offloaded checkpointing needs a CUDA GPU")
                import_unsloth_module("unsloth_zoo.gradient_checkpointing")
                impl = _offload_checkpoint
            except ImportError as e:
                notice_once(f"--memory lean: Unsloth's offloaded checkpointing is unavailable ({e}); "
                            "using torch.utils.checkpoint")
        _LEAN_IMPLS[key] = impl
    return _LEAN_IMPLS[key]


def run_block(memory: str, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor,
              compiled: Callable | None = None) -> Tensor:
    """One block's forward under the memory mode (checkpointed only when training with grad).

    `compiled` is the block's compiled twin (`compile_for_training(..., "blocks")`); it is skipped under
    inference mode (`GPT.generate`: every new length would be a recompilation). Under a whole-model
    compile it is None, and the checks below fold away at trace time.
    """
    fn = block if compiled is None or torch.is_inference_mode_enabled() else compiled
    if memory == "lean" and block.training and torch.is_grad_enabled():
        return lean_checkpoint_impl(x.device)(fn, x, cos, sin)
    return fn(x, cos, sin)


# -----------------------------------------------------------------------------
# Compiling for training


def compile_mode(kernels: str, memory: str) -> str:
    """How to compile a model built with these (resolved) kernels and memory mode."""
    override = os.environ.get("NANOCHAT_COMPILE")
    if override:
        if override not in COMPILE_CHOICES:
            raise ValueError(f"NANOCHAT_COMPILE={override!r}: choose one of {', '.join(COMPILE_CHOICES)}")
        return override
    return "blocks" if (kernels == "unsloth" or memory == "lean") else "model"


def _parse_config_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        return text


def apply_inductor_settings(spec: str | None = None) -> dict:
    """Set the torch._inductor.config entries of `spec` (default: $NANOCHAT_INDUCTOR), "a.b=value,...".

    Returns what was set. An unknown key is an error naming it: a typo would otherwise measure nothing.
    """
    spec = os.environ.get("NANOCHAT_INDUCTOR", "") if spec is None else spec
    import torch._inductor.config as inductor_config

    applied = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, text = item.partition("=")
        section, _, name = key.strip().rpartition(".")
        target = inductor_config
        for part in filter(None, section.split(".")):
            target = getattr(target, part, None)
        if not sep or target is None or not hasattr(target, name):
            raise ValueError(f"NANOCHAT_INDUCTOR: {item!r} is not `key=value` with a torch._inductor.config key")
        setattr(target, name, _parse_config_value(text.strip()))
        applied[key.strip()] = getattr(target, name)
    return applied


def compile_for_training(model: nn.Module, raw_model: nn.Module, mode: str, data_parallel: bool = False) -> nn.Module:
    """Compile per `mode`; returns the module to call (the wrapper itself for "blocks" and "none").

    `data_parallel` (DDP): Dynamo's DDP optimizer would split every compiled graph at DDP's bucket
    boundaries, so that all-reduces start mid-graph; the pieces lose fusions and each keeps its own saved
    activations (docs/MULTI_GPU.md has the measurements). Unsplit, a compiled region's gradients are ready
    when its backward ends: compiled blocks still overlap their all-reduce with the next block's backward,
    and the whole-model graph reduces right after its backward.

    `model` may be a DDP wrapper of `raw_model`. For "blocks", each block gets a compiled twin in
    `raw_model.compiled_blocks`, a plain list outside the module tree (parameter names and the
    state_dict stay nanochat's) that `GPT.forward` hands to `run_block`; the twins share one compiled
    graph (same code, parameters as graph inputs), so compiling costs one block.
    """
    if mode not in COMPILE_CHOICES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_CHOICES)}")
    if mode != "none":
        apply_inductor_settings()
    if data_parallel:
        torch._dynamo.config.optimize_ddp = False
    if mode == "model":
        return torch.compile(model, dynamic=False)
    if mode == "blocks":
        raw_model.compiled_blocks = [torch.compile(block, dynamic=False) for block in raw_model.transformer.h]
    return model
