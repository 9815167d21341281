"""How the model is compiled for training (`--compile auto|model|blocks|none`, `--cuda_graphs`).

"model" compiles the whole model once, as nanochat does; "blocks" compiles each Block (they share one
graph, so compiling costs one block's time) and leaves the embedding, final norm and loss outside; "none"
runs eagerly. `auto` picks "model" where the loss must sit inside the graph (the torch kernels, fast or
selective), "blocks" where it cannot (the fused loss, Unsloth's untraceable offloaded checkpoint), and
"model" again for the fused set's FP8 step on small micro-batches, which is bound by the host's launches:
one graph per micro-step instead of one per block. `--cuda_graphs` replays that graph as CUDA graphs (no
math changes); `auto` turns it on only there, in one process, since elsewhere its gain did not pay for the
memory its pool holds. The measurements behind both rules: docs/perf-log/2026-11-28.md, "An FP8 MLP glue
kernel (no gain, removed), B=4's host bound, `--compile model`" and "CUDA graphs for the small-batch FP8
step (`--cuda_graphs`), `--compile auto` at B=32 and 8".
"""

from __future__ import annotations

import torch
from torch import nn

from nanochat_unsloth.model.fp8 import DELAYED_SCALING_MIN_ROWS

COMPILE_CHOICES = ("auto", "model", "blocks", "none")
CUDA_GRAPH_CHOICES = ("auto", "on", "off")


# Below this many rows (B*T) per micro-batch the step is bound by the host's launches: `auto` compiles the
# fused set's FP8 model whole there (fast memory mode) and replays whole-model graphs as CUDA graphs. It is
# FP8's dynamic-scaling regime, where both were measured; at larger batches the whole-model graph does not
# pay for its longer compile (docs/perf-log/2026-11-28.md, "CUDA graphs for the small-batch FP8 step").
SMALL_MICRO_BATCH_ROWS = DELAYED_SCALING_MIN_ROWS


def _host_bound_fp8_step(kernels: str, fp8: bool, rows: int | None) -> bool:
    """The fused set's FP8 step on small micro-batches: where both `auto` rules below act."""
    return kernels == "fused" and fp8 and rows is not None and rows < SMALL_MICRO_BATCH_ROWS


def compile_mode(kernels: str, memory: str, choice: str = "auto", fp8: bool = False, rows: int | None = None) -> str:
    """How to compile a model built with these (resolved) kernels and memory mode (`--compile`); `fp8` and
    `rows` (B*T of a training micro-batch, when known) let `auto` pick the whole model for small FP8 steps."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"--compile {choice!r}: choose one of {', '.join(COMPILE_CHOICES)}")
    if choice != "auto":
        return choice
    if memory == "fast" and _host_bound_fp8_step(kernels, fp8, rows):
        return "model"
    return "blocks" if (kernels == "fused" or memory == "lean") else "model"


def use_cuda_graphs(choice: str, mode: str, kernels: str = "torch", fp8: bool = False, rows: int | None = None,
                    processes: int = 1) -> bool:
    """Whether to replay the compiled model as CUDA graphs (`--cuda_graphs`), given the compile mode that
    `compile_mode` chose, the (resolved) kernel set, `--fp8`, the rows (B*T) of a training micro-batch when
    known, and the number of processes. ValueError names the flag when `on` cannot be honoured."""
    if choice not in CUDA_GRAPH_CHOICES:
        raise ValueError(f"--cuda_graphs {choice!r}: choose one of {', '.join(CUDA_GRAPH_CHOICES)}")
    if choice == "off":
        return False
    if choice == "on":
        if mode != "model":
            raise ValueError(f"--cuda_graphs on replays the whole-model graph, but the model compiles as {mode!r}: "
                             "add --compile model (or use --cuda_graphs auto)")
        if processes > 1:
            # DDP's gradient hooks and FSDP's parameter gathering run between the graphs; not measured
            raise ValueError(f"--cuda_graphs on runs in one process only ({processes} here): use --cuda_graphs off")
        return True
    return mode == "model" and processes == 1 and _host_bound_fp8_step(kernels, fp8, rows)


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
    if mode not in COMPILE_CHOICES[1:]:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_CHOICES[1:])}")
    if data_parallel:
        torch._dynamo.config.optimize_ddp = False
    if cuda_graphs and mode != "model":
        raise ValueError(f"CUDA graphs replay the whole-model graph, not compile mode {mode!r}")
    if mode == "model":
        return torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
    if mode == "blocks":
        raw_model.compiled_blocks = [torch.compile(block, dynamic=False) for block in raw_model.transformer.h]
    return model
