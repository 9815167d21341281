"""A built model made ready to train: its optimizers, Accelerate's wrapping, compilation.

Shared by the training loop and benchmarks/train_throughput.py (both build the model with
`model.build.build_model` first), so the benchmark times the model the loop trains, not a copy of its set-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nanochat_unsloth.model.build import ModelOptions
from nanochat_unsloth.model.compile import compile_for_training, compile_mode, use_cuda_graphs
from nanochat_unsloth.model.gpt import GPT
from nanochat_unsloth.train import optim


@dataclass
class TrainingModel:
    model: nn.Module  # what the step calls: Accelerate's wrapper (DDP / FSDP), compiled whole or not
    raw_model: GPT  # uncompiled, unwrapped: sampling, FP8 state and checkpoint naming use it
    optimizers: list
    compile: str  # the compile mode used: model | blocks | none
    cuda_graphs: bool = False  # the compiled model replays as CUDA graphs: pass it on to step.optimizer_step


def prepare_for_training(accelerator, raw_model: GPT, options: ModelOptions, optimizer: str = "muon",
                         **optimizer_kwargs) -> TrainingModel:
    """`--optimizer`'s optimizers for the model `build_model` built (on the accelerator's device),
    `accelerator.prepare`, then compile (CUDA only) as `options.compile` says. ValueError names a bad flag."""
    from accelerate import DistributedType

    zero_stage = None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # one client optimizer (deepspeed_zero.py says why)
        from nanochat_unsloth.train import deepspeed_zero

        zero_stage, client = deepspeed_zero.client_optimizer_for(accelerator, raw_model, **optimizer_kwargs)
        optimizers = [client]
    else:
        optimizers = optim.build_optimizers_for(optimizer, raw_model, **optimizer_kwargs)
    model, *optimizers = accelerator.prepare(raw_model, *optimizers)
    mode, cuda_graphs = "none", False
    if accelerator.device.type == "cuda":  # whole model (nanochat's) for torch kernels, block by block for fused / lean
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        mode = compile_mode(raw_model.ops.name, options.memory, options.compile, raw_model.ops.fp8, options.fp8_rows)
        if zero_stage is not None:
            mode = deepspeed_zero.compile_mode(mode, zero_stage)
        cuda_graphs = use_cuda_graphs(options.cuda_graphs, mode, raw_model.ops.name, raw_model.ops.fp8,
                                      options.fp8_rows, accelerator.num_processes)
        model = compile_for_training(model, raw_model, mode, data_parallel=accelerator.num_processes > 1 and not sharded,
                                     cuda_graphs=cuda_graphs)
    return TrainingModel(model, raw_model, optimizers, mode, cuda_graphs)
