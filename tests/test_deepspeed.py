"""DeepSpeed ZeRO-2 / ZeRO-3 (+ CPU offload) through Accelerate, on CPU: 2 gloo ranks launched with the repo's
configs/accelerate/deepspeed_*.yaml as they are (`accelerate launch`; DeepSpeed's CPU accelerator talks gloo).

- the refusals: every DeepSpeed setting that would change nanochat's step, in one line naming it, and before the
  model is built;
- the step: DeepSpeed's ZeRO-2 and ZeRO-3-with-offload steps against our single-process step
  (tests/deepspeed_e2e.py), with the raw-gradient clipping engaged;
- checkpoints: DeepSpeed's own, each rank writing its partition (no rank gathers a ZeRO-3 weight); saved on
  --save_every and on SIGTERM, `--resume auto` continues a ZeRO-3 run bit-exactly, a run without DeepSpeed refuses
  it in one line, and what `convert` and `eval` read of it (zero-to-fp32) is the gathered weights; a write failing
  on one rank inside DeepSpeed's save stops every rank with one line;
- sampling under ZeRO-3 (every rank runs the forward), in a resumed run before any training forward.

What a CPU cannot show: bf16 autocast, fused AdamW and compiled blocks (CUDA only), NCCL, speed and memory.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.cli import run_main
from nanochat_unsloth.common import EXIT_USER_ERROR, UserError
from nanochat_unsloth.checkpoint import store as ckpt
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.eval.metrics import SAMPLE_PROMPTS
from nanochat_unsloth.train import deepspeed_zero, optim
from nanochat_unsloth.train.__main__ import main as train_main

from cpu_launch import REPO, is_alive, launch_cpu_processes, signal_after_line, start_cpu_processes
from deepspeed_compare import ADAMW_WEIGHTS, ZERO2, ZERO3, ZERO3_OFFLOAD, e2e_argv, largest_gap, load_result
from run_helpers import one_line_error
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir


def _json(name: str) -> dict:
    return json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())


# -----------------------------------------------------------------------------
# Refusals (no process group, no DeepSpeed import)


@pytest.mark.parametrize("change, names", [
    (lambda c: c.update(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}), "'optimizer' block"),
    (lambda c: c.update(scheduler={"type": "WarmupLR"}), "'scheduler' block"),
    (lambda c: c.update(fp16={"enabled": True}), "fp16.enabled"),
    (lambda c: c.update(bf16={"enabled": True}), "bf16.enabled"),
    (lambda c: c.update(gradient_clipping=1.0), "gradient_clipping"),
    (lambda c: c["zero_optimization"].update(stage=1), "zero_optimization.stage"),
    (lambda c: c["zero_optimization"].update(stage=3), "reduce_scatter"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "cpu"}), "zero_force_ds_cpu_optimizer"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "nvme"}), "offload_optimizer.device"),
    (lambda c: c["zero_optimization"].update(offload_param={"device": "cpu"}), "offload_param"),
    (lambda c: c.update(communication_data_type="bf16"), "communication_data_type"),
    (lambda c: c["torch_autocast"].pop("lower_precision_safe_modules"), "lower_precision_safe_modules"),
    (lambda c: c.update(managed_gradient_accumulation=False), "managed_gradient_accumulation"),
    # checkpoint writers that finish after save_state returns: the store hashes every file, writes meta.json,
    # renames the directory and prunes the older checkpoints then, so a writer still writing (FastPersist's
    # "decoupled", DataStates, enabled by its key alone), one that writes nothing ("MOCK") or elsewhere (node-local
    # storage) would have a partial checkpoint trusted and the good ones before it deleted
    (lambda c: c.update(checkpoint={"writer": {"type": "FAST", "decoupled": True}}), "checkpoint.writer"),
    (lambda c: c.update(checkpoint={"writer": {"type": "MOCK"}}), "checkpoint.writer"),
    (lambda c: c.update(datastates_ckpt={}), "datastates_ckpt"),
    (lambda c: c.update(checkpoint={"use_node_local_storage": True}), "checkpoint.use_node_local_storage"),
    # read in deepspeed 0.19.8: each of these changes the step, the data or the checkpoint, and none was refused
    # before the allow-list. "bfloat16" is the bf16 block's old name, read when "bf16" is absent
    (lambda c: (c.pop("bf16"), c.update(bfloat16={"enabled": True})), "bfloat16"),
    # casts the forward's floating-point inputs to fp16 even with fp16.enabled false
    (lambda c: c["fp16"].update(auto_cast=True), "fp16.auto_cast"),
    # fp16 autocast: no loss scaling under ZeRO (fill_config would also overwrite it silently)
    (lambda c: c["torch_autocast"].update(dtype="float16"), "torch_autocast.dtype"),
    # ZeRO-1/2 accumulate the micro-steps' gradients in this dtype when it differs from the weights'
    (lambda c: c.update(data_types={"grad_accum_dtype": "bf16"}), "data_types.grad_accum_dtype"),
    # sums the gradients over ranks instead of averaging them (ZeRO-2; DeepSpeed refuses it under ZeRO-3 only)
    (lambda c: c.update(gradient_allreduce_op="sum"), "gradient_allreduce_op"),
    # ZeRO++: int8 weights in the gathers, quantized gradient all-to-all, a secondary partition of the weights
    (lambda c: c["zero_optimization"].update(zero_quantized_weights=True), "zero_optimization.zero_quantized_weights"),
    (lambda c: c["zero_optimization"].update(zero_quantized_gradients=True),
     "zero_optimization.zero_quantized_gradients"),
    (lambda c: c["zero_optimization"].update(zero_quantized_nontrainable_weights=True),
     "zero_optimization.zero_quantized_nontrainable_weights"),
    (lambda c: c["zero_optimization"].update(zero_hpz_partition_size=2), "zero_optimization.zero_hpz_partition_size"),
    # the deprecated spellings of offload_optimizer / offload_param: DeepSpeed offloads, our checks saw nothing
    (lambda c: c["zero_optimization"].update(cpu_offload=True), "zero_optimization.cpu_offload"),
    (lambda c: c["zero_optimization"].update(stage=3, reduce_scatter=False, cpu_offload_param=True),
     "zero_optimization.cpu_offload_param"),
    # ZenFlow: unimportant gradient columns applied every update_interval steps (stale), CPU steps overlapped
    (lambda c: c["zero_optimization"].update(zenflow={"topk_ratio": 0.1}), "zero_optimization.zenflow"),
    # partial offload (a GPU AdamW copy for part of the update) and SuperOffload (asynchronous CPU Adam)
    (lambda c: (c.update(zero_force_ds_cpu_optimizer=False), c["zero_optimization"].update(
        stage=3, reduce_scatter=False, offload_optimizer={"device": "cpu", "ratio": 0.5})),
     "zero_optimization.offload_optimizer.ratio"),
    (lambda c: (c.update(zero_force_ds_cpu_optimizer=False), c["zero_optimization"].update(
        stage=3, reduce_scatter=False, offload_optimizer={"device": "cpu", "super_offload": True})),
     "zero_optimization.offload_optimizer.super_offload"),
    # a whole-model gather on rank 0 (its three spellings)
    (lambda c: c["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True),
     "zero_optimization.stage3_gather_16bit_weights_on_model_save"),
    (lambda c: c["zero_optimization"].update(gather_16bit_weights_on_model_save=True),
     "zero_optimization.gather_16bit_weights_on_model_save"),
    (lambda c: c["zero_optimization"].update(stage3_gather_fp16_weights_on_model_save=True),
     "zero_optimization.stage3_gather_fp16_weights_on_model_save"),
    (lambda c: c.update(checkpoint={"load_universal": True}), "checkpoint.load_universal"),
    # the average's division moved before the reduction: not the reduction this trainer was checked with
    (lambda c: c.update(prescale_gradients=True), "prescale_gradients"),
    (lambda c: c.update(gradient_predivide_factor=2.0), "gradient_predivide_factor"),
    # ZeRO-2's partitions in another order: a checkpoint resumed under the other value loads its fp32 partition by
    # position; and the load-time keys no resume test covers (fp32 weights rebuilt from the model's; a rank-by-rank
    # load chained by local rank); DeepSpeed's removed ZeRO-1; a lower-precision reduction under sequence parallelism
    (lambda c: c["zero_optimization"].update(round_robin_gradients=True), "zero_optimization.round_robin_gradients"),
    (lambda c: c["zero_optimization"].update(load_from_fp32_weights=False),
     "zero_optimization.load_from_fp32_weights"),
    (lambda c: c["zero_optimization"].update(pipeline_loading_checkpoint=True),
     "zero_optimization.pipeline_loading_checkpoint"),
    (lambda c: c["zero_optimization"].update(legacy_stage1=True), "zero_optimization.legacy_stage1"),
    (lambda c: c.update(seq_parallel_communication_data_type="bf16"), "seq_parallel_communication_data_type"),
    # on no list: refused by the generic line, before the model is built (DeepSpeed itself refuses the removed
    # features only when the engine is built, after it)
    (lambda c: c.update(compression_training={}), "compression_training"),
    (lambda c: c.update(quantize_training={"enabled": True}), "quantize_training"),
    (lambda c: c.update(progressive_layer_drop={"enabled": True}), "progressive_layer_drop"),
    (lambda c: c.update(data_efficiency={"enabled": True}), "data_efficiency"),
    (lambda c: c.update(curriculum_learning={"enabled": True}), "curriculum_learning"),
    (lambda c: c.update(sparse_attention={"mode": "fixed"}), "sparse_attention"),
    (lambda c: c.update(amp={"enabled": True}), "amp"),
    (lambda c: c.update(elasticity={"enabled": True}), "elasticity"),
    (lambda c: c.update(pipeline={"stages": 2}), "pipeline"),
    (lambda c: c.update(tensor_parallel={"autotp_size": 2}), "tensor_parallel"),
    (lambda c: c.update(sequence_parallel_size=2), "sequence_parallel_size"),
    (lambda c: c["zero_optimization"].update(mics_shard_size=2), "zero_optimization.mics_shard_size"),
    (lambda c: c["zero_optimization"].update(elastic_checkpoint=True), "zero_optimization.elastic_checkpoint"),
])
def test_settings_that_change_the_step_or_its_checkpoint_are_refused_in_one_line(change, names):
    config = _json("zero2")
    change(config)
    with pytest.raises(UserError) as e:
        deepspeed_zero.check_config(config, "bad.json")
    message = str(e.value)
    assert names in message and "bad.json" in message and "\n" not in message, message


def test_our_configs_pass_and_the_run_fills_what_it_owns():
    for name in ("zero2", "zero3", "zero3_offload"):
        deepspeed_zero.check_config(_json(name), name)
    # a checkpoint setting that keeps the synchronous default writer passes
    deepspeed_zero.check_config(_json("zero2") | {"checkpoint": {"tag_validation": "Warn"}}, "ok.json")
    for flag, kwargs in (("--optimizer", {"optimizer": "adamw8bit"}), ("--fp8", {"fp8": True}),
                         ("--cuda_graphs", {"cuda_graphs": "on"})):
        with pytest.raises(UserError, match=flag):
            deepspeed_zero.check_config(_json("zero2"), "zero2", **kwargs)
    config = _json("zero3")
    deepspeed_zero.fill_config(config, "zero3", device_batch_size=4, grad_accum=2, world_size=8, on_cuda=False)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (4, 2, 64, 0.0)
    assert config["torch_autocast"]["enabled"] is False  # fp32 on a CPU-only machine, as the loop without DeepSpeed
    config = _json("zero2") | {"train_micro_batch_size_per_gpu": 3}
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu"):
        deepspeed_zero.fill_config(config, "zero2", device_batch_size=4, grad_accum=2, world_size=8, on_cuda=True)


GENERIC = "is not a setting this trainer has checked to keep nanochat's step; remove it (supported settings: " \
          "docs/MULTI_GPU.md#deepspeed-zero)"


@pytest.mark.parametrize("change, dotted", [
    (lambda c: c.update(some_future_option=True), "some_future_option"),
    (lambda c: c["zero_optimization"].update(some_future_option=1), "zero_optimization.some_future_option"),
    (lambda c: c["zero_optimization"]["offload_optimizer"].update(some_future_option=1),
     "zero_optimization.offload_optimizer.some_future_option"),
    (lambda c: c["torch_autocast"].update(some_future_option=1), "torch_autocast.some_future_option"),
    (lambda c: c["bf16"].update(bf16_master_weights_and_grads=True), "bf16.bf16_master_weights_and_grads"),
    (lambda c: c.update(checkpoint={"some_future_option": 1}), "checkpoint.some_future_option"),
])
def test_a_setting_on_no_list_is_refused_generically_by_its_dotted_name(change, dotted):
    config = _json("zero3_offload")
    change(config)
    with pytest.raises(UserError) as e:
        deepspeed_zero.check_config(config, "new.json")
    assert str(e.value) == f"DeepSpeed config new.json: {dotted} {GENERIC}"


def test_every_harmless_setting_on_the_allow_list_passes():
    """Each key the allow-list calls harmless, at a typical value, in our zero3_offload config (and the
    value-restricted keys at their allowed values); then the same keys in the config the real launch path holds."""
    config = _json("zero3_offload")
    config.update(steps_per_print=100, wall_clock_breakdown=True, memory_breakdown=False,
                  comms_logger={"enabled": True, "verbose": False}, flops_profiler={"enabled": True, "profile_step": 2},
                  tensorboard={"enabled": True, "output_path": "/tmp/tb"}, wandb={"enabled": False},
                  csv_monitor={"enabled": True, "output_path": "/tmp/csv"}, comet={"enabled": False},
                  zero_allow_untested_optimizer=True, communication_data_type="fp32", managed_gradient_accumulation=True,
                  gradient_allreduce_op="mean", prescale_gradients=False, gradient_predivide_factor=1.0,
                  data_types={"grad_accum_dtype": "fp32"}, checkpoint={"tag_validation": "Fail", "load_universal": False})
    config["fp16"].update(auto_cast=False)
    config["zero_optimization"].update(
        overlap_comm=False, contiguous_gradients=False, reduce_bucket_size=5e8, allgather_bucket_size=5e8,
        stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5, stage3_model_persistence_threshold=1e9,
        stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9, stage3_gather_16bit_weights_on_model_save=False,
        zero_quantized_weights=False, zero_quantized_gradients=False, zero_quantized_nontrainable_weights=False,
        zero_hpz_partition_size=1, round_robin_gradients=False, load_from_fp32_weights=True,
        pipeline_loading_checkpoint=False, legacy_stage1=False)
    config["zero_optimization"].update(TUNED_ZERO2 | TUNED_ZERO3)  # the step's own check uses these values
    config.update(TUNED_TOP)
    config["zero_optimization"]["offload_optimizer"].update(buffer_count=4, ratio=1.0, super_offload=False)
    config["zero_optimization"]["offload_param"].update(buffer_count=5, buffer_size=1e8, max_in_cpu=1e9)
    deepspeed_zero.check_config(config, "tuned.json")
    # ZeRO-3's tuning keys under their names without the stage3_ prefix (DeepSpeed reads both)
    unprefixed = _json("zero3")
    unprefixed["zero_optimization"].update(prefetch_bucket_size=5e7, param_persistence_threshold=0,
                                           model_persistence_threshold=1e9, max_live_parameters=1e9,
                                           max_reuse_distance=1e9)
    deepspeed_zero.check_config(unprefixed, "unprefixed.json")


def test_the_config_as_accelerate_holds_it_passes_before_and_after_the_run_fills_it(tmp_path, monkeypatch):
    """Accelerate 1.16 adds keys to the config it holds (steps_per_print, the fp16/bf16 blocks while the Accelerator
    is built; zero_allow_untested_optimizer and the batch keys at prepare): none may be refused, and a config
    checked again after fill_config still passes."""
    from accelerate.utils import DeepSpeedPlugin

    for name in ("zero2", "zero3", "zero3_offload"):
        config = _json(name)
        del config["fp16"], config["bf16"]  # Accelerate inserts them itself
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
        plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=False)
        plugin.set_mixed_precision("no")
        held = plugin.deepspeed_config
        assert "steps_per_print" in held and held["bf16"] == {"enabled": False}, held
        deepspeed_zero.check_config(held, name)
        deepspeed_zero.fill_config(held, name, device_batch_size=4, grad_accum=2, world_size=2, on_cuda=True)
        held["zero_allow_untested_optimizer"] = True  # what `_prepare_deepspeed` adds for a torch optimizer
        deepspeed_zero.check_config(held, name)


def test_a_checkpoint_resumes_only_under_its_own_zero_stage_and_process_count():
    zero3 = deepspeed_zero.ZeroRun(stage=3, offload_optimizer=False, offload_param=False, world_size=2)
    deepspeed_zero.check_resume(RunMeta(deepspeed=zero3.describe()), zero3, "ckpt")
    deepspeed_zero.check_resume(RunMeta(deepspeed=None), None, "ckpt")
    move = "`nanochat-unsloth convert` and `convert --from-nanochat`"
    for meta, run, says in ((RunMeta(deepspeed=zero3.describe()), None, "DeepSpeed ZeRO-3's on 2 processes"),
                            (RunMeta(), zero3, "not written by a DeepSpeed run"),
                            (RunMeta(deepspeed=zero3.describe() | {"world_size": 4}), zero3, "ZeRO-3 on 4 processes")):
        with pytest.raises(UserError, match=says) as e:
            deepspeed_zero.check_resume(meta, run, "runs/d2/step_000002")
        message = str(e.value)
        assert message.startswith("--resume: cannot resume runs/d2/step_000002: ") and "\n" not in message, message
        # the fix: the checkpoint's own DeepSpeed config and process count, or its weights carried over by convert
        assert (move in message) == (meta.deepspeed is not None), message
        if meta.deepspeed is not None:
            assert "deepspeed_zero3*.yaml) and --num_processes " + str(meta.deepspeed["world_size"]) in message


def test_muon_momentum_warms_up_through_accelerates_optimizer_wrapper():
    """nanochat ramps Muon's momentum 0.85 -> 0.95 over 300 steps. The loop's optimizers are Accelerate's
    AcceleratedOptimizer wrappers, which `apply_schedules` must see through (it did not: momentum stayed 0.95)."""
    from accelerate import Accelerator

    from nanochat_unsloth.model.build import build_model
    from nanochat_unsloth.model.gpt import GPTConfig

    model = build_model(GPTConfig(sequence_len=16, vocab_size=65, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), seed=0)
    _, *optimizers = Accelerator(cpu=True).prepare(model, *optim.build_optimizers(model))
    assert not isinstance(optimizers[1], optim.Muon)  # Accelerate's wrapper
    for step, want in ((0, 0.85), (150, 0.90), (300, 0.95)):
        optim.apply_schedules(optimizers, step, 1000)
        assert all(g["momentum"] == pytest.approx(want, abs=1e-12) for g in optimizers[1].param_groups)


# -----------------------------------------------------------------------------
# 2 gloo ranks


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("ds_train_base"))


def _e2e(out: Path, grad_clips: str, config: str | None = None) -> dict:
    run = launch_cpu_processes(2 if config else 1, *e2e_argv(out, grad_clips), accelerate_config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_result(out)


@pytest.mark.slow
def test_zero_steps_equal_our_single_process_step(tmp_path):
    """Every weight after each of 3 steps, ZeRO-2 / ZeRO-3 / ZeRO-3 + offload on 2 ranks against our step on one.

    grad_clip 1.0 (nanochat's; this tiny model's grad norms are ~0.9, so it does not engage): bitwise equal. The
    same gradients (2 ranks' average, pre-divided by 2, equals 1 process's 2 half-weighted micro-steps: halving
    is exact), the same momentum input, the same native bf16 Newton-Schulz ops, torch's AdamW on slices.
    grad_clip 0.5 (engaged every step): the norm of the raw gradient is summed in another order (sharded), so
    the clip coefficient may differ in its last bits (measured: ZeRO-3 + offload 1 ulp at step 0). AdamW (fp32,
    elementwise) moves by as much: bound 1e-5 of the update after the first step. Muon's bf16 Newton-Schulz can
    turn a last-bit change of its input into a few % of its output (a bf16 rounding flips, and the iteration
    amplifies it; measured 3.5e-2 after the second step for ZeRO-3 + offload, 0 for ZeRO-2): bound 10% after the
    second step, where the clipped gradient enters the momentum next to the first; without the clip that gap is
    over 50% (asserted), so the bound catches a raw gradient left unclipped.
    """
    ref = _e2e(tmp_path / "ref", "1.0,0.5,0.0")["runs"]
    everything = list(ref[1.0]["weights"][0])
    assert largest_gap(ref[0.0], ref[0.5], 2, everything) > 0.5
    # plain ZeRO-3 runs with the ZeRO-3 tuning keys set (_tuned_configs); ZeRO-2 both ways
    for config in (ZERO2, ZERO3_OFFLOAD, *_tuned_configs(tmp_path / "tuned")):
        result = _e2e(tmp_path / Path(config).stem, "1.0,0.5", config)
        assert result["world_size"] == 2 and result["zero"]["stage"] in (2, 3), result["zero"]
        run = result["runs"][1.0]
        assert run["losses"] == ref[1.0]["losses"], config
        for step in range(1, 4):
            assert all(torch.equal(run["weights"][step][k], w) for k, w in ref[1.0]["weights"][step].items()), \
                (config, step)
        _check_saved_shards(tmp_path / Path(config).stem / "runs" / "zero" / ckpt.step_dir_name(3), run["weights"][3],
                            config)
        # a NaN in rank 1's partition only (ZeRO-3: its `ds_tensor`; the parameter is an empty placeholder): rank 0,
        # whose result this is, refuses the save too, and nothing is written
        assert "the weights hold NaN or inf (on another rank); not saved" in (result["nan_refused"] or ""), config
        assert [s for s, _ in ckpt.list_checkpoints(tmp_path / Path(config).stem / "runs" / "zero")] == [3], config
        run = result["runs"][0.5]
        assert run["grad_norms"][0] == pytest.approx(ref[0.5]["grad_norms"][0], rel=1e-6), config
        assert largest_gap(run, ref[0.5], 1, ADAMW_WEIGHTS) <= 1e-5, config
        assert largest_gap(run, ref[0.5], 2, everything) <= 0.1, config


# The ZeRO tuning keys on the allow-list because the step above does not change with them (read in deepspeed 0.19.8,
# see ALLOWED in train/deepspeed_zero.py), at typical non-default values, all at once per config
TUNED_ZERO2 = dict(allgather_partitions=False, ignore_unused_parameters=False, use_multi_rank_bucket_allreduce=False)
TUNED_ZERO3 = dict(
    # ZeRO-3's fp32 partitions split into sub-groups of about 2 of this model's weights (each rank holds half of a
    # 32 x 32 or 128 x 32 matrix), each with its own flat buffer, optimizer state and update
    sub_group_size=1000, memory_efficient_linear=False, override_module_apply=False, log_trace_cache_warnings=True,
    stage3_param_persistence_threshold=0)
TUNED_TOP = dict(dump_state=True, seq_parallel_communication_data_type="fp32")


def _tuned_configs(folder: Path) -> list[str]:
    """configs/accelerate/deepspeed_{zero2,zero3}.yaml with the TUNED_* keys added to their JSON."""
    folder.mkdir()
    yamls = []
    # ZeRO-3's keys ride on the plain ZeRO-3 config, which is then not run at its defaults: the offload config
    # runs the same partitioned step at them (sub-groups and all), so a plain ZeRO-3 run at its defaults as well
    # would cost the suite a 2-rank launch and check nothing these two do not
    for name, tuned in (("zero2", TUNED_ZERO2), ("zero3", TUNED_ZERO3)):
        config = _json(name) | TUNED_TOP
        config["zero_optimization"].update(tuned)
        (folder / f"{name}.json").write_text(json.dumps(config))
        yaml = (REPO / f"configs/accelerate/deepspeed_{name}.yaml").read_text()
        (folder / f"tuned_{name}.yaml").write_text(yaml.replace(f"configs/deepspeed/{name}.json",
                                                                str(folder / f"{name}.json")))
        yamls.append(str(folder / f"tuned_{name}.yaml"))
    return yamls


def _check_saved_shards(step_dir: Path, gathered: dict, config: str) -> None:
    """A ZeRO run's checkpoint (DeepSpeed's own save, each rank its partition): under ZeRO-3 no file holds a whole
    weight; what `convert` and `eval` read from it (zero-to-fp32, one process) is bitwise the weights gathered in
    the run (GatheredParameters)."""
    files = sorted((step_dir / ckpt.DEEPSPEED_TAG).glob("*_states.pt"))
    # each rank's optimizer partition; model states: rank 0's whole weights under ZeRO-2 (every rank holds them
    # whole there), each rank's under ZeRO-3
    assert len([f for f in files if "optim_states" in f.name]) == 2, files
    assert len([f for f in files if "model_states" in f.name]) == (2 if "zero3" in config else 1), files
    if "zero3" in config:
        numel = sum(w.numel() for w in gathered.values())
        for path in files:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if "model_states" in path.name:  # placeholders of the partitioned weights
                assert all(t.numel() == 0 for t in saved["module"].values()), path
            else:  # this rank's fp32 partition: half the weights, padded
                part = sum(t.numel() for t in saved["optimizer_state_dict"]["fp32_flat_groups"])
                assert numel / 2 <= part < numel, (path, part, numel)
    weights = ckpt.load_model_state_dict(step_dir)
    assert weights.keys() == gathered.keys() and all(torch.equal(weights[k], w) for k, w in gathered.items()), config


def _train(base: Path, tag: str, *extra: str) -> list[str]:
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--model-tag", tag, "--num-iterations", "1000",
                              "--save-every", "2", "--keep-last", "0", *extra]
    args[args.index("--total-batch-size") + 1] = "256"  # 2 ranks x 2 micro-steps of 2 x 32 tokens
    return ["-m", "nanochat_unsloth.train", *args]


def _losses(base: Path, tag: str) -> dict[int, float]:
    lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, filter(None, lines))}


def _zero3_partitioning_every_weight(tmp_path: Path) -> str:
    """configs/accelerate/deepspeed_zero3.yaml with one setting added: stage3_param_persistence_threshold 0.
    DeepSpeed keeps every weight of fewer elements than this threshold (1e5 by default) whole on every rank after
    each step and each load, and every weight of the tests' tiny model is that small: a forward would never find
    one partitioned, as it finds every weight of a real depth (d12's smallest is 768 x 768)."""
    config = _json("zero3")
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    yaml = (REPO / ZERO3).read_text().replace("configs/deepspeed/zero3.json", str(tmp_path / "zero3.json"))
    (tmp_path / "zero3.yaml").write_text(yaml)
    return str(tmp_path / "zero3.yaml")


@pytest.mark.slow
def test_zero3_saves_on_save_every_and_sigterm_and_resumes_bit_exactly_and_refuses_other_strategies(base, capsys,
                                                                                                    tmp_path):
    zero3 = _zero3_partitioning_every_weight(tmp_path)
    # A: 5 steps, saved at 2 and 4 (--save_every) and at 5 (--stop_after)
    out = launch_cpu_processes(2, *_train(base, "a", "--stop-after", "5"), accelerate_config=zero3)
    assert out.returncode == 1 and "exitcode  : 3" in out.stderr, out.stderr[-3000:]  # torchrun's view of exit 3
    assert "x 2 procs x 2 accum" in out.stdout, out.stdout[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "a")] == [2, 4, 5]
    # DeepSpeed's pointer to the tag, for its own tools (zero_to_fp32.py run in the step dir), and in meta.json
    step_2 = base / "runs" / "a" / ckpt.step_dir_name(2)
    assert (step_2 / "latest").read_text() == ckpt.DEEPSPEED_TAG and "latest" in ckpt.load_meta(step_2).files
    # B: A's step-2 checkpoint, resumed, sampling every 2 steps; SIGTERM to the launcher once step 4 is logged
    (base / "runs" / "b").mkdir(parents=True)
    shutil.copytree(base / "runs" / "a" / ckpt.step_dir_name(2), base / "runs" / "b" / ckpt.step_dir_name(2))
    # one process without DeepSpeed (as DDP) is refused in one line, before any state is loaded
    (base / "runs" / "plain").mkdir(parents=True)
    shutil.copytree(base / "runs" / "a" / ckpt.step_dir_name(2), base / "runs" / "plain" / ckpt.step_dir_name(2))
    code = run_main(train_main, _train(base, "plain", "--resume", "auto")[2:])
    err = one_line_error(capsys, code)
    assert f"cannot resume {base / 'runs' / 'plain' / ckpt.step_dir_name(2)}: it is DeepSpeed ZeRO-3's on 2" in err
    launcher = start_cpu_processes(2, *_train(base, "b", "--resume", "auto", "--sample-every", "2"),
                                   accelerate_config=zero3)
    out, err, elapsed, workers = signal_after_line(launcher, "step 00004/", signal.SIGTERM, timeout=120)
    assert elapsed < 60, elapsed
    # B's samples at step 2 come right after the load, before any training forward in its processes. The model
    # reads lm_head.weight (and each block's Linear weights) outside that Linear's own forward: ZeRO-3 gathers
    # such a weight only within a call of the model itself, so a forward through GPT.forward directly met it
    # partitioned (empty)
    resumed = out.split("resumed from ")[1].split("step 00002/")[0]
    assert resumed.count("\n  sample: ") == len(SAMPLE_PROMPTS), out[-3000:]
    saved = [s for s, _ in ckpt.list_checkpoints(base / "runs" / "b")]
    stop = saved[-1]
    assert stop >= 5 and f"stopped after step {stop} of 1000" in out, (saved, out[-2000:], err[-3000:])
    ckpt.load_meta(base / "runs" / "b" / ckpt.step_dir_name(stop))  # every file (each rank's shards) verifies
    time.sleep(2)
    assert not [pid for pid in workers if is_alive(pid)], "a worker outlived the launcher"
    # bit-exact: the losses of steps 2-4 and the weights at step 4 (ZeRO-3 shards, gathered by zero_to_fp32)
    a, b = _losses(base, "a"), _losses(base, "b")
    assert [b[s] for s in (2, 3, 4)] == [a[s] for s in (2, 3, 4)]
    want = ckpt.load_model_state_dict(base / "runs" / "a" / ckpt.step_dir_name(4))
    got = ckpt.load_model_state_dict(base / "runs" / "b" / ckpt.step_dir_name(4))
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # C: A's step-4 checkpoint, resumed with rank 1's writes failing for real (a file-size limit: a full disk or
    # a quota on one rank's path). Its partition's write fails inside DeepSpeed's own save, between the two
    # barriers of it; rank 0 must not wait in the second until the process group's timeout: every rank exits 2
    # within seconds, with the same line, and A's checkpoint stays the newest
    (base / "runs" / "c").mkdir(parents=True)
    shutil.copytree(base / "runs" / "a" / ckpt.step_dir_name(4), base / "runs" / "c" / ckpt.step_dir_name(4))
    exits = tmp_path / "exits"
    exits.mkdir()
    launcher = start_cpu_processes(2, "tests/rank_write_limit.py", "1", "1024", str(exits), "--",
                                   *_train(base, "c", "--resume", "auto", "--stop-after", "5")[2:],
                                   accelerate_config=zero3)
    out, err, elapsed, _ = signal_after_line(launcher, "step 00004/", None, timeout=60)
    codes = {r: (exits / f"exit_{r}").read_text() if (exits / f"exit_{r}").exists() else None for r in (0, 1)}
    assert codes == {0: str(EXIT_USER_ERROR), 1: str(EXIT_USER_ERROR)} and elapsed < 60, (codes, elapsed, err[-3000:])
    errors = {line for line in err.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, err[-3000:]
    assert errors.pop().startswith(f"error: step 5 was not saved: {base / 'runs' / 'c'}: cannot write: "), err[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "c")] == [4]
    assert not list((base / "runs" / "c").glob(".step_*")), "the failed save's partial files are removed"


@pytest.mark.slow
def test_a_bad_deepspeed_config_is_refused_before_the_model_is_built(base, tmp_path):
    config = _json("zero2") | {"gradient_clipping": 1.0}
    (tmp_path / "clip.json").write_text(json.dumps(config))
    yaml = (REPO / ZERO2).read_text().replace("configs/deepspeed/zero2.json", str(tmp_path / "clip.json"))
    (tmp_path / "clip.yaml").write_text(yaml)
    out = launch_cpu_processes(2, *_train(base, "refused"), accelerate_config=str(tmp_path / "clip.yaml"))
    assert out.returncode != 0
    assert f"DeepSpeed config {tmp_path / 'clip.json'}: gradient_clipping: 1.0" in out.stderr, out.stderr[-3000:]
    assert "model: depth" not in out.stdout, out.stdout[-2000:]
