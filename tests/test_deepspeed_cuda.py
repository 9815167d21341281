"""DeepSpeed ZeRO on GPUs: skipped without a CUDA GPU and an importable deepspeed, the 2-GPU tests without 2 GPUs.

    pytest tests/test_deepspeed_cuda.py -s    # prints the measured gaps; MULTI_GPU_TEST_OUT=f.json also writes them

Every launch is the real `accelerate launch --config_file configs/accelerate/deepspeed_*.yaml` (the yamls as they
are, --num_processes 1 or 2), with NVLink multicast switched off (tests/gpu_launch.py).

- the step (tests/deepspeed_e2e.py --device cuda, the tiny GPT of tests/test_deepspeed.py): the first optimizer
  update of ZeRO-2, ZeRO-3 and ZeRO-3 + offload on 1 GPU, and of ZeRO-2 and ZeRO-3 on 2 GPUs (NCCL), against our
  own single-process step on one GPU without DeepSpeed: bf16 autocast, fused AdamW (DeepSpeed's offload: torch's
  AdamW on the CPU), Muon's Newton-Schulz compiled (ours batched per shape, DeepSpeed's one matrix at a time);
  every weight fp32 in both (DeepSpeed keeps wte fp32);
- checkpoints: a 1-GPU ZeRO-3 run of the real loop saved on --save_every continues under `--resume auto` to the
  losses and weights of the uninterrupted run.

Bounds, from the CPU test (tests/test_deepspeed.py), held by the first GPU run (one H100, 2026-12-06: Muon 6.6%
of the update in all three configs, AdamW 0 and 3.8e-7 with offload, gradient norm 0 and 1.3e-7 relative, the
norm 0.90 under the clip of 1.0, so the clip's own last-bit case ran on CPU only; docs/MULTI_GPU.md): the step-0
loss is the same forward of the same weights on the same tokens (equal); the pre-clip gradient norm to 1e-5 relative (the same gradients, their squares summed in another order); after the
first update, AdamW's weights (wte, lm_head) within 1e-5 of the reference update (elementwise fp32: the CPU bound
where the clip coefficient differed in its last bit), Muon's matrices within 10% of it (bf16 Newton-Schulz turns a
last-bit difference of its input into a few % of its output; measured on CPU 3.5e-2 after ZeRO-3 + offload's
second step; on GPUs the two Newton-Schulz programs may also round differently). On CPU, at grad_clip 1.0, every
weight is bitwise equal; whether it is on GPUs is recorded (`bitwise`), not asserted. The resume is asserted
bit-exact, as on CPU (DeepSpeed's partitions, Muon's momentum, the RNG and the loader's position all restored).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.checkpoint import store as ckpt

from cpu_launch import REPO
from deepspeed_compare import ADAMW_WEIGHTS, ZERO2, ZERO3, ZERO3_OFFLOAD, e2e_argv, largest_gap, load_result
from gpu_launch import gpu_env, record
from train_fixtures import make_train_base_dir


def _deepspeed_imports() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # not installed, or its import fails (no CUDA toolkit it can use)
        return False
    return True


# torch.cuda first: a machine without CUDA never pays for importing deepspeed at collection
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _deepspeed_imports()),
                                reason="needs a CUDA GPU and deepspeed")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

GRAD_CLIP = "1.0"  # nanochat's


def _launch(argv, config: str | None = None, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python *argv`, or `accelerate launch --config_file config --num_processes nproc *argv`."""
    launch = [sys.executable]
    if config:
        launch += ["-m", "accelerate.commands.launch", "--config_file", str(REPO / config), "--num_processes",
                   str(nproc)]
    return subprocess.run([*launch, *argv], env=gpu_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _first_step(out: Path, config: str | None = None, nproc: int = 1) -> dict:
    run = _launch(e2e_argv(out, GRAD_CLIP, "--device", "cuda", "--steps", "1", "--no-save"), config, nproc)
    assert run.returncode == 0, run.stderr[-4000:]
    return load_result(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Our step, one process on one GPU, 2 micro-steps."""
    result = _first_step(tmp_path_factory.mktemp("ds_gpu_ref"))
    assert result["world_size"] == 1 and result["zero"] is None, result["zero"]
    return result["runs"][float(GRAD_CLIP)]


def _check_first_step(result: dict, ref: dict, config: str, nproc: int) -> None:
    assert result["world_size"] == nproc, result["world_size"]
    assert result["zero"]["stage"] == (2 if "zero2" in config else 3), result["zero"]
    run = result["runs"][float(GRAD_CLIP)]
    muon = [k for k in ref["weights"][0] if k not in ADAMW_WEIGHTS]
    assert muon and all(k in ref["weights"][0] for k in ADAMW_WEIGHTS)
    norm_rel = abs(run["grad_norms"][0] - ref["grad_norms"][0]) / ref["grad_norms"][0]
    gaps = {"loss_step0": run["losses"][0], "loss_step0_ref": ref["losses"][0],
            "grad_norm": run["grad_norms"][0], "grad_norm_rel_gap": norm_rel,
            "adamw_gap_rel_update": largest_gap(run, ref, 1, ADAMW_WEIGHTS),
            "muon_gap_rel_update": largest_gap(run, ref, 1, muon),
            "bitwise": all(torch.equal(run["weights"][1][k], w) for k, w in ref["weights"][1].items())}
    record(f"deepspeed_{Path(config).stem.removeprefix('deepspeed_')}_{nproc}gpu_first_step", gaps)
    assert run["losses"][0] == ref["losses"][0], gaps
    assert norm_rel <= 1e-5, gaps
    assert gaps["adamw_gap_rel_update"] <= 1e-5, gaps
    assert gaps["muon_gap_rel_update"] <= 0.1, gaps


@pytest.mark.parametrize("config", [ZERO2, ZERO3, ZERO3_OFFLOAD])
def test_first_zero_step_on_one_gpu_equals_our_step(reference, config, tmp_path):
    _check_first_step(_first_step(tmp_path, config, 1), reference, config, 1)


@two_gpus
@pytest.mark.parametrize("config", [ZERO2, ZERO3])
def test_first_zero_step_on_two_gpus_equals_our_step(reference, config, tmp_path):
    _check_first_step(_first_step(tmp_path, config, 2), reference, config, 2)


# -----------------------------------------------------------------------------
# The real loop: save and resume

# depth 4 (n_embd 256), T=256, B=8, 2 micro-steps: 4,096 tokens a step; --num_iterations only sets the schedules
LOOP_ARGS = ["--depth", "4", "--max_seq_len", "256", "--device_batch_size", "8", "--total_batch_size", "4096",
             "--num_iterations", "1000", "--eval_every", "-1", "--eval_tokens", "4096", "--sample_every", "-1",
             "--save_every", "2", "--keep_last", "0", "--stop_after", "5"]


def _train(base: Path, tag: str, *extra: str) -> subprocess.CompletedProcess:
    argv = ["-m", "nanochat_unsloth.train", *LOOP_ARGS, "--base_dir", str(base), "--model_tag", tag, *extra]
    return _launch(argv, ZERO3, 1)


def _losses(base: Path, tag: str) -> dict[int, float]:
    lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, lines))}


def test_zero3_on_one_gpu_resumes_bit_exactly(tmp_path):
    base = make_train_base_dir(tmp_path / "base", train_tokens=100_000, val_tokens=20_000)
    # A: 5 steps, saved at 2 and 4 (--save_every) and at 5 (--stop_after, exit 3: torchrun reports it)
    out = _train(base, "a")
    assert out.returncode == 1 and "exitcode  : 3" in out.stderr, out.stderr[-4000:]
    assert "x 1 procs x 2 accum" in out.stdout, out.stdout[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "a")] == [2, 4, 5]
    # B: A's step-2 checkpoint, resumed, to step 5
    (base / "runs" / "b").mkdir(parents=True)
    shutil.copytree(base / "runs" / "a" / ckpt.step_dir_name(2), base / "runs" / "b" / ckpt.step_dir_name(2))
    # sampling after the load and mid-run: lm_head (65,536 x 256) is over DeepSpeed's persistence threshold, so
    # a forward that skips the model's hooks meets it partitioned (the crash of a d12 run's final samples)
    out = _train(base, "b", "--resume", "auto", "--sample_every", "2")
    assert out.stdout.count("  sample: ") >= 2, out.stdout[-3000:]
    assert out.returncode == 1 and "exitcode  : 3" in out.stderr, out.stderr[-4000:]
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "b")] == [2, 4, 5]
    a, b = _losses(base, "a"), _losses(base, "b")
    resumed = range(2, 5)
    want = ckpt.load_model_state_dict(base / "runs" / "a" / ckpt.step_dir_name(4))
    got = ckpt.load_model_state_dict(base / "runs" / "b" / ckpt.step_dir_name(4))
    assert want.keys() == got.keys()
    record("deepspeed_zero3_1gpu_resume", {
        "loss_a": [a[s] for s in resumed], "loss_resumed": [b[s] for s in resumed],
        "max_abs_loss_gap": max(abs(a[s] - b[s]) for s in resumed),
        "max_abs_weight_gap_step4": max((got[k].float() - want[k].float()).abs().max().item() for k in want)})
    assert [b[s] for s in resumed] == [a[s] for s in resumed]
    assert all(torch.equal(got[k], want[k]) for k in want)
