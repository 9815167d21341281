"""A built model made ready to train: its optimizers, Accelerate's wrapping, compilation.

Shared by the training loop and benchmarks/train_throughput.py (both build the model with
`model.build.build_model` first), so the benchmark times the model the loop trains, not a copy of its set-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nanochat_unsloth.model.build import ModelOptions
from nanochat_unsloth.model.compile import compile_for_training
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
    `accelerator.prepare`, then compile as `options.compile` and `options.cuda_graphs` say (a run's come from
    train/resolve.py: "none" off CUDA)."""
    from accelerate import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # one client optimizer (deepspeed_zero.py says why)
        from nanochat_unsloth.train import deepspeed_zero

        optimizers = [deepspeed_zero.client_optimizer_for(accelerator, raw_model, **optimizer_kwargs)]
    else:
        optimizers = optim.build_optimizers_for(optimizer, raw_model, **optimizer_kwargs)
    model, *optimizers = accelerator.prepare(raw_model, *optimizers)
    if options.compile != "none":
        model = compile_for_training(model, raw_model, options.compile,
                                     data_parallel=accelerator.num_processes > 1 and not sharded,
                                     cuda_graphs=options.cuda_graphs)
    return TrainingModel(model, raw_model, optimizers, options.compile, options.cuda_graphs)
