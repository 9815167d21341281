"""DeepSpeed ZeRO-2 / ZeRO-3 (optimizer and parameter offload to CPU) through Accelerate, with nanochat's step.

`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m nanochat_unsloth.train ...` takes the
same flags as DDP. Everything DeepSpeed-specific lives here; the loop calls `configure` (refusals before the model
is built), `ZeroRun.optimizer_step` (instead of `step.optimizer_step`) and `check_resume`.

Why DeepSpeed's `MuonWithAuxAdam`, and not our Muon + AdamW combined into one client optimizer (read in
deepspeed 0.19.8 and accelerate 1.16):
- Accelerate's `_prepare_deepspeed` keeps only the last optimizer passed to `prepare`, so one optimizer it is.
- ZeRO-1/2 (`stage_1_and_2.py`) flattens every param group into one fp32 vector and hands the client optimizer
  only this rank's 1-D slice of it, and of its gradient. Our Muon needs each whole matrix and its whole gradient
  (Newton-Schulz), so as a client optimizer it has nothing to orthogonalise. ZeRO-3 slices the same way.
- DeepSpeed does run Muon on whole gradients itself, for parameters tagged `use_muon` when the client optimizer is
  a `MuonWithAuxAdam` (ZeRO-1/2: in `get_flat_partition` at the accumulation boundary; ZeRO-3 and offload: in
  the ZeRO optimizer's `step`), and hands the client optimizer the orthogonalised update as the slice's gradient.
  So a combined client optimizer of ours could only be a copy of `MuonWithAuxAdam`. We use it, configured as
  nanochat: `ns_method="standard"` (its quintic Newton-Schulz in bf16 with nanochat's coefficients, 5 steps),
  Nesterov, lr scale max(1, rows/cols)^0.5, no weight decay on the matrices, and every parameter tagged by us
  (DeepSpeed's own tagging, by `ndim`, would put wte under Muon).
- AdamW for wte and lm_head is torch's own `AdamW` as `MuonWithAuxAdam`'s auxiliary optimizer, with nanochat's
  groups, betas and eps: elementwise, so running on slices changes nothing.

What we do ourselves, because DeepSpeed's version differs from nanochat's step:
- clipping: DeepSpeed's `gradient_clipping` clips the norm of what the ZeRO optimizer holds at `step`, which
  for the Muon groups is the orthogonalised update (deepspeedai/DeepSpeed#8439 on GitHub). nanochat clips the raw
  gradient before Muon's momentum. So DeepSpeed's is kept at 0 and `clip_raw_gradients` scales the averaged raw
  gradient shards DeepSpeed holds between the last backward and the Muon update (see `_raw_gradient_shards`).
- schedules: LR and Muon momentum are set on the client optimizer's groups every step (`optim.apply_schedules`);
  ZeRO-3 caches Muon's momentum at init (`muon_beta`), so it is written there too.
- the loss is divided by the accumulation steps here, as in `step.optimizer_step`, not by DeepSpeed.
- precision: weights, gradients and their reduction stay fp32, the forward runs under bf16 autocast (CUDA), as
  under DDP: DeepSpeed's `torch_autocast` with no lower-precision modules; its `bf16` mode (bf16 weights, fp32
  master copies) and fp16 are refused. One difference from DDP: wte is fp32 here (nanochat keeps it in bf16 on
  CUDA), since DeepSpeed keeps fp32 master weights anyway; the residual stream, wte's output, is then fp32 too.

ZeRO-3 and the model's forward: DeepSpeed gathers a module's own weights in that module's forward hooks, but
GPT.forward reads lm_head.weight, and each block's forward its Linears' weights (`ops.linear`), without calling
those Linears. ZeRO-3 finds such a weight when it is read (its `ZeROOrderedDict` getter gathers it and registers
it with the module whose forward is running, which then gathers it in its own hooks from then on); the engine
arms that discovery in a forward pre-hook on the model. So every forward must call the model, `model(x)`, even
outside the engine (sampling, CORE): a call of `model.forward(x)` skips the model's hooks, and lm_head.weight is
met as ZeRO-3's empty placeholder.

DeepSpeed's Muon, the gradient buffers the clip reads and the state layout are internals of 0.19.x: the `deepspeed`
extra pins it, and tests/test_deepspeed.py (2 gloo ranks on CPU) checks every weight over three steps of each
config against our single-process step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.common import UserError
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.phase_timer import DISABLED, PhaseTimer
from nanochat_unsloth.train.step import NonFiniteLoss, StepResult

SUPPORTED_STAGES = (2, 3)
CONFIG_DIR_HINT = "configs/deepspeed/"  # where our DeepSpeed JSON configs live (the accelerate yamls point there)


def requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this launcher variable in every worker."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs(device_type: str) -> dict:
    """`Accelerator(**...)` arguments for `--device_type`: `cpu=` as without DeepSpeed, and what a DeepSpeed run
    on a CPU-only machine (tests) needs; call it just before building the Accelerator.

    Accelerate 1.16 runs DeepSpeed only without `cpu=True`, and then finds no distributed backend for the CPU
    (its MULTI_CPU path excludes DeepSpeed): DeepSpeed itself falls back to gloo, but Accelerate would count one
    process on every rank. Naming gloo makes it count the ranks. `_cpu_only_settings` runs here too: DeepSpeed
    starts its process group (and would compile its shared-memory op) while the Accelerator is built."""
    if not requested():
        return {"cpu": device_type == "cpu"}
    if device_type != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise UserError(f"--device_type {device_type} with a DeepSpeed accelerate config: DeepSpeed runs on "
                        f"{'the GPUs' if torch.cuda.is_available() else 'the CPU'} here; drop --device_type or "
                        "use another accelerate config")
    if device_type == "cuda":
        return {"cpu": False}
    from accelerate.utils import InitProcessGroupKwargs

    _cpu_only_settings()
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


# -----------------------------------------------------------------------------
# The DeepSpeed config: refused settings, and the values the run fills in


def _get(config: dict, dotted: str, default=None):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _enabled(value) -> bool:
    return str(value).lower() == "true"


def _offload_device(config: dict, what: str) -> str:
    device = _get(config, f"zero_optimization.{what}.device", "none")
    return "none" if device in (None, "auto") else str(device).lower()


# The allow-list (read in deepspeed 0.19.8 and accelerate 1.16): every key a DeepSpeed config may hold, per block.
# DeepSpeed silently honours keys a deny-list never heard of (an old alias, a deprecated spelling, a new feature),
# so a key on no list is refused. Per key: ANY (harmless for the step, the data and the checkpoint: logging,
# profiling, communication and gather tuning; or checked by name in check_config; or owned by fill_config), a dict
# (a nested block, walked the same way), Only (DeepSpeed's default is harmless, any other value is not), or Refused.
ANY = None


@dataclass(frozen=True)
class Only:
    values: tuple
    why: str


@dataclass(frozen=True)
class Refused:
    why: str
    fix: str


_GATHER_ON_SAVE = Only((False, "auto"), "gathers the whole model into rank 0's memory when it is saved (every rank "
                                        "must write only its own partition)")
_ZERO_PLUS_PLUS = "quantizes ZeRO's communication (ZeRO++), which DDP's fp32 reduction does not"
_FP32 = ("fp32", "float32", "torch.float32", "float")

ALLOWED = {
    # filled from the flags by fill_config
    "train_batch_size": ANY, "train_micro_batch_size_per_gpu": ANY, "gradient_accumulation_steps": ANY,
    # checked by name in check_config
    "optimizer": ANY, "scheduler": ANY, "gradient_clipping": ANY, "zero_force_ds_cpu_optimizer": ANY,
    "communication_data_type": ANY, "managed_gradient_accumulation": ANY, "datastates_ckpt": ANY,
    "fp16": {"enabled": ANY,
             "auto_cast": Only((False,), "casts the forward's floating-point inputs to fp16, even with fp16 off")},
    "bf16": {"enabled": ANY},
    "bfloat16": Refused("is DeepSpeed's old name of the bf16 block, read when \"bf16\" is absent",
                        "remove it (bf16 stays {\"enabled\": false})"),
    "torch_autocast": {"enabled": ANY, "lower_precision_safe_modules": ANY,
                       "dtype": Only(("bfloat16", "bf16", "torch.bfloat16"),
                                     "is not nanochat's bf16 autocast (fp16 autocast has no loss scaling here)")},
    "data_types": {"grad_accum_dtype": Only(_FP32, "accumulates the micro-steps' gradients in lower precision "
                                                   "than the fp32 weights")},
    # used only under sequence parallelism (which no key here turns on), in place of communication_data_type
    "seq_parallel_communication_data_type": Only(_FP32, "averages the gradients in lower precision than DDP (fp32) "
                                                        "under sequence parallelism"),
    "dump_state": ANY,  # rank 0 prints the engine's settings
    "gradient_allreduce_op": Only(("mean",), "sums the gradients over the ranks instead of averaging them"),
    "prescale_gradients": Only((False,), "divides the gradients before their reduction, not after as checked here"),
    "gradient_predivide_factor": Only((1, 1.0), "divides the gradients before their reduction, not after as checked "
                                                "here"),
    "checkpoint": {"tag_validation": ANY, "writer": ANY, "use_node_local_storage": ANY,
                   "load_universal": Only((False,), "loads DeepSpeed's universal checkpoint instead of the run's own, "
                                                    "which --resume checks")},
    "zero_optimization": {
        "stage": ANY, "reduce_scatter": ANY,
        "overlap_comm": ANY, "contiguous_gradients": ANY, "reduce_bucket_size": ANY, "allgather_bucket_size": ANY,
        # ZeRO-3's gather tuning, under both the names DeepSpeed reads
        **{name: ANY for key in ("prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
                                 "max_live_parameters", "max_reuse_distance") for name in (key, "stage3_" + key)},
        "stage3_gather_16bit_weights_on_model_save": _GATHER_ON_SAVE, "gather_16bit_weights_on_model_save":
            _GATHER_ON_SAVE, "stage3_gather_fp16_weights_on_model_save": _GATHER_ON_SAVE,
        "zero_quantized_weights": Only((False,), _ZERO_PLUS_PLUS), "zero_quantized_gradients": Only((False,),
                                                                                                    _ZERO_PLUS_PLUS),
        "zero_quantized_nontrainable_weights": Only((False,), _ZERO_PLUS_PLUS),
        "zero_hpz_partition_size": Only((1,), _ZERO_PLUS_PLUS),
        "cpu_offload": Only((False,), "is the deprecated spelling of offload_optimizer, which bypasses its checks"),
        "cpu_offload_param": Only((False,), "is the deprecated spelling of offload_param, which bypasses its checks"),
        "zenflow": Refused("applies part of the gradient only every few steps (ZenFlow's stale updates)",
                           "remove it"),
        "offload_optimizer": {
            "device": ANY, "pin_memory": ANY, "buffer_count": ANY, "nvme_path": ANY,
            "ratio": Only((1, 1.0), "runs part of the update in a GPU AdamW copy (partial offload)"),
            "super_offload": Only((False,), "runs the CPU update asynchronously (SuperOffload)")},
        "offload_param": {"device": ANY, "pin_memory": ANY, "buffer_count": ANY, "buffer_size": ANY,
                          "max_in_cpu": ANY, "nvme_path": ANY},
        # the step stays bitwise nanochat's with these at non-default values (tests/test_deepspeed.py's tuned
        # configs): ZeRO-3's sub-groups only batch the per-weight updates (Muon runs on each whole gradient); a
        # single-owner gradient slice reduced to its owner instead of all-reduced (ZeRO-2); plain F.linear
        # instead of DeepSpeed's under ZeRO-3; unused in deepspeed 0.19.8 (allgather_partitions) or only an
        # assert (ignore_unused_parameters), a warning (log_trace_cache_warnings), or Module.apply inside a
        # zero.Init this trainer never enters (override_module_apply)
        **{key: ANY for key in ("sub_group_size", "use_multi_rank_bucket_allreduce", "memory_efficient_linear",
                                "allgather_partitions", "ignore_unused_parameters", "log_trace_cache_warnings",
                                "override_module_apply")},
        "round_robin_gradients": Only((False,), "reorders ZeRO-2's partitions, and a checkpoint saved under the "
                                                "other value resumes silently wrong (its fp32 partition is copied "
                                                "by position)"),
        "load_from_fp32_weights": Only((True,), "rebuilds ZeRO-2's fp32 weights on --resume from the model's "
                                                "instead of the checkpoint's fp32 partition (no resume test covers "
                                                "it)"),
        "pipeline_loading_checkpoint": Only((False,), "loads the checkpoint rank after rank, which DeepSpeed "
                                                      "supports under ZeRO-3 only and chains by local rank (a "
                                                      "multi-node --resume waits on a rank that never answers)"),
        "legacy_stage1": Only((False,), "is ZeRO-1 of DeepSpeed before 0.5.9, which DeepSpeed refuses at start"),
    },
    # logging and profiling (Accelerate sets steps_per_print; zero_allow_untested_optimizer at prepare)
    **{key: ANY for key in ("steps_per_print", "wall_clock_breakdown", "memory_breakdown", "comms_logger",
                            "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
                            "zero_allow_untested_optimizer")},
}
SUPPORTED_SETTINGS = "docs/MULTI_GPU.md#deepspeed-zero"


def _is(value, allowed: tuple) -> bool:
    return any(value == a and type(value) is not bool or value is a or str(value).lower() == str(a).lower()
               for a in allowed)


def _check_keys(block: dict, allowed: dict, prefix: str, refuse) -> None:
    """Refuse any key of `block` (at `prefix`) that `allowed` does not allow, by its dotted name."""
    for key, value in block.items():
        dotted, rule = prefix + key, allowed.get(key, "unknown")
        if rule == "unknown":
            refuse(dotted, "is not a setting this trainer has checked to keep nanochat's step",
                   f"remove it (supported settings: {SUPPORTED_SETTINGS})")
        elif isinstance(rule, Refused):
            refuse(dotted, rule.why, rule.fix)
        elif isinstance(rule, Only) and not _is(value, rule.values):
            refuse(f"{dotted}: {json.dumps(value)}", rule.why, f"remove it or set {json.dumps(rule.values[0])}")
        elif isinstance(rule, dict) and isinstance(value, dict):
            _check_keys(value, rule, dotted + ".", refuse)


def check_config(config: dict, source: str, *, optimizer: str = "muon", fp8: bool = False,
                 cuda_graphs: str = "auto") -> None:
    """Refuse, in one line naming the setting, what would change nanochat's step math, its data or its checkpoint,
    or is not supported: the named checks below, then every key against the allow-list `ALLOWED`.

    `config` is the DeepSpeed config as Accelerate holds it after building the Accelerator (its "auto" values
    not yet filled); `source` names the file for the message."""

    def refuse(setting: str, why: str, fix: str):
        raise UserError(f"DeepSpeed config {source}: {setting} {why}; {fix}")

    for block in ("optimizer", "scheduler"):
        if block in config:
            refuse(f"'{block}' block", "is not used: the run builds nanochat's Muon + AdamW and its schedules itself",
                   f"remove the '{block}' block")
    if _enabled(_get(config, "fp16.enabled", False)):
        refuse("fp16.enabled: true", "trains in fp16 with loss scaling, not nanochat's bf16 autocast",
               "set fp16.enabled false")
    if _enabled(_get(config, "bf16.enabled", False)):
        refuse("bf16.enabled: true", "keeps bf16 weights with fp32 master copies, not the fp32 weights under bf16 "
                                     "autocast of DDP", "set bf16 {\"enabled\": false} (the run turns on "
                                                        "torch_autocast bf16 itself, as in " + CONFIG_DIR_HINT + ")")
    clip = config.get("gradient_clipping", 0.0)
    if clip not in ("auto", None) and float(clip) != 0.0:
        refuse(f"gradient_clipping: {clip}", "clips the orthogonalised Muon update, not the raw gradient as nanochat "
                                             "(deepspeedai/DeepSpeed#8439 on GitHub)",
               "set it to 0 and use --grad_clip (the run clips the raw gradient itself)")
    stage = _get(config, "zero_optimization.stage", 0)
    if stage not in SUPPORTED_STAGES:
        refuse(f"zero_optimization.stage: {stage}", "is not supported (ZeRO-2 and ZeRO-3 are)",
               "use stage 2 or 3, or configs/accelerate/multi_gpu.yaml (DDP with sharded AdamW moments) for ZeRO-1")
    if stage == 3 and _get(config, "zero_optimization.reduce_scatter", True) is not False:
        refuse("zero_optimization.reduce_scatter", "must be false under ZeRO-3: DeepSpeed's Muon needs whole "
                                                   "gradients", "set \"reduce_scatter\": false")
    opt_offload, param_offload = _offload_device(config, "offload_optimizer"), _offload_device(config, "offload_param")
    for what, device in (("offload_optimizer", opt_offload), ("offload_param", param_offload)):
        if device not in ("none", "cpu"):
            refuse(f"zero_optimization.{what}.device: {device}", "is not supported (none or cpu are)",
                   "use cpu or none")
    if param_offload == "cpu" and stage != 3:
        refuse("zero_optimization.offload_param", "needs ZeRO-3", "remove it or use stage 3")
    if opt_offload == "cpu" and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        refuse("zero_force_ds_cpu_optimizer", "is not false: with offload_optimizer, Accelerate would silently replace "
                                              "Muon + AdamW by DeepSpeedCPUAdam over every parameter",
               "set \"zero_force_ds_cpu_optimizer\": false")
    comm = config.get("communication_data_type")
    if comm not in (None, "auto") and str(comm).lower() != "fp32":
        refuse(f"communication_data_type: {comm}", "averages the gradients in lower precision than DDP (fp32)",
               "remove it or set fp32")
    autocast = config.get("torch_autocast", {})
    if _enabled(autocast.get("enabled", False)) and autocast.get("lower_precision_safe_modules") != []:
        refuse("torch_autocast.lower_precision_safe_modules", "is not []: DeepSpeed would then reduce every Linear's "
                                                              "gradient in bf16 (DDP reduces fp32)",
               "set \"lower_precision_safe_modules\": []")
    if config.get("managed_gradient_accumulation", True) is not True:
        refuse("managed_gradient_accumulation", "must be left at its default (true): the run marks the "
                                                "accumulation boundary itself", "remove it")
    # checkpoint/store.py hashes the shards, writes meta.json, renames the directory into place and prunes the
    # older checkpoints as soon as save_state returns on every rank: DeepSpeed's other writers (FastPersist, its
    # decoupled and mock writers, DataStates) may still be writing then, write nothing, or write on node-local
    # disks rank 0 cannot see, so a partial checkpoint would be trusted and the good ones deleted
    writers = (("checkpoint.writer", _get(config, "checkpoint.writer") is not None),
               ("datastates_ckpt", config.get("datastates_ckpt", False) is not False),
               ("checkpoint.use_node_local_storage", _enabled(_get(config, "checkpoint.use_node_local_storage"))))
    for setting, on in writers:
        if on:
            refuse(setting, "changes how DeepSpeed writes its checkpoint files, which must all be on one shared disk "
                            "when save_state returns", f"remove {setting} (the run uses DeepSpeed's default writer)")
    _check_keys(config, ALLOWED, "", refuse)
    if optimizer != "muon":
        raise UserError(f"--optimizer {optimizer}: not supported under DeepSpeed (DeepSpeed's Muon with AdamW is); "
                        "use --optimizer muon or another accelerate config")
    if fp8:
        raise UserError("--fp8 is not supported under DeepSpeed (not tested); drop --fp8 or use DDP")
    if cuda_graphs == "on":
        raise UserError("--cuda_graphs on is not supported under DeepSpeed (one process, whole-model graph only); "
                        "drop it")


def fill_config(config: dict, source: str, *, device_batch_size: int, grad_accum: int, world_size: int,
                on_cuda: bool) -> None:
    """The values the run owns: batch sizes and accumulation (from the flags), DeepSpeed's clipping off, and
    precision as under DDP (bf16 autocast over fp32 weights on CUDA; fp32 on a CPU-only machine)."""
    owned = {"train_micro_batch_size_per_gpu": device_batch_size, "gradient_accumulation_steps": grad_accum,
             "train_batch_size": device_batch_size * grad_accum * world_size}
    for key, value in owned.items():
        if config.get(key, "auto") not in ("auto", value):
            raise UserError(f"DeepSpeed config {source}: {key}: {config[key]} disagrees with the flags ({value}: "
                            "--device_batch_size, --total_batch_size and the process count); set it to \"auto\"")
        config[key] = value
    config["gradient_clipping"] = 0.0
    config["torch_autocast"] = {"enabled": on_cuda, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def config_source() -> str:
    """The DeepSpeed JSON `accelerate launch` passed on (a launcher variable), for messages."""
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "") or "(the accelerate config's deepspeed_config)"


# -----------------------------------------------------------------------------
# The client optimizer


def _muon_with_aux_adam():
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    return MuonWithAuxAdam


def build_client_optimizer(model, *, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                           matrix_lr: float = 0.02, weight_decay: float = 0.0, fused: bool = False,
                           **_ignored) -> torch.optim.Optimizer:
    """DeepSpeed's MuonWithAuxAdam with nanochat's groups: AdamW [lm_head, wte] (torch AdamW as the auxiliary
    optimizer), Muon over every block matrix. Every parameter is tagged `use_muon`; every group records its
    `initial_lr`. wte becomes fp32 (module doc). Pass the unwrapped model, before `accelerator.prepare`."""
    model.transformer.wte.float()
    matrix_params = list(model.transformer.h.parameters())
    adam = optim.adamw_groups(model, embedding_lr, unembedding_lr)
    assert len(matrix_params) + sum(len(g["params"]) for g in adam) == len(list(model.parameters())), \
        "a parameter is in no optimizer group"
    for group in adam:
        group.update(optim.ADAMW_SETTINGS, weight_decay=weight_decay, use_muon=False)
    muon = dict(params=matrix_params, lr=matrix_lr, momentum=optim.MUON_MOMENTUM, weight_decay=0.0,
                ns_method="standard", use_muon=True)
    for group in (*adam, muon):
        for p in group["params"]:
            p.use_muon = group["use_muon"]
    opt = _muon_with_aux_adam()([*adam, muon], adam_optimizer=torch.optim.AdamW,
                                adam_optimizer_kwargs=dict(fused=fused, foreach=False))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def client_optimizer_for(accelerator, model, **optimizer_kwargs) -> torch.optim.Optimizer:
    """`build_client_optimizer` for this run: fused AdamW where its slices live on the GPU."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    on_gpu = accelerator.device.type == "cuda" and _offload_device(config, "offload_optimizer") == "none"
    return build_client_optimizer(model, fused=on_gpu, **optimizer_kwargs)


