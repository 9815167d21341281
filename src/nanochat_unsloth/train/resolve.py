"""Every `auto` of a training run, decided in one place, once: `resolve(cfg, device, world_size)`.

Seven flags default to `auto`: --kernels, --lean_checkpoint, --fp8_scaling, --fp8_weight_cache, --compile,
--cuda_graphs and --cpu_bf16. What each becomes depends on the device, the number of processes, the rows of one micro-batch
(device_batch_size x max_seq_len) and, for some, on what this machine can do (FP8 GEMMs, unsloth_zoo, a CPU's
bf16 speed): the rules below ask the machine, each only when its answer matters. The training loop calls
`resolve` at start-up, before anything is built, logs the result on one line and records it in every
checkpoint's meta (`RunMeta.resolved`). The code below the loop (model/build.py, compile.py, fp8.py,
memory.py, train/setup.py, train/bf16_gemm.py) takes concrete values only.

Each resolved value is a value its flag accepts: passing the logged values as flags repeats this run's choices
on another machine.

The measurements behind the rules: docs/PERF.md, "FP8 at equal quality" (--fp8_scaling); docs/perf-log/2026-11-28.md,
"An FP8 MLP glue kernel (no gain, removed), B=4's host bound, `--compile model`" and "CUDA graphs for the
small-batch FP8 step (`--cuda_graphs`), `--compile auto` at B=32 and 8" (--compile, --cuda_graphs), and "CPU: bf16
GEMMs on CPUs without bf16 instructions" (--cpu_bf16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import cpu_probe, fp8
from nanochat_unsloth.model import memory as memory_modes
from nanochat_unsloth.model.build import ModelOptions

# Below this many rows per micro-batch the fused set's FP8 step is bound by the host's launches: --compile
# auto compiles that model whole (one graph per micro-step instead of one per block) and --cuda_graphs auto
# replays the graph (measured under dynamic FP8 scaling); at larger batches the
# whole-model graph does not pay for its longer compile.
SMALL_MICRO_BATCH_ROWS = 16384
# --cpu_bf16 auto: on a CPU with bf16 instructions it still emulates when a bf16 matmul is this many times
# slower than an fp32 one: oneDNN then is not using them (bf16 instructions do twice the work of fp32 ones
# per cycle).
SLOW_BF16_FACTOR = 2.0


@dataclass(frozen=True)
class ResolvedOptions:
    """The seven `auto`-able settings of a run, as it runs them. A setting whose feature is off still holds a
    value: fp8_scaling without --fp8 what --fp8 would use; lean_checkpoint without checkpointed blocks the
    flag's value, and torch for auto (the machine is not asked for a setting that no block uses)."""

    kernels: str  # torch | fused
    lean_checkpoint: str  # offload | torch
    fp8_scaling: str  # delayed | dynamic
    fp8_weight_cache: str  # on | off
    compile: str  # model | blocks | none
    cuda_graphs: str  # on | off
    cpu_bf16: str  # native | emulated (native off the CPU)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """The start-up log's line: `resolved: kernels=torch lean_checkpoint=torch ...`."""
        return "resolved: " + " ".join(f"{name}={value}" for name, value in self.to_dict().items())


def resolve(cfg, device, world_size: int = 1, zero_stage: int | None = None) -> ResolvedOptions:
    """The concrete value of every `auto` of `cfg` (a TrainConfig, validated) for a run on `device` with
    `world_size` processes; `zero_stage`: the DeepSpeed ZeRO stage, None without DeepSpeed. UserError, in one
    line naming the flag, for a setting this machine or this run cannot honour."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    rows = cfg.device_batch_size * cfg.max_seq_len  # B*T of one micro-batch
    fp8_runs = cfg.fp8 and fp8.fp8_supported(device)[0]  # elsewhere --fp8 keeps bf16 (with a notice)
    if fp8_runs and rows % fp8.ROW_MULTIPLE:
        raise UserError(f"--fp8 needs --device_batch_size x --max_seq_len to be a multiple of {fp8.ROW_MULTIPLE} "
                        f"(FP8 GEMM shapes), not {cfg.device_batch_size} x {cfg.max_seq_len}; change one of them")

    kernels = cfg.kernels
    if kernels == "auto":
        kernels = "fused" if on_cuda else "torch"  # the fused set is the CUDA one
    # --fp8_scaling auto: dynamic at every size. Delayed scaling is faster per step at large micro-batches,
    # but the loss drifts away from bf16's over a run (docs/PERF.md, "FP8 at equal quality").
    fp8_scaling = "dynamic" if cfg.fp8_scaling == "auto" else cfg.fp8_scaling
    # the fused set's FP8 step on small micro-batches, bound by the host's kernel launches
    host_bound = kernels == "fused" and fp8_runs and rows < SMALL_MICRO_BATCH_ROWS
    compile_mode = _compile(cfg.compile, kernels, cfg.memory, host_bound, on_cuda, zero_stage)
    return ResolvedOptions(
        kernels=kernels,
        lean_checkpoint=_lean_checkpoint(cfg.lean_checkpoint, cfg.memory, cfg.lean_blocks, device),
        fp8_scaling=fp8_scaling,
        fp8_weight_cache=_fp8_weight_cache(cfg.fp8_weight_cache, fp8_runs, cfg.fp8_recipe, cfg.memory, compile_mode),
        compile=compile_mode,
        cuda_graphs=_cuda_graphs(cfg.cuda_graphs, compile_mode, host_bound, world_size, on_cuda),
        cpu_bf16=cpu_bf16_for(cfg.cpu_bf16, device.type),
    )


def model_options(cfg, resolved: ResolvedOptions) -> ModelOptions:
    """The ModelOptions of a run: its TrainConfig's fields of the same names, the `auto`s as resolved."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelOptions) if hasattr(cfg, f.name)}
    return ModelOptions(**{**values, "kernels": resolved.kernels, "lean_checkpoint": resolved.lean_checkpoint,
                           "fp8_scaling": resolved.fp8_scaling, "compile": resolved.compile,
                           "fp8_weight_cache": resolved.fp8_weight_cache == "on",
                           "cuda_graphs": resolved.cuda_graphs == "on"})


