"""How the model is compiled for training: `compile_for_training(model, raw_model, mode, ...)`.

"model" compiles the whole model once, as nanochat does; "blocks" compiles each Block (they share one
graph, so compiling costs one block's time) and leaves the embedding, final norm and loss outside; "none"
runs eagerly. With `cuda_graphs` the whole-model graph replays as CUDA graphs (no math changes). A run's
mode (`--compile`) and CUDA graphs (`--cuda_graphs`), and what their `auto` picks where, are decided in
train/resolve.py.
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_CHOICES = ("model", "blocks", "none")


def compile_for_training(model: nn.Module, raw_model: nn.Module, mode: str, data_parallel: bool = False,
                         cuda_graphs: bool = False) -> nn.Module:
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

    `cuda_graphs` (mode "model" only): the training step must then keep every .grad allocated and mark each
    micro-step (`step.optimizer_step(..., cuda_graphs=True)` does both).
    """
    if mode not in COMPILE_CHOICES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_CHOICES)}")
    if data_parallel:
        torch._dynamo.config.optimize_ddp = False
    if cuda_graphs and mode != "model":
        raise ValueError(f"CUDA graphs replay the whole-model graph, not compile mode {mode!r}")
    if mode == "model":
        return torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
    if mode == "blocks":
        raw_model.compiled_blocks = [torch.compile(block, dynamic=False) for block in raw_model.transformer.h]
    return model