# -----------------------------------------------------------------------------
# Clipping the raw gradient as nanochat does


def _zero2_shards(opt) -> tuple[list[Tensor], list[Tensor]]:
    """ZeRO-2 without offload, after the last backward of a step (marked as no boundary, so Muon has not run):
    `all_grad_tensors[g]` holds the accumulated averaged gradient of each parameter of this rank's partition of
    group g, whole (a Muon matrix that straddles two partitions is reduced whole to both). The views count each
    element on exactly one rank: this rank's range, as `get_flat_partition` cuts it."""
    views, owned = [], []
    for g, params in enumerate(opt.params_in_partition):
        grads = opt.all_grad_tensors.get(g)
        if not params or grads is None:
            continue
        rank = dist.get_rank(group=opt.real_dp_process_group[g])
        size = int(opt.partition_size[g])
        for p, grad in zip(params, grads):
            pid = opt.get_param_id(p)
            start = int(opt.grad_start_offset[g][rank][pid])
            dest = int(opt.grad_partition_insertion_offset[g][rank][pid])
            views.append(grad.reshape(-1).narrow(0, start, min(p.numel() - start, size - dest)))
            owned.append(grad)
    return views, owned


def _raw_gradient_shards(opt, stage: int, offload: bool) -> tuple[list[Tensor], list[Tensor]]:
    """(disjoint shards of the step's averaged raw gradient, this rank's tensors to scale), between the last
    backward and the Muon update. Offload: the fp32 gradient partitions on the CPU, filled at the boundary
    backward; ZeRO-3: the gradient partitions (`averaged_gradients`)."""
    if offload:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()  # the device-to-host gradient copies are asynchronous
        flat = opt.single_partition_of_fp32_groups if stage == 2 else opt.fp32_partitioned_groups_flat
        parts = [t.grad for t in flat if t.grad is not None]
        return parts, parts
    if stage == 2:
        return _zero2_shards(opt)
    parts = [t for g in sorted(opt.averaged_gradients) for t in opt.averaged_gradients[g] or ()]
    return parts, parts


