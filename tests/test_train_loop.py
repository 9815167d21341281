"""The training loop end to end on CPU: resume is bit-identical, accumulation is exact, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.common import UserError
from nanochat_unsloth.checkpoint import store as ckpt
from nanochat_unsloth.train.step import NonFiniteLoss

from cpu_launch import launch_cpu_processes
from run_helpers import run_train
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("train_base"))


def metrics(base: Path, tag: str) -> list[dict]:
    lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def final_weights(base: Path, tag: str, step: int) -> dict[str, torch.Tensor]:
    return ckpt.load_model_state_dict(base / "runs" / tag / ckpt.step_dir_name(step))


def test_resume_is_bit_identical(base):
    run_train(base, "--num-iterations", "6", "--model-tag", "straight")
    first = run_train(base, "--num-iterations", "6", "--model-tag", "resumed", "--stop-after", "3")
    assert first["stopped_at"] == 3
    assert [m["step"] for m in metrics(base, "resumed")] == [0, 1, 2]
    second = run_train(base, "--num-iterations", "6", "--model-tag", "resumed", "--resume", "auto")
    assert second["start_step"] == 3

    straight, resumed = metrics(base, "straight"), metrics(base, "resumed")
    assert [m["step"] for m in resumed] == list(range(6)), "every step logged exactly once"
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    assert [m["lrm"] for m in resumed] == [m["lrm"] for m in straight]
    a, b = final_weights(base, "straight", 6), final_weights(base, "resumed", 6)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the loss fell: the loop really trains
    assert straight[-1]["loss"] < straight[0]["loss"]


def test_metrics_record_whole_batch_loss_and_step_fields(base):
    run_train(base, "--num-iterations", "2", "--model-tag", "fields")
    record = metrics(base, "fields")[0]
    for key in ("step", "loss", "lrm", "grad_norm", "dt", "tok_per_sec", "mfu", "peak_mem_gib"):
        assert key in record
    evals = [json.loads(line) for line in (base / "runs" / "fields" / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 2 and evals[-1]["val_bpb"] > 0


def _launch(base: Path, nproc: int, total_batch: int, tag: str, steps: int = 4):
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", str(steps), "--model-tag", tag, "--force"]
    args[args.index("--total-batch-size") + 1] = str(total_batch)
    return launch_cpu_processes(nproc, "-m", "nanochat_unsloth.train", *args)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(base):
    # same global batch (256 tokens): 1 process x 4 micro-steps vs 2 gloo processes x 2 micro-steps
    one = _launch(base, 1, 256, "one_proc")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 procs x 4 accum" in one.stdout
    two = _launch(base, 2, 256, "two_proc")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 procs x 2 accum" in two.stdout, "the launch must really run two processes"
    l1 = [m["loss"] for m in metrics(base, "one_proc")]
    l2 = [m["loss"] for m in metrics(base, "two_proc")]
    assert len(l1) == len(l2) == 4
    # The two sum the same gradients in another order (fp32 rounding), which Muon's bf16 Newton-Schulz
    # amplifies in the weights. Measured, seeds 42-44, AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), both
    # --cpu_bf16 paths: step 0 equal, then at most 1.3e-5 relative by step 3 (1.8e-5 seen on an AVX2 CI
    # machine). A wrong sync (a missing all-reduce or all-gather, a double-counted micro-batch) moves the
    # loss far more: training on 3/4 or 1/2 of each step's batch moved steps 1-3 by 3.6e-3 to 1.1e-1.
    assert l1[0] == pytest.approx(l2[0], rel=1e-6)
    assert l1 == pytest.approx(l2, rel=1e-4)
    # AdamW-updated weights agree to fp32 reduction order. Muon's bf16 Newton-Schulz amplifies the small
    # singular directions of the update (slope ~3.4 per iteration, 5 iterations), so ulp-level gradient
    # differences become percent-level differences of the *update*; the zero-initialised c_proj matrices,
    # which are nothing but updates after 4 steps, differ most. Measured (seed 42, AVX-512 and AVX2, both
    # --cpu_bf16 paths): wte/lm_head at most 9e-5, block matrices at most 0.10 (the c_proj's), the rest
    # ~3e-3. A wrong sync gives 100% differences.
    a, b = final_weights(base, "one_proc", 4), final_weights(base, "two_proc", 4)
    for name in a:
        rel = ((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)).item()
        bound = 1e-3 if name in ("transformer.wte.weight", "lm_head.weight") else 0.3
        assert rel < bound, (name, rel)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(base):
    run_train(base, "--num-iterations", "4", "--model-tag", "nan", "--stop-after", "1")
    with pytest.raises(NonFiniteLoss):
        # AdamW steps of 1e37 overflow the embedding and lm_head (a NaN LR is refused as a flag now)
        run_train(base, "--num-iterations", "4", "--model-tag", "nan", "--resume", "auto", "--force",
                  "--embedding-lr", "1e37", "--unembedding-lr", "1e37")
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "nan")] == [1]


# ---- bad input -------------------------------------------------------------------------------------


def test_missing_shards_dir(base, tmp_path):
    with pytest.raises(UserError, match="shard directory not found"):
        run_train(base, "--num-iterations", "1", "--shards", str(tmp_path / "nope"))


def test_indivisible_total_batch(base):
    with pytest.raises(UserError, match="total.batch.size"):
        run_train(base, "--num-iterations", "1", "--total-batch-size", "100")


def test_shards_too_short_for_one_batch(base):
    with pytest.raises(UserError, match="need"):
        run_train(base, "--num-iterations", "1", "--max-seq-len", "4096", "--device-batch-size", "32",
                  "--total-batch-size", str(4096 * 32))


def test_tokenizer_mismatch(base, tmp_path):
    other = make_train_base_dir(tmp_path / "other", train_tokens=5000, val_tokens=2000)
    # the other base's shards were made with a tokenizer that hashes differently only if its pickle differs:
    # rewrite the manifest fingerprint to simulate shards from another tokenizer
    manifest = json.loads((other / "shards" / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "shards" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="is not the tokenizer of the shards in "):
        run_train(base, "--num-iterations", "1", "--shards", str(other / "shards"))


def test_resume_refuses_changed_config(base):
    run_train(base, "--num-iterations", "3", "--model-tag", "cfg", "--stop-after", "1")
    with pytest.raises(UserError, match="device_batch_size"):
        run_train(base, "--num-iterations", "3", "--model-tag", "cfg", "--resume", "auto",
                  "--device-batch-size", "1")
    with pytest.raises(UserError, match="model differs"):
        run_train(base, "--num-iterations", "3", "--model-tag", "cfg", "--resume", "auto", "--depth", "3")


def test_resume_from_partial_or_corrupt_checkpoint(base):
    run_train(base, "--num-iterations", "3", "--model-tag", "corrupt", "--stop-after", "1")
    step_dir = base / "runs" / "corrupt" / "step_000001"
    # a truncated weights file
    weights = step_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        run_train(base, "--num-iterations", "3", "--model-tag", "corrupt", "--resume", str(step_dir))
    # a partial save (no meta.json) is never picked by --resume auto and refused when named
    (step_dir / "meta.json").unlink()
    with pytest.raises(UserError, match="partial"):
        run_train(base, "--num-iterations", "3", "--model-tag", "corrupt", "--resume", str(step_dir))
    assert ckpt.find_resume(base / "runs" / "corrupt", "auto") is None


def test_existing_run_is_refused_then_set_aside_with_force(base):
    run_train(base, "--num-iterations", "2", "--model-tag", "again")
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_train(base, "--num-iterations", "1", "--model-tag", "again")
    (base / "runs" / "again" / "logs" / "nanochat").mkdir(parents=True)  # the old run's tracker files
    (base / "runs" / "again" / "logs" / "nanochat" / "events.old").write_text("old curves")
    (base / "runs" / "again" / "profile").mkdir()  # the old run's --profile_step record
    (base / "runs" / "again" / "profile" / "rank0.json").write_text("old profile")
    run_train(base, "--num-iterations", "1", "--model-tag", "again", "--force")
    run_dir = base / "runs" / "again"
    # its tracker logs and profile go aside with it: the new run's curves do not mix with the old one's, nor
    # does its own profile overwrite the old one
    assert (run_dir / "previous_0" / "logs" / "nanochat" / "events.old").read_text() == "old curves"
    assert (run_dir / "previous_0" / "profile" / "rank0.json").read_text() == "old profile"
    assert not (run_dir / "logs").exists() and not (run_dir / "profile").exists()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1], "the new run's checkpoint only"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "previous_0")] == [2], "the old run kept, aside"
    assert [m["step"] for m in metrics(base, "again")] == [0]


def test_profile_step_writes_each_ranks_phases(base):
    run_train(base, "--num-iterations", "2", "--model-tag", "profiled", "--profile-step", "1")
    record = json.loads((base / "runs" / "profiled" / "profile" / "rank0.json").read_text())
    assert record["rank"] == 0 and record["step"] == 1
    phases = record["phases_s"]
    # 2 micro-steps per step here: one plain forward+backward, then the one that syncs gradients
    for name in ("data", "fwd_bwd", "fwd_bwd_last_with_grad_sync", "loss_reduce_host_sync", "clip",
                 "optimizer_AdamW", "optimizer_Muon"):
        assert name in phases and phases[name] >= 0, name
    assert sum(phases.values()) <= record["wall_s"] and record["cpu_s"] > 0
    assert record["cpu_affinity"], "which CPUs the rank may use"
    # written through a temp file renamed into place: nothing else is left beside it
    assert [p.name for p in (base / "runs" / "profiled" / "profile").iterdir()] == ["rank0.json"]


def test_stop_after_the_last_step_is_the_runs_end_with_its_final_evaluation(base):
    """--stop_after at the horizon stops where the run ends anyway: it must end as a finished run (evaluated,
    exit 0), not as a stop whose `--resume auto` then finds the final checkpoint and never evaluates it."""
    result = run_train(base, "--num-iterations", "3", "--model-tag", "stop_at_end", "--stop-after", "3")
    assert "stopped_at" not in result and result["final_step"] == 3
    evals = [json.loads(line) for line in (base / "runs" / "stop_at_end" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "val_bpb" in e] == [3]
    assert [s for s, _ in ckpt.list_checkpoints(base / "runs" / "stop_at_end")] == [3]