def _compile(choice: str, kernels: str, memory: str, host_bound: bool, on_cuda: bool,
             zero_stage: int | None) -> str:
    """--compile, on CUDA only (elsewhere nothing is compiled). `auto`: the whole model where the loss must sit
    inside the graph (the torch kernels, fast or selective); block by block where it cannot (the fused loss,
    Unsloth's untraceable offloaded checkpoint); the whole model again for the host-bound FP8 step of the fused
    set in fast mode. DeepSpeed's engine is never compiled whole, whatever was asked: its hooks and Python
    bookkeeping run around the forward (neither ZeRO stage is measured on GPUs yet)."""
    if not on_cuda:
        return "none"
    mode = choice
    if mode == "auto" and memory == "fast" and host_bound:
        mode = "model"
    elif mode == "auto":
        mode = "blocks" if kernels == "fused" or memory == "lean" else "model"
    if zero_stage is not None:  # DeepSpeed: ZeRO-2 block by block, ZeRO-3 (hooks gather each block) not at all
        mode = "none" if zero_stage == 3 or mode == "none" else "blocks"
    return mode


def _fp8_weight_cache(choice: str, fp8_runs: bool, recipe: str, memory: str, compile_mode: str) -> str:
    """--fp8_weight_cache: the block weights quantised once per optimizer step instead of in every micro-step.
    `auto`: on for our FP8 recipe where the blocks compile one by one, the step it was measured on; off with
    `--memory lean`, whose point is memory (the copies hold 2 bytes per block parameter), and for the
    whole-model graph (the torch kernels, or the small step's CUDA graphs), where its speed is not measured."""
    if choice != "auto":
        return choice
    measured = fp8_runs and recipe == "tensorwise" and compile_mode == "blocks"
    return "on" if measured and memory != "lean" else "off"


def _cuda_graphs(choice: str, compile_mode: str, host_bound: bool, world_size: int, on_cuda: bool) -> str:
    """--cuda_graphs: replay the whole-model graph as CUDA graphs (CUDA only). `auto`: on for the host-bound FP8
    step in one process only, where its gain was measured; elsewhere it did not pay for the memory its pool
    holds."""
    if not on_cuda or choice == "off":
        return "off"
    if choice == "on":
        if compile_mode != "model":
            raise UserError(f"--cuda_graphs on replays the whole-model graph, but the model compiles as "
                            f"{compile_mode!r}: add --compile model (or use --cuda_graphs auto)")
        if world_size > 1:
            # DDP's gradient hooks and FSDP's parameter gathering run between the graphs; not measured
            raise UserError(f"--cuda_graphs on runs in one process only ({world_size} here): use --cuda_graphs off")
        return "on"
    return "on" if compile_mode == "model" and world_size == 1 and host_bound else "off"


def _lean_checkpoint(choice: str, memory: str, lean_blocks: int, device: torch.device) -> str:
    """--lean_checkpoint: Unsloth's offloaded checkpointing where it runs (CUDA and unsloth_zoo; asked for
    `offload` too, which elsewhere falls back with a notice), else torch.utils.checkpoint. The machine is asked
    only when a block is checkpointed: importing unsloth_zoo takes seconds."""
    if memory != "lean" or lean_blocks == 0:
        return "torch" if choice == "auto" else choice
    if choice == "torch":
        return "torch"
    return "offload" if memory_modes.offload_checkpoint_runs(device) else "torch"


def cpu_bf16_for(choice: str, device_type: str) -> str:
    """--cpu_bf16: how this process's CPU tensors run bf16 GEMMs (off the CPU: native). `auto` is native only on a
    CPU with bf16 instructions (AVX-512-BF16 or AMX) where oneDNN runs a bf16 matmul at all and the timed probe
    finds it fast; every other CPU emulates without timing anything (bf16_gemm.py says why)."""
    if device_type != "cpu":
        return "native"
    if choice != "auto":
        return choice
    if not cpu_probe.cpu_has_bf16_instructions() or cpu_probe.bf16_refusal() is not None:
        return "emulated"
    return "emulated" if cpu_probe.bf16_slowdown() > SLOW_BF16_FACTOR else "native"