def clip_raw_gradients(opt, stage: int, offload: bool, max_norm: float, device) -> Tensor:
    """torch.nn.utils.clip_grad_norm_'s rule on the averaged raw gradient DeepSpeed holds sharded: the global
    norm (a sum of squares all-reduced over ranks), then every gradient times min(1, max_norm / (norm + 1e-6)).
    Returns the pre-clip norm (a tensor: no host sync). `max_norm` 0: report only."""
    views, owned = _raw_gradient_shards(opt, stage, offload)
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for v in views:
        sq += torch.linalg.vector_norm(v, dtype=torch.float32).to(device) ** 2
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for t in owned:
            t.mul_(coef.to(t.device))
    return norm


# -----------------------------------------------------------------------------
# The run


@dataclass
class ZeroRun:
    """A DeepSpeed run's settings; its `optimizer_step` replaces `step.optimizer_step`."""

    stage: int
    offload_optimizer: bool
    offload_param: bool
    world_size: int

    @property
    def partitioned_weights(self) -> bool:
        """ZeRO-3: no rank holds whole weights, so a forward (sampling) is a collective of every rank."""
        return self.stage == 3

    def describe(self) -> dict:
        return {"stage": self.stage, "offload_optimizer": self.offload_optimizer,
                "offload_param": self.offload_param, "world_size": self.world_size}

    def optimizer_step(self, accelerator, model, raw_model, optimizers, next_batch: Callable[[], tuple[Tensor, Tensor]],
                       grad_accum: int, step: int, num_iterations: int, *, grad_clip: float = 1.0,
                       warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0,
                       global_mean: Callable[[Tensor], float] | None = None, timer: PhaseTimer = DISABLED,
                       cuda_graphs: bool = False) -> StepResult:
        """`step.optimizer_step` for a DeepSpeed engine `model`: the same micro-batches, loss scaling, clipping,
        schedules and non-finite check; DeepSpeed reduces, runs Muon and AdamW on its shards, and gathers."""
        engine = model
        zero_opt = engine.optimizer
        # ZeRO-2 runs Muon in the boundary backward's epilogue: its last backward is marked as none, and the
        # boundary is finalized below, after the clip (ZeRO-3 and offload run Muon in step(), after it)
        late_boundary = self.stage == 2 and not self.offload_optimizer
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro_step in range(grad_accum):
            last = micro_step == grad_accum - 1
            x, y = next_batch()
            timer.mark("data")
            engine.set_gradient_accumulation_boundary(last and not late_boundary)
            loss = engine(x, y)  # under DeepSpeed's torch_autocast on CUDA (fill_config)
            loss_sum += loss.detach()
            # normalised here, as in step.optimizer_step; DeepSpeed does not divide again
            engine.backward(loss / grad_accum, scale_wrt_gas=False)
            timer.mark("fwd_bwd_last_with_grad_sync" if last else "fwd_bwd")
        mean_loss = loss_sum / grad_accum
        global_loss = None
        if global_mean is not None:
            global_loss = global_mean(mean_loss)
            if not math.isfinite(global_loss):
                raise NonFiniteLoss(f"non-finite loss {global_loss} at step {step}")
        timer.mark("loss_reduce_host_sync")
        grad_norm = None
        if grad_clip > 0:
            grad_norm = clip_raw_gradients(zero_opt, self.stage, self.offload_optimizer, grad_clip, accelerator.device)
        timer.mark("clip")
        client = zero_opt.optimizer
        lrm = optim.apply_schedules([client], step, num_iterations, warmup_ratio=warmup_ratio,
                                    warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac)
        if self.stage == 3:
            zero_opt.muon_beta = optim.muon_momentum(step)  # ZeRO-3 reads Muon's momentum from here, not the group
        if late_boundary:
            engine.set_gradient_accumulation_boundary(True)
            zero_opt.finalize_gradient_accumulation_boundary()  # Muon, on the clipped gradients
        engine.step()
        timer.mark("optimizer_MuonWithAuxAdam")
        return StepResult(loss=mean_loss, grad_norm=grad_norm, lrm=lrm, global_loss=global_loss)


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage a DeepSpeed run's config names (None without DeepSpeed), which train/resolve.py's compile
    mode follows; `configure` refuses an unsupported one."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(_get(accelerator.state.deepspeed_plugin.deepspeed_config, "zero_optimization.stage", 0))


