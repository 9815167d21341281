"""The one place a model is assembled: `build_model(config, options, device, seed)`.

The training loop, eval, convert, the demo and the benchmarks all build through it, so a model is the
same wherever it runs. It names the kernel sets and chooses one, builds nanochat's GPT on the meta
device (no memory, no init cost), gives it storage on `device`, initialises it under `seed` (the same
weights on every rank and world size), then applies `--fp8` with the one converter in `fp8.py`.

Kernel sets (`--kernels`):
    torch   nanochat's math op for op, on CPU and GPU (the reference; compiled whole).
    fused   the GPU set: our chunked lm_head + softcap + cross-entropy (`lm_head_loss.py`), so the
            `[tokens, vocab]` logits never exist, and q's and k's rotary + QK norm as one Triton kernel
            each way (`rotary_norm.py`); the blocks' input norms and attention stay torch ops, which
            Inductor fuses inside each compiled block. Needs CUDA; elsewhere it falls back to torch with
            a one-line notice. `unsloth` is its former name, still accepted (it never used Unsloth).
A run's `--kernels auto` (fused on CUDA, torch elsewhere) is decided in train/resolve.py, as every `auto`
is: the options here are concrete. To add a kernel: write the op next to its reference in `ops.py` (or a
module of its own) and put it into a set in `get_kernels` below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nanochat_unsloth.common import notice_once
from nanochat_unsloth.model import fp8
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.model.lm_head_loss import DEFAULT_CHUNK_MB, ChunkedLMHeadLoss
from nanochat_unsloth.model.memory import check_lean_checkpoint
from nanochat_unsloth.model.ops import TORCH_KERNELS, Kernels
from nanochat_unsloth.model.rotary_norm import rotary_norm

KERNEL_CHOICES = ("torch", "fused")
KERNEL_ALIASES = {"unsloth": "fused"}  # older name of the fused set (CLI and checkpoints' meta)


def canonical_kernels(name: str) -> str:
    """The set's current name (`unsloth` -> `fused`); ValueError naming `--kernels` for an unknown one."""
    name = KERNEL_ALIASES.get(name, name)
    if name not in KERNEL_CHOICES:
        raise ValueError(f"--kernels {name!r} is not a kernel set; choose one of: {', '.join(KERNEL_CHOICES)} "
                         "(train/resolve.py decides auto)")
    return name


def get_kernels(name: str = "torch", loss_chunk_mb: float = DEFAULT_CHUNK_MB) -> Kernels:
    """The kernel set behind `--kernels NAME`."""
    if canonical_kernels(name) == "torch":
        return TORCH_KERNELS
    if not torch.cuda.is_available():
        notice_once("--kernels fused: the fused kernels need a CUDA GPU and none is available; "
                    "falling back to --kernels torch")
        return TORCH_KERNELS
    return dataclasses.replace(TORCH_KERNELS, name="fused", lm_head_loss=ChunkedLMHeadLoss(loss_chunk_mb),
                               rotary_norm=rotary_norm)


@dataclass(frozen=True)
class ModelOptions:
    """How a model runs: everything `build_model` and `setup.prepare_for_training` need besides its shape (the
    TrainConfig fields of the same names), in concrete values: a run's come from `train.resolve.model_options`."""

    kernels: str = "torch"  # torch | fused
    memory: str = "fast"  # fast | lean | selective
    lean_blocks: int = -1  # with lean / selective: only the first N blocks (-1 = all)
    lean_checkpoint: str = "torch"  # offload | torch: how lean blocks are checkpointed
    fp8: bool = False
    fp8_scaling: str = "dynamic"  # fp8.SCALING_CHOICES
    fp8_recipe: str = "tensorwise"  # fp8.RECIPE_CHOICES
    fp8_weight_cache: bool = False  # the block weights quantised once per optimizer step (fp8.WeightCache)
    loss_chunk_mb: float = DEFAULT_CHUNK_MB  # the fused loss's logits budget per chunk
    compile: str = "none"  # model | blocks | none (compile.compile_for_training)
    cuda_graphs: bool = False  # replay the whole-model graph (compile "model") as CUDA graphs


def build_model(config: GPTConfig, options: ModelOptions = ModelOptions(), device="cpu",
                seed: int | None = None) -> GPT:
    """nanochat's construction: shapes on the meta device, then storage on `device`, then `init_weights`
    (under `torch.manual_seed(seed)` unless seed is None: a checkpoint's weights are loaded next), then FP8.
    ValueError names the flag of a bad option."""
    device = torch.device(device)
    ops = get_kernels(options.kernels, options.loss_chunk_mb)
    check_lean_checkpoint(options.lean_checkpoint)
    if options.fp8:
        fp8.check_scaling_mode(options.fp8_scaling)
        fp8.check_recipe(options.fp8_recipe)
    with torch.device("meta"):
        model = GPT(config, ops, memory=options.memory, lean_blocks=options.lean_blocks,
                    lean_checkpoint=options.lean_checkpoint)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    if options.fp8:
        model = fp8.convert_to_fp8(model, options.fp8_scaling, options.fp8_recipe, options.fp8_weight_cache)
    return model