def configure(accelerator, cfg, grad_accum: int) -> ZeroRun | None:
    """None unless Accelerate runs DeepSpeed. Otherwise refuse unsupported settings (`check_config`), fill the
    values the run owns (`fill_config`), and return the run. Call before the model is built."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    config, source = plugin.deepspeed_config, config_source()
    check_config(config, source, optimizer=cfg.optimizer, fp8=cfg.fp8, cuda_graphs=cfg.cuda_graphs)
    fill_config(config, source, device_batch_size=cfg.device_batch_size, grad_accum=grad_accum,
                world_size=accelerator.num_processes, on_cuda=accelerator.device.type == "cuda")
    return ZeroRun(stage=int(_get(config, "zero_optimization.stage")),
                   offload_optimizer=_offload_device(config, "offload_optimizer") == "cpu",
                   offload_param=_offload_device(config, "offload_param") == "cpu",
                   world_size=accelerator.num_processes)


def _cpu_only_settings() -> None:
    """A CPU-only machine runs DeepSpeed for the tests, as the rest of this project: eagerly, as the CPU path of
    `optim.zeropower_via_newtonschulz5` does (DeepSpeed's Muon is torch.compile'd, which on a CPU needs a C++
    toolchain and a minute per process); and without the shared-memory all-reduce DeepSpeed would compile on
    first use, which only its inference all-reduce uses."""
    import deepspeed.ops

    torch.compiler.set_stance("force_eager")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_resume(meta: RunMeta, run: ZeroRun | None, resume_dir: "os.PathLike | str") -> None:
    """A DeepSpeed checkpoint resumes under the same ZeRO stage and process count only, and a checkpoint of
    another kind (DDP, FSDP2, one process) does not resume under DeepSpeed: DeepSpeed's files hold its own flat
    partitions of the weights and of MuonWithAuxAdam's states, per rank, which only a DeepSpeed engine of the
    same shape loads. Its weights leave through `convert` (zero-to-fp32, then `--from-nanochat` with a fresh
    optimizer state), which each refusal names."""
    saved = meta.deepspeed
    if saved is None and run is None:
        return
    where = f"--resume: cannot resume {resume_dir}"
    if saved is None:
        raise UserError(f"{where}: it was not written by a DeepSpeed run and this run uses DeepSpeed; resume it "
                        "with the accelerate config it was trained with (not a DeepSpeed one)")
    same = (f"launch with a ZeRO-{saved['stage']} config (configs/accelerate/deepspeed_zero{saved['stage']}*.yaml) "
            f"and --num_processes {saved['world_size']}")
    move = ("or take its weights elsewhere with `nanochat-unsloth convert` and `convert --from-nanochat` "
            "(a fresh optimizer state)")
    if run is None:
        raise UserError(f"{where}: it is DeepSpeed ZeRO-{saved['stage']}'s on {saved['world_size']} processes and "
                        f"this run does not use DeepSpeed; {same}, {move}")
    now = run.describe()
    if (saved["stage"], saved["world_size"]) != (now["stage"], now["world_size"]):
        raise UserError(f"{where}: it is ZeRO-{saved['stage']} on {saved['world_size']} processes, this run "
                        f"ZeRO-{now['stage']} on {now['world_size']}; {same}, {move}")
