"""The benchmark scripts on the CPU: train_throughput.py (and vs_nanochat.py, opt-in), activation_memory.py,
project_run.py, runs.py's subcommands and the helpers they share (common.py) run end to end and report.

The GPU figures themselves come from the device (docs/PERF.md); this only keeps the scripts' code paths
(subprocess per configuration, kernel/memory variants, --fp8 wiring, JSON and table) from rotting.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RUNS = [sys.executable, str(BENCHMARKS / "runs.py")]


def benchmark_module(name: str):
    """A module of benchmarks/, imported as a script there sees it (benchmarks/ first on sys.path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_train_throughput_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--device", "cpu", "--depth", "2",
           "--seq", "32", "--vocab", "256", "--total-batch", "128", "--batch-sizes", "2",
           "--kernels", "torch,fused-fp8", "--memory", "fast,lean", "--warmup", "1", "--steps", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [(r["kernels"], r["memory"]) for r in results] == [
        ("torch", "fast"), ("torch", "lean"), ("fused-fp8", "fast"), ("fused-fp8", "lean")]
    for r in results:
        assert "error" not in r, r
        assert r["grad_accum"] == 2 and r["tok_per_s"] > 0 and len(r["step_times_s"]) == 1
        assert r["kernels_used"] == "torch"  # on the CPU the fused set and --fp8 fall back to bf16 torch
    fp8_notices = [n for r in results[2:] for n in r["notices"]]
    assert any(n.startswith("notice: --fp8") for n in fp8_notices), fp8_notices
    # the same initial weights and batches: every configuration starts from the same loss
    assert len({round(r["losses"][0], 5) for r in results}) == 1
    assert "| 2 | fused-fp8 | 2 | lean |" in proc.stdout  # the table comes last


def test_train_throughput_times_only_steps_in_the_final_fp8_scaling_mode(tmp_path):
    """Below 16,384 rows "auto" builds no delayed-scaling state (the benchmark resolves as a run does): every
    step is in the final mode. With --fp8_scaling delayed the layers start dynamic and switch once
    every amax history they use is positive (after step 2 from nanochat's init). Warm-up must last until then, and
    timing must start."""
    base = [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--device", "cpu", "--depth", "2",
            "--seq", "32", "--vocab", "256", "--total-batch", "64", "--batch-sizes", "2",
            "--warmup", "1", "--steps", "1", "--fp8-anywhere"]
    for variant, dynamic_steps in (("fused-fp8", 0), ("fused-fp8-delayed", 3)):
        out = tmp_path / f"{variant}.json"
        proc = subprocess.run(base + ["--kernels", variant, "--out", str(out)], capture_output=True, text=True,
                              timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (r,) = json.loads(out.read_text())
        assert "error" not in r, r
        assert r["kernels_used"] == "torch+fp8" and len(r["step_times_s"]) == 1
        # the dynamic steps, one step in the final mode (recompilation), then the timed step
        assert len(r["losses"]) == dynamic_steps + 2, (variant, r["losses"])


def test_profile_categories_do_not_count_fused_fp8_casts_as_matmuls():
    categorize = benchmark_module("train_throughput").categorize
    assert categorize("nvjet_sm90_qqtst_192x192_128x4_1x2_h_bz_coopB_TNN") == "matmul"  # cuBLAS FP8 GEMM
    assert categorize("triton_tem_fused_mm_0") == "matmul"  # an Inductor GEMM template
    assert categorize("triton_poi_fused__fused_rms_norm__scaled_mm__to_copy_add_clamp_clone_mul_pow") == "elementwise"
    assert categorize("triton_red_fused__to_copy_arange_div_eq_exp_logsumexp_mul_ne_pow_rsub_sub_tanh") == "loss"
    assert categorize("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"


def test_rope_norm_micro_runs_its_torch_side_on_cpu(tmp_path):
    out = tmp_path / "micro.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rope_norm_micro.py"), "--device", "cpu",
                           "--batch", "2", "--seq", "32", "--heads", "2", "--head-dim", "16", "--warmup", "0",
                           "--iters", "1", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert r["variant"] == "torch (eager)" and r["shape"] == [2, 32, 2, 16]
    assert r["min_gb_moved"] == 10 * 2 * (2 * 32 * 2 * 16) / 1e9


def test_softcap_ce_micro_runs_its_torch_side_on_cpu(tmp_path):
    """The loss-chunk micro-benchmark on the CPU: the torch math against float64 (bf16 logits: dz within one
    bf16 rounding, 2^-8, of the largest; the loss sum in fp32, 1e-6 relative; measured 1.9e-3 and 1.1e-8)."""
    out = tmp_path / "ce.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "softcap_ce_micro.py"), "--device", "cpu",
                           "--rows", "16", "--vocab", "500", "--warmup", "0", "--iters", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert r["variant"] == "torch (eager)" and (r["rows"], r["vocab"]) == (16, 500)
    assert r["min_gb_moved"] == 3 * 2 * 16 * 500 / 1e9
    assert r["dz_max_rel_err_vs_fp64"] < 2**-8 and r["loss_rel_err_vs_fp64"] < 1e-6


def test_activation_memory_lists_what_a_block_saves_on_cpu(tmp_path):
    """CPU smoke test (no allocator figures there): the saved-tensor listing of block 0 shows the MLP's
    4*n_embd-wide tensors under fast mode and none under selective."""
    out = tmp_path / "act.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "activation_memory.py"), "--device", "cpu",
                           "--depth", "2", "--seq", "32", "--vocab", "256", "--batch-size", "2",
                           "--kernels", "fused-fp8", "--fp8-anywhere", "--memory", "fast,selective",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fast, selective = json.loads(out.read_text())
    assert (fast["memory"], selective["memory"]) == ("fast", "selective")
    assert len(fast["kept_per_block_mib"]) == 2 and selective["block_memory"] == ["selective"] * 2
    hidden = 2 * 32 * 4 * 2 * 64  # B * T * 4 * n_embd at depth 2

    def sizes(r):
        return {math.prod(e["shape"]) for e in r["block0_saved"]}

    assert hidden in sizes(fast) and hidden not in sizes(selective)


@pytest.mark.skipif(not os.environ.get("NANOCHAT_SRC"), reason="set NANOCHAT_SRC to a nanochat checkout to run")
def test_vs_nanochat_cpu_smoke(tmp_path):
    """benchmarks/vs_nanochat.py runs nanochat's own step and ours end to end and reports the ratio table and
    the memory frontier. Both sides seed 0 and draw the same random batch, and nanochat's init is ours
    (test_nanochat_parity), so the first losses agree: measured equal to 7 digits on this CPU, fp32."""
    out = tmp_path / "vs.json"
    cmd = [sys.executable, str(BENCHMARKS / "vs_nanochat.py"), "--device", "cpu", "--depth", "2",
           "--seq", "32", "--vocab", "256", "--total-batch", "128", "--batch-sizes", "2", "--kernels", "torch",
           "--warmup", "1", "--steps", "1", "--budgets", "80", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    nano, ours = data["results"]
    assert (nano["side"], ours["side"]) == ("nanochat", "ours")
    for r in (nano, ours):
        assert "error" not in r, r
        assert r["grad_accum"] == 2 and r["tok_per_s"] > 0 and len(r["step_times_s"]) == 1
    assert math.isclose(nano["losses"][0], ours["losses"][0], rel_tol=1e-5), (nano["losses"], ours["losses"])
    (row,) = data["frontier"]
    assert row["nanochat"] == "nanochat B=2" and row["ours"] == "torch B=2" and row["ratio"] > 0
    assert "| 80 GiB | nanochat B=2 |" in proc.stdout


def test_vs_nanochat_from_reports_several_invocations_per_depth(tmp_path):
    """--from merges the --out files of several invocations (one per GPU of a node) and keeps depths apart:
    a d44 row is never compared with a d20 nanochat row of the same batch size. --skip-nanochat times ours
    alone (for a batch size nanochat cannot fit), without a nanochat checkout."""
    def row(side, kernels, depth, b, tok, gib, memory="fast"):
        return {"side": side, "kernels": kernels, "depth": depth, "batch_size": b, "memory": memory,
                "tok_per_s": tok, "mfu": 50.0, "peak_alloc_gib": gib}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": [row("nanochat", "nanochat", 20, 2, 100.0, 10.0),
                                         row("ours", "fused-fp8", 20, 2, 120.0, 8.0)]}))
    b.write_text(json.dumps({"results": [row("nanochat", "nanochat", 44, 2, 10.0, 70.0),
                                         row("ours", "fused-fp8", 44, 2, 13.0, 60.0)]}))
    out = tmp_path / "merged.json"
    cmd = [sys.executable, str(BENCHMARKS / "vs_nanochat.py"), "--from", f"{a},{b}", "--budgets", "80,16",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["depth"], r["budget_gib"]): r for r in json.loads(out.read_text())["frontier"]}
    assert rows[20, 80.0]["ratio"] == 1.2 and rows[44, 80.0]["ratio"] == 1.3
    assert rows[20, 16.0]["ratio"] == 1.2 and rows[44, 16.0]["ratio"] is None  # d44 fits no 16 GiB budget
    assert "| fused-fp8 | 2 | fast | 13 | 1.300 |" in proc.stdout
    ours = tmp_path / "ours.json"
    alone = subprocess.run([sys.executable, str(BENCHMARKS / "vs_nanochat.py"), "--skip-nanochat",
                            "--nanochat-src", "", "--device", "cpu", "--depth", "2", "--seq", "32", "--vocab", "256",
                            "--total-batch", "128", "--batch-sizes", "2", "--kernels", "torch", "--warmup", "1",
                            "--steps", "1", "--budgets", "80", "--out", str(ours)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert alone.returncode == 0, alone.stderr[-2000:]
    (timed,) = json.loads(ours.read_text())["results"]  # --skip-nanochat: ours only, no checkout needed
    assert timed["side"] == "ours" and timed["tok_per_s"] > 0
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "none.json")], capture_output=True, text=True, timeout=120,
                             cwd=REPO)
    assert missing.returncode == 2 and "none.json: no such file" in missing.stderr


def test_runs_quality_cpu_smoke(tmp_path):
    """`runs.py quality`: every (variant, seed) run trains the whole schedule on never-repeated tokens
    and is summarised; the same command again skips finished runs; too few train tokens is refused.
    --deadline first: at the deadline every running run gets SIGTERM (still starting up here: the deadline is
    the first check, one second in), no queued run starts, the exit is 3, not a failure, and the same command
    without it trains every run to its end."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import make_train_base_dir

    base = make_train_base_dir(tmp_path / "base")
    out = tmp_path / "q.json"
    cmd = [*RUNS, "quality", "--base-dir", str(base), "--depth", "2", "--tokens", "1280", "--device-batch-size", "2",
           "--total-batch", "128", "--variants", "torch,fp8", "--seeds", "1,2", "--eval-every", "5",
           "--eval-tokens", "512", "--save-every", "5", "--per-gpu", "2", "--extra", "--max_seq_len 32",
           "--out", str(out)]
    stopped = subprocess.run([*cmd, "--deadline", "0.5"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "the same command resumes them" in stopped.stdout
    # two at a time on the CPU (--per-gpu 2): the first two started, the rest never did
    assert sorted(p.name for p in base.glob("q_*.log")) == ["q_torch_s1.log", "q_torch_s2.log"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert sorted(summary["runs"]) == ["fp8_s1", "fp8_s2", "torch_s1", "torch_s2"]
    for r in summary["runs"].values():
        assert r["steps"] == 10 and r["final_step"] == 10 and [s for s, _ in r["val_bpb"]] == [0, 5, 10]
    torch_v, fp8_v = summary["variants"]["torch"], summary["variants"]["fp8"]
    assert torch_v["spread"] == max(torch_v["finals"]) - min(torch_v["finals"])
    assert "delta_vs_exact" in fp8_v and len(fp8_v["train_s_to_exact_final"]) == 2
    # the tokens it ran on: the shards' fingerprint, per run too (runs from several summaries are compared by
    # it); no --make-data here, so no data recipe, and none of --make-data's options in its args either
    from nanochat_unsloth.shards.manifest import ShardManifest
    sha = ShardManifest.load(base / "shards").fingerprint()
    assert summary["data"] == {"shards_sha256": sha, "recipe": None}
    assert {r["shards_sha256"] for r in summary["runs"].values()} == {sha}
    assert "text_roots" not in summary["args"] and summary["args"]["depth"] == "2"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0 and "4 already finished" in again.stdout, again.stdout[-2000:]
    assert json.loads(out.read_text())["runs"] == summary["runs"]

    # --from: the same runs from two summaries (as two calls would leave them) give the same statistics
    parts = []
    for variant in ("torch", "fp8"):
        part = tmp_path / f"{variant}.json"
        part.write_text(json.dumps({"runs": {k: r for k, r in summary["runs"].items() if r["variant"] == variant}}))
        parts.append(str(part))
    merged_out = tmp_path / "merged.json"
    merged = subprocess.run([*RUNS, "quality", "--from", ",".join(parts), "--out", str(merged_out)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads(merged_out.read_text())["variants"] == summary["variants"]
    twice = subprocess.run([*RUNS, "quality", "--from", f"{parts[0]},{parts[0]}"], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert twice.returncode == 2 and "is in two files" in twice.stderr
    # runs on other shards do not compare: refused in one line; a run that recorded no fingerprint is noted
    other = json.loads(Path(parts[1]).read_text())
    for r in other["runs"].values():
        r["shards_sha256"] = "f" * 64
    Path(parts[1]).write_text(json.dumps(other))
    mixed = subprocess.run([*RUNS, "quality", "--from", ",".join(parts)], capture_output=True, text=True, timeout=120,
                           cwd=REPO)
    assert mixed.returncode == 2 and "trained on different shards" in mixed.stderr, mixed.stderr[-1000:]
    error = mixed.stderr.strip().splitlines()[-1]  # argparse's usage, then the error in one line
    assert error.startswith("runs.py quality: error: --from: the runs trained on different shards")
    assert f"{sha[:12]}: ['torch_s1', 'torch_s2']; ffffffffffff: ['fp8_s1', 'fp8_s2']" in error
    for r in other["runs"].values():
        del r["shards_sha256"]
    Path(parts[1]).write_text(json.dumps(other))
    unchecked = subprocess.run([*RUNS, "quality", "--from", ",".join(parts)], capture_output=True, text=True,
                               timeout=120, cwd=REPO)
    assert unchecked.returncode == 0 and "fp8_s1, fp8_s2 recorded no shard fingerprint" in unchecked.stdout

    refused = subprocess.run(cmd[:cmd.index("--tokens") + 1] + ["10000000"] + cmd[cmd.index("--tokens") + 2:],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
    assert refused.returncode == 2 and "never repeated" in refused.stderr, refused.stderr[-1000:]
    counted = subprocess.run(cmd + ["--data-only"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert counted.returncode == 0 and "60,000 train tokens" in counted.stdout, counted.stdout[-1000:]


def test_runs_quality_judges_fp8_by_the_exact_paths_spread_alone(tmp_path):
    """The test of equal quality: the other variant's mean within the exact path's seed-to-seed spread.
    A noisy variant must not pass on its own wide spread; the time to the exact path's final bpb is the step
    seconds up to the first evaluation at or below it."""
    import types

    quality = benchmark_module("real_runs.quality")
    finals = {("torch", 1): 1.750, ("torch", 2): 1.745, ("fp8", 1): 1.800, ("fp8", 2): 1.720}
    for (variant, seed), final in finals.items():
        run = tmp_path / "runs" / f"q_{variant}_s{seed}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "dt": 2.0, "smooth_loss": 3.0}) + "\n" for s in range(4)))
        evals = [(0, 4.0), (2, 1.740 if final < 1.74 else 1.9), (4, final)]
        (run / "eval.jsonl").write_text("".join(json.dumps({"step": s, "val_bpb": b}) + "\n" for s, b in evals))
    args = types.SimpleNamespace(base_dir=tmp_path, variants="torch,fp8", step_speedup="fp8=1.2")
    summary = quality.summarize(args, list(finals), 4)
    fp8 = summary["variants"]["fp8"]
    assert math.isclose(summary["variants"]["torch"]["spread"], 0.005) and math.isclose(fp8["spread"], 0.08)
    assert math.isclose(fp8["delta_vs_exact"], 0.0125)  # inside fp8's own spread, outside the exact path's
    assert fp8["within_exact_spread"] is False and fp8["no_worse_than_exact"] is False
    # in steps: the exact runs end at step 4; fp8 seed 2 crosses the exact mean (1.7475) between its step-0
    # (4.0) and step-2 (1.740) evaluations, at 2 * (4.0 - 1.7475) / (4.0 - 1.740) steps; seed 1 never does
    crossing = 2 * (4.0 - 1.7475) / (4.0 - 1.740)
    assert fp8["steps_to_exact_final"][0] is None and math.isclose(fp8["steps_to_exact_final"][1], crossing)
    assert math.isclose(fp8["equal_bpb_speedup_from_steps"][1], 4 / crossing * 1.2)
    # what the evaluations bound it to: a crossing after step 0 and at or before step 2, so at least 4 / 2 * 1.2
    # and unbounded above (no evaluation before it but step 0's)
    assert fp8["equal_bpb_speedup_from_steps_bracket"] == [None, (4 / 2 * 1.2, None)]
    # better than the exact path by more than its spread: outside the spread, yet no worse
    better = {"runs": {k: dict(v, final_val_bpb=v["final_val_bpb"] - (0.1 if v["variant"] == "fp8" else 0))
                       for k, v in summary["runs"].items()}, "variants": {}}
    quality.variant_stats(better, ["torch", "fp8"])
    assert better["variants"]["fp8"]["within_exact_spread"] is False
    assert better["variants"]["fp8"]["no_worse_than_exact"] is True
    assert fp8["train_s_to_exact_final"] == [None, 4.0]  # seed 2: its step-2 evaluation, after 2 steps of 2 s
    # the exact runs reach fp8's mean (1.760) at their step-4 evaluation (8 s) against fp8's 8 s of steps
    assert fp8["exact_s_to_this_final"] == [8.0, 8.0] and fp8["equal_bpb_speedup_at_most"] == 1.0
    # the same in steps, for runs on two machines: the exact runs cross 1.760 between step 2 (1.9) and step 4
    # (1.750, 1.745): 2 + 2 * (1.9 - 1.76) / (1.9 - final); over fp8's 4 steps, times --step-speedup's 1.2
    exact_steps = [2 + 2 * (1.9 - 1.76) / (1.9 - final) for final in (1.750, 1.745)]
    assert fp8["exact_steps_to_this_final"] == pytest.approx(exact_steps, rel=1e-12)
    assert fp8["steps_ratio_at_most"] == pytest.approx((sum(exact_steps) / 2) / 4, rel=1e-12)
    assert fp8["equal_bpb_speedup_at_most_from_steps"] == pytest.approx(fp8["steps_ratio_at_most"] * 1.2, rel=1e-12)
    # every run's train loss here is 3.0: no gap between a seed's two runs
    assert fp8["paired_train_loss_gap"] == 0.0


def test_paired_train_loss_gap_pairs_seeds_and_averages_the_last_tenth():
    """The variant's EMA train loss minus the exact path's of the same seed, over the last 10% of steps (20 steps
    of 200 here), averaged over the seeds both have; a seed the exact path lacks is left out."""
    gap = benchmark_module("real_runs.quality").paired_loss_gap

    def run(variant, seed, offset):
        return {"variant": variant, "seed": seed, "smooth_loss": [5.0 - 0.01 * i + (offset if i >= 180 else 9.0)
                                                                   for i in range(200)]}
    runs = [run("torch", 1, 0.0), run("fp8", 1, 0.02), run("torch", 2, 0.0), run("fp8", 2, -0.01),
            run("fp8", 3, 5.0)]
    # steps before the last 20 differ by 9 - 9 = 0 or are left out; the last 20 by +0.02 and -0.01
    assert gap(runs, "fp8") == pytest.approx(0.005, abs=1e-12)
    assert gap(runs[:1], "fp8") is None


def test_project_run_sorts_the_gaps_between_steps_as_the_loop_runs_its_events(tmp_path):
    """benchmarks/project_run.py on a real (tiny) run: every gap between two step records is attributed to the
    evaluation, checkpoint or samples the loop ran there, counted exactly; the projection's arithmetic too."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

    project_run = benchmark_module("project_run")

    base = make_train_base_dir(tmp_path / "base")
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "30", "--model-tag", "p"]
    for flag, value in (("--eval-every", "5"), ("--sample-every", "11")):
        args[args.index(flag) + 1] = value
    proc = subprocess.run([sys.executable, "-m", "nanochat_unsloth.train", *args, "--save-every", "7"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = project_run.measure(base / "runs" / "p", warmup=2)
    # 29 gaps (records 0..29): an evaluation before steps 5, 10, 15, 20, 25 (step 0's has no record before
    # it), a checkpoint before 7, 14, 21, 28, samples before 11 and 22; no two coincide
    assert m["samples_of_each"] == {"plain": 29 - 11, "eval": 5, "save": 4, "sample": 2}, m["samples_of_each"]
    assert m["step_s"] > 0 and m["world_size"] == 1 and m["depth"] == 2

    fake = {"first_step_s": 60.0, "step_s": 0.5, "plain_gap_s": 0.01, "eval_s": 10.0, "save_s": 4.0, "sample_s": 2.0}
    proj = project_run.project(fake, steps=1000, eval_every=250, save_every=300, sample_every=400)
    assert (proj["evaluations"], proj["checkpoints"], proj["samples"]) == (5, 4, 3)  # 0,250,...,1000; 300,600,900+end; 400,800+end
    assert proj["total_s"] == 60.0 + 999 * 0.5 + 999 * 0.01 + 5 * 10.0 + 4 * 4.0 + 3 * 2.0


def test_source_corpus_dedups_and_puts_a_hashed_sample_of_documents_last_as_val(tmp_path):
    """common.write_source_corpus (`runs.py scaling --make-data`, `runs.py quality --make-data`): each distinct
    text once, in the order of their hashes (a fixed shuffle, not path order: one kind of text must not fill the
    warm-down), the val split a hash-chosen one in `shards` of the documents (so every directory is in it)
    written as the last parquet."""
    import hashlib

    import pyarrow.parquet as pq

    common = benchmark_module("common")

    src = tmp_path / "src"
    for i in range(240):
        d = src / f"pkg{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 60)
    (src / "copy.py").write_text((src / "pkg0" / "m0.py").read_text())  # a copy: read once
    (src / "tiny.py").write_text("x = 1\n")  # under 200 characters: skipped
    (src / "notes.bin").write_text("y" * 500)  # not a text suffix
    out = tmp_path / "parquet"
    chars = common.write_source_corpus(out, max_chars=10**9, shards=12, roots=str(src), suffixes=(".py",))
    files = sorted(out.glob("*.parquet"))
    texts = [pq.read_table(f).column("text").to_pylist() for f in files]
    assert sum(len(t) for t in texts) == 240 and chars == sum(len(x) for t in texts for x in t)
    val = texts[-1]
    assert 0 < len(val) < 240 // 4  # about 1 in 12 (20 expected)
    digest = lambda text: hashlib.sha1(text.encode()).digest()  # noqa: E731
    assert all(digest(x)[-1] % 12 == 0 for x in val)
    train = [x for t in texts[:-1] for x in t]
    assert not any(digest(x)[-1] % 12 == 0 for x in train)
    assert [digest(x) for x in train] == sorted(digest(x) for x in train)  # shuffled by hash...
    modules = [int(x.split()[2]) for x in train]
    assert modules != sorted(modules)  # ...not in path order
    again = tmp_path / "again"
    common.write_source_corpus(again, max_chars=10**9, shards=12, roots=str(src), suffixes=(".py",))
    assert [pq.read_table(f).column("text").to_pylist() for f in sorted(again.glob("*.parquet"))] == texts
    # a smaller val share (`--val-every 48`): its documents a hash-chosen subset of the 1-in-12 split's
    fewer = tmp_path / "fewer"
    common.write_source_corpus(fewer, max_chars=10**9, shards=12, roots=str(src), suffixes=(".py",), val_every=48)
    small_val = pq.read_table(sorted(fewer.glob("*.parquet"))[-1]).column("text").to_pylist()
    assert small_val and all(digest(x)[-1] % 48 == 0 for x in small_val) and set(small_val) < set(val)


def test_gpu_sampler_parses_nvidia_smi_lines_and_summarises_busy_gpus():
    """common.GpuSampler (used by `runs.py scaling` and every train_throughput configuration): nvidia-smi's CSV
    lines become per-GPU samples; the summary covers the samples where a GPU was busy (utilisation >= 50%)."""
    import io
    import types

    common = benchmark_module("common")

    lines = ["0, 97, 1755, 690.5, 61, 0x0000000000000004", "0, 99, 1605, 699.0, 63, 0x0000000000000004",
             "0, 10, 1980, 120.0, 40, 0x0000000000000000", "1, 0, 345, 70.0, 31, 0x0000000000000001",
             "1, 0, 345, 71.0, 31, 0x0000000000000001", "garbage line", "0, [N/A], 1980, 100, 40, 0x0"]
    sampler = common.GpuSampler()
    sampler._proc = types.SimpleNamespace(stdout=io.StringIO("\n".join(lines) + "\n"))
    sampler._read(6)
    assert [len(sampler.samples[i]) for i in (0, 1)] == [3, 2]  # the unparsable lines are skipped
    summary = sampler.summary()
    assert summary[0]["busy"] and not summary[1]["busy"]
    assert summary[0]["busy_samples"] == 2 and summary[0]["sm_mhz_mean"] == 1680 and summary[0]["sm_mhz_min"] == 1605
    assert summary[0]["power_w_max"] == 699.0 and summary[0]["reasons"] == {"0x0000000000000004": 2}
    assert sampler.mean() == {0: round((97 + 99 + 10) / 3, 1), 1: 0.0}


def test_runs_quality_branch_from_starts_every_variant_at_one_checkpoint(tmp_path):
    """--branch-from RUN:STEP: each variant's run begins as a copy of RUN's checkpoint at STEP (and its logs up
    to it), then trains only the steps after it with its own flags; --per-gpu is accepted on the CPU too."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import make_train_base_dir

    base = make_train_base_dir(tmp_path / "base")
    common = ["--base_dir", str(base), "--depth", "2", "--device_batch_size", "2", "--total_batch_size", "128",
              "--max_seq_len", "32", "--num_iterations", "10", "--eval_tokens", "512", "--sample_every", "-1"]
    stopped = subprocess.run([sys.executable, "-m", "nanochat_unsloth.train", *common, "--model_tag", "trunk",
                              "--stop_after", "8", "--eval_every", "5"], capture_output=True, text=True, timeout=300,
                             cwd=REPO)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    cmd = [*RUNS, "quality", "--base-dir", str(base), "--depth", "2", "--tokens", "1280", "--device-batch-size", "2",
           "--total-batch", "128", "--variants", "torch,fp8-delayed", "--seeds", "1", "--eval-every", "5",
           "--eval-tokens", "512", "--save-every", "5", "--per-gpu", "2", "--branch-from", "trunk:8",
           "--extra", "--max_seq_len 32", "--out", str(tmp_path / "q.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    trunk = [json.loads(line) for line in (base / "runs" / "trunk" / "metrics.jsonl").read_text().splitlines()]
    for name, run in json.loads((tmp_path / "q.json").read_text())["runs"].items():
        assert run["steps"] == 10 and run["final_step"] == 10, name
        log = (base / f"q_{name.rsplit('_', 1)[0]}_s1.log").read_text()
        assert "at step 8" in log and "step 00000/" not in log  # resumed at the branch point, no step before it
        # the branch's first 8 steps are the trunk's own records
        assert run["smooth_loss"][:8] == [r["smooth_loss"] for r in trunk]
    bad = subprocess.run(cmd[:cmd.index("--variants") + 1] + ["fp9"] + cmd[cmd.index("--variants") + 2:],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--variants: unknown ['fp9']" in bad.stderr


def test_runs_quality_counts_a_run_that_crashes_after_the_deadline_as_failed(tmp_path, monkeypatch):
    """After --deadline's SIGTERM a run may stop (3; 130 or -15 still in start-up): one that exits otherwise (a
    crash while saving) is a failure, exit 1, not the 3 that says the same command resumes it."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import make_train_base_dir

    quality, runs = benchmark_module("real_runs.quality"), benchmark_module("runs")
    base = make_train_base_dir(tmp_path / "base")
    ready = tmp_path / "ready"
    crash_on_term = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(1)); "
                     f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)")

    def start(*_):
        proc = subprocess.Popen([sys.executable, "-c", crash_on_term])
        for _ in range(600):  # its handler is in place before the deadline's signal can come
            if ready.exists():
                return proc
            time.sleep(0.05)
        raise AssertionError("the stand-in run never started")

    monkeypatch.setattr(quality, "start", start)
    parser = runs.build_parser()
    args = parser.parse_args(["quality", "--base-dir", str(base), "--depth", "2", "--tokens", "640",
                              "--total-batch", "128", "--variants", "torch", "--seeds", "1", "--deadline", "0.1"])
    assert quality.run(args, parser) == 1


def test_quality_statistics_count_only_finished_runs():
    """A summary written at a --deadline holds runs still under way (their last evaluation, or none yet): the
    means, spreads and equal-bpb figures come from the finished runs alone."""
    variant_stats = benchmark_module("real_runs.quality").variant_stats

    def run(variant, seed, curve, finished=True):
        return {"variant": variant, "seed": seed, "train_s": 10.0 * len(curve), "val_bpb": curve,
                "final_val_bpb": curve[-1][1] if curve else None, "final_step": curve[-1][0] if curve else None,
                "elapsed_at_step": {s: 10.0 * (i + 1) for i, (s, _) in enumerate(curve)}, "finished": finished}
    out = {"runs": {"torch_s1": run("torch", 1, [(0, 4.0), (5, 2.0), (10, 1.5)]),
                    "torch_s2": run("torch", 2, [(0, 4.0), (5, 2.2)], finished=False),
                    "torch_s3": run("torch", 3, [], finished=False),
                    "fp8_s1": run("fp8", 1, [(0, 4.0), (5, 1.9), (10, 1.4)]),
                    "fp8_s2": run("fp8", 2, [(0, 4.0)], finished=False)}, "variants": {}}
    variant_stats(out, ["torch", "fp8"])
    assert out["variants"]["torch"]["finals"] == [1.5] and out["variants"]["fp8"]["finals"] == [1.4]
    assert out["variants"]["fp8"]["delta_vs_exact"] == pytest.approx(-0.1, abs=1e-12)  # 1.4 - 1.5 in floats
    assert len(out["variants"]["fp8"]["steps_to_exact_final"]) == 1


def test_quality_step_speedup_names_a_variant_of_the_summary(tmp_path, capsys):
    """--step-speedup VARIANT=RATIO gives the speed-up at equal bpb from steps, the figure runs on two machines
    are compared by: a name that is no variant of the runs (a typo, a space after the comma) is refused, not
    silently left without that figure."""
    import types

    quality = benchmark_module("real_runs.quality")

    def run(variant, final):
        return {"variant": variant, "seed": 1, "train_s": 4.0, "val_bpb": [(0, 4.0), (4, final)],
                "final_val_bpb": final, "final_step": 4, "elapsed_at_step": {"4": 4.0}, "finished": True}
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"runs": {"torch_s1": run("torch", 2.0), "fp8_s1": run("fp8", 1.9)}}))

    def report(step_speedup):
        args = types.SimpleNamespace(from_=str(path), step_speedup=step_speedup, out=None, plot="")
        quality.report_from(argparse.ArgumentParser(prog="quality"), args)
        return capsys.readouterr()
    # fp8 reaches 2.0 at 4 * (4.0 - 2.0) / (4.0 - 1.9) steps; the exact path at its step 4
    out = report("torch=1.0, fp8=1.2").out
    assert "equal-bpb speed-up from steps [" in out, out
    figure = float(out.split("equal-bpb speed-up from steps [")[1].split("]")[0])
    assert figure == pytest.approx(4 / (4 * 2.0 / 2.1) * 1.2, rel=1e-12)  # float rounding alone
    for wrong in ("fp9=1.2", "fp8=1.2,fused=1.05"):
        with pytest.raises(SystemExit, match="is not a variant of these runs"):
            report(wrong)
    # two summaries compare only at the same settings: another --eval-tokens scores other val tokens
    args = {"depth": "2", "tokens": "512", "total_batch": "128", "device_batch_size": "2", "eval_tokens": "512",
            "extra": ""}
    exact, fp8 = tmp_path / "exact.json", tmp_path / "fp8.json"
    exact.write_text(json.dumps({"runs": {"torch_s1": run("torch", 2.0)}, "args": args}))
    fp8.write_text(json.dumps({"runs": {"fp8_s1": run("fp8", 1.9)}, "args": args}))
    path = f"{exact},{fp8}"
    assert "equal-bpb speed-up from steps [" in report("fp8=1.2").out
    fp8.write_text(json.dumps({"runs": {"fp8_s1": run("fp8", 1.9)}, "args": dict(args, eval_tokens="1024")}))
    with pytest.raises(SystemExit):
        report("fp8=1.2")
    assert f"--from {fp8}: --eval-tokens '1024', but {exact} ran with '512'" in capsys.readouterr().err


def test_quality_reads_only_the_val_bpb_records_of_eval_jsonl(tmp_path):
    """eval.jsonl also holds the CORE metric's records (`--extra "--core_metric_every N"`: one at the last step,
    after its val bpb) and they carry no val bpb: the summary's curve, final bpb and `finished` come from the
    val bpb records alone."""
    import types

    quality = benchmark_module("real_runs.quality")
    run = tmp_path / "runs" / "q_torch_s1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "dt": 1.0, "smooth_loss": 3.0}) + "\n"
                                               for s in range(4)))
    records = [{"step": 0, "val_bpb": 4.0}, {"step": 2, "core_metric": 0.1, "centered_results": {}},
               {"step": 4, "val_bpb": 2.0}, {"step": 4, "core_metric": 0.2, "centered_results": {}}]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = types.SimpleNamespace(base_dir=tmp_path, variants="torch", step_speedup="")
    r = quality.summarize(args, [("torch", 1)], 4)["runs"]["torch_s1"]
    assert r["val_bpb"] == [(0, 4.0), (4, 2.0)] and r["final_val_bpb"] == 2.0 and r["finished"] is True


def test_runs_capacity_reports_each_depth_that_trains_and_stops_at_the_first_that_does_not(tmp_path):
    """`runs.py capacity`: depths in the order given per launch until one fails; each that trains reports its
    steady tok/s and peak memory, is killed after --steps steps (no checkpoint), and the deepest is summarised."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import make_train_base_dir

    base = make_train_base_dir(tmp_path / "base")
    out = tmp_path / "cap.json"
    proc = subprocess.run([*RUNS, "capacity", "--base-dir", str(base), "--depths", "1,0,3", "--launches", "fast,lean",
                           "--device-batch-size", "2", "--seq", "32", "--steps", "3", "--warmup", "1",
                           "--timeout", "240", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    tried = [(r["launch"], r["depth"]) for r in result["rows"]]
    assert tried == [("fast", 1), ("fast", 0), ("lean", 1), ("lean", 0)]  # d3 never
    for r in result["rows"]:
        if r["depth"]:
            assert r["rc"] == 0 and r["steps"] >= 3 and r["tok_per_sec"] > 0 and "peak_mem_gib" in r, r
        else:  # depth 0 is refused by the loop: it counts as not fitting
            assert r["rc"] == 2 and "tok_per_sec" not in r, r
    assert result["deepest"] == {"fast": 1, "lean": 1}
    assert not list((base / "runs" / "capacity_fast_d1").glob("step_*"))  # killed before any checkpoint
    assert "deepest, lean: d1" in proc.stdout


def test_runs_help_lists_every_subcommand_and_each_subcommand_has_help():
    """runs.py is the one entry point for real runs: its --help names every subcommand, and each subcommand's
    --help works on the CPU (no torch, no GPU, no base dir) and lists an option of its own."""
    own_option = {"scaling": "--profile-step", "curve": "--configs", "resume": "--cut", "quality": "--branch-from",
                  "ab": "--parity", "deepspeed": "--gpus", "capacity": "--launches"}
    assert list(benchmark_module("runs").SUBCOMMANDS) == list(own_option)
    top = subprocess.run([*RUNS, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert top.returncode == 0, top.stderr[-2000:]
    listed = top.stdout[top.stdout.index("positional arguments"):]
    for name in own_option:
        assert f"\n    {name}" in listed, (name, listed)
    for name, option in own_option.items():
        sub = subprocess.run([*RUNS, name, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert sub.returncode == 0 and f"usage: runs.py {name}" in sub.stdout and option in sub.stdout, sub.stderr
    none = subprocess.run(RUNS, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert none.returncode == 2 and "SUBCOMMAND" in none.stderr


def test_no_benchmark_script_imports_another():
    """Scripts share code through common.py (and runs.py through real_runs/) only: a script imported by another
    would run its own top-level code there and tie the two scripts' command lines together."""
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - {"common"}
    for path in [*BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("real_runs/*.py")]:
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert not imported & scripts, (path.name, imported & scripts)


def test_runs_curve_controls_run_with_their_own_flags_and_are_compared_with_a(tmp_path, monkeypatch, capsys):
    """`runs.py curve --controls`: each control is one more 1-GPU run with --extra plus its own flags, started
    once, and compared with A as the N runs are. The loop is replaced by a stand-in that writes each run's logs
    (run k's losses offset by k x 1e-3 from A's), so what is checked is the wiring and the arithmetic."""
    curve = benchmark_module("real_runs.curve")
    started, scripts = [], {}

    class Finished:
        def wait(self):
            return 0

    def fake_training(base_dir, tag, train_args, gpu=None, processes=1, config=None, script=None):
        started.append((tag, train_args, processes, config))
        scripts[tag] = script
        offset = 1e-3 * (len(started) - 1)
        run = base_dir / "runs" / tag
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 4.0 + offset, "tok_per_sec": 1000.0, "peak_mem_gib": 1.0}) + "\n"
            for s in range(4)))
        (run / "eval.jsonl").write_text(json.dumps({"step": 4, "val_bpb": 2.0 + offset}) + "\n")
        return Finished()

    monkeypatch.setattr(curve, "start_training", fake_training)
    monkeypatch.setattr(curve, "gpu_count", lambda: 1)
    argv = ["--base-dir", str(tmp_path), "--gpus", "2", "--steps", "4", "--eval-every", "2", "--extra",
            "--kernels torch", "--controls", "compile_none=--compile none; eager_loss=--compile blocks;"
            "wte=@wte_fp32 --compile none", "--out", str(tmp_path / "curve.json")]
    p = argparse.ArgumentParser()
    curve.add_arguments(p)
    assert curve.run(p.parse_args(argv), p) == 0
    assert [(t, n, c) for t, _, n, c in started] == [("curve_1gpu_a", 1, None), ("curve_1gpu_b", 1, None),
                                                    ("curve_1gpu_compile_none", 1, None),
                                                    ("curve_1gpu_eager_loss", 1, None), ("curve_1gpu_wte", 1, None),
                                                    ("curve_2gpu", 2, None)]
    flags = {t: args[args.index("--force") + 1:] for t, args, _, _ in started}
    assert flags["curve_1gpu_compile_none"] == ["--kernels", "torch", "--compile", "none"]
    # "@wte_fp32": its script runs the loop, with the flags after it
    assert flags["curve_1gpu_wte"] == flags["curve_1gpu_compile_none"]
    assert scripts == {**{t: None for t in scripts if t != "curve_1gpu_wte"},
                       "curve_1gpu_wte": str(BENCHMARKS / "real_runs" / "train_wte_fp32.py")}
    assert flags["curve_1gpu_a"] == flags["curve_2gpu"] == ["--kernels", "torch"]
    result = json.loads((tmp_path / "curve.json").read_text())
    assert result["a_vs_compile_none_max_rel"][0] == pytest.approx(2e-3 / 4.0)  # the third run: offset 2e-3
    assert result["a_vs_n_max_rel"][0] == pytest.approx(5e-3 / 4.0)  # the sixth run
    assert "1 GPU vs 1 GPU eager_loss" in capsys.readouterr().out
    assert curve.run(p.parse_args(argv), p) == 0 and len(started) == 6  # all finished: none started again
    with pytest.raises(SystemExit):
        curve.run(p.parse_args([*argv[:-4], "--controls", "a=--compile none"]), p)
    with pytest.raises(SystemExit):  # no train_nothing.py
        curve.run(p.parse_args([*argv[:-4], "--controls", "x=@nothing"]), p)


def test_the_wte_fp32_control_keeps_the_embedding_in_fp32_and_trains(tmp_path, monkeypatch):
    """benchmarks/real_runs/train_wte_fp32.py: the loop with wte left in fp32 where our path (nanochat's) makes it
    bf16 (CUDA). On this CPU, where it is fp32 anyway, the patched init is checked on a model whose wte was made
    bf16 by hand, and the script trains a tiny run to its end through the real loop, from the flags as the curve
    runner spells them."""
    import runpy

    import torch

    from nanochat_unsloth.model.gpt import GPT, GPTConfig

    monkeypatch.setattr(GPT, "init_weights", GPT.init_weights)  # restored after the script's patch
    runpy.run_path(str(BENCHMARKS / "real_runs" / "train_wte_fp32.py"), run_name="control")
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.transformer.wte.to(torch.bfloat16)
    model.init_weights()
    assert model.transformer.wte.weight.dtype == torch.float32

    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

    base = make_train_base_dir(tmp_path / "base")
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "2", "--model-tag", "wte"]
    # in nanochat's spellings, as `runs.py curve` passes them to every run, this control's too
    args = ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in args]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "real_runs" / "train_wte_fp32.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((base / "runs" / "wte" / "metrics.jsonl").read_text().splitlines()) == 2


def test_runs_deepspeed_runs_the_curves_then_the_speed_of_each_config_and_stops_at_a_failure(tmp_path, monkeypatch):
    """`runs.py deepspeed`: the d12 curves of the three ZeRO configs against one 1-GPU pair, then the d20 speed of
    DDP and each ZeRO config, with multicast off for every launch; the corpus only when the base dir has none."""
    deepspeed = benchmark_module("real_runs.deepspeed")
    for key in deepspeed.NO_MULTICAST:  # restored after the test: the subcommand sets them for its launches
        monkeypatch.delenv(key, raising=False)
    calls = []

    def record(name, rc):
        def run(args, p):
            calls.append((name, args))
            return rc(len(calls))
        return run

    monkeypatch.setattr(deepspeed, "make_data", lambda base, *a: calls.append(("make_data", base)))
    monkeypatch.setattr(deepspeed.curve, "run", record("curve", lambda n: 0))
    monkeypatch.setattr(deepspeed.scaling, "run", record("scaling", lambda n: 0))
    args, parser = deepspeed.subcommand_args(deepspeed, ["--base-dir", str(tmp_path), "--gpus", "4"])
    assert deepspeed.run(args, parser) == 0
    assert [c[0] for c in calls] == ["make_data", "curve"] + ["scaling"] * 4
    curve_args = calls[1][1]
    assert (curve_args.gpus, curve_args.depth, curve_args.steps, curve_args.eval_every) == (4, 12, 100, 25)
    assert [Path(c).stem for c in curve_args.configs.split(",")] == list(deepspeed.ZERO_CONFIGS)
    assert curve_args.extra == "--kernels torch" and curve_args.out == tmp_path / "deepspeed_curves_d12_4gpu.json"
    # our path compiled as ZeRO-3 and ZeRO-2 are, and with wte in fp32 as under ZeRO, alone and uncompiled
    assert [c.split("=", 1) for c in curve_args.controls.split(";")] == [
        ["compile_none", "--compile none"], ["compile_blocks", "--compile blocks"], ["wte_fp32", "@wte_fp32"],
        ["wte_fp32_eager", "@wte_fp32 --compile none"]]
    speeds = [c[1] for c in calls[2:]]
    assert [Path(s.config).stem for s in speeds] == ["multi_gpu", *deepspeed.ZERO_CONFIGS]
    assert all((s.gpus, s.variants, s.depth, s.steps) == ("4", "torch", 20, 12) for s in speeds)
    assert speeds[1].out == tmp_path / "speed_d20_deepspeed_zero2_4gpu.json"
    assert all(os.environ[k] == v for k, v in deepspeed.NO_MULTICAST.items())

    calls.clear()  # shards present: no corpus; the second speed run fails: nothing after it
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    monkeypatch.setattr(deepspeed.scaling, "run", record("scaling", lambda n: 1 if n == 3 else 0))
    assert deepspeed.run(args, parser) == 1
    assert [c[0] for c in calls] == ["curve", "scaling", "scaling"]


def test_runs_deepspeed_compare_reads_each_zero_run_against_each_of_our_runs_and_the_noise(tmp_path, capsys):
    """`runs.py deepspeed --part compare`: the curves of one invocation and the controls of another, each ZeRO run
    against every run of ours, and our repeated runs' gaps (each file's a and b, across files too) as the noise.
    Losses made up so that every gap is known: relative to our run, the largest per window."""
    deepspeed = benchmark_module("real_runs.deepspeed")
    windows = ["0-1", "2-3"]
    base = [4.0, 4.0, 2.0, 2.0]
    curves = {"windows": windows, "loss": {"a": base, "b": [4.0, 4.0, 2.0, 2.02],
                                           "deepspeed_zero2": [4.0, 4.04, 2.0, 2.1]}}
    controls = {"windows": windows, "loss": {"a": [4.0, 4.0, 2.01, 2.0], "b": base,
                                             "compile_blocks": [4.0, 4.04, 2.0, 2.1]}}
    (tmp_path / "curves.json").write_text(json.dumps(curves))
    (tmp_path / "controls.json").write_text(json.dumps(controls))

    def invoke(files, out=None):
        argv = ["--part", "compare", "--from", ",".join(str(tmp_path / f) for f in files)]
        args, p = deepspeed.subcommand_args(deepspeed, argv + (["--out", str(out)] if out else []))
        return deepspeed.run(args, p)

    assert invoke(["curves.json", "controls.json"], tmp_path / "cmp.json") == 0
    result = json.loads((tmp_path / "cmp.json").read_text())
    approx = pytest.approx
    assert result["noise"]["a@1 vs b@1"] == approx([0.0, 0.02 / 2.02])
    assert result["noise"]["a@1 vs a@2"] == approx([0.0, 0.01 / 2.01])
    assert result["noise_max"] == approx([0.0, 0.02 / 2.0])  # b@1 vs b@2
    assert result["controls_vs_a"]["compile_blocks vs a@2"] == approx([0.04 / 4.0, 0.1 / 2.0])
    assert result["zero"]["deepspeed_zero2"]["compile_blocks"] == [0.0, 0.0]
    assert result["zero"]["deepspeed_zero2"]["b@1"] == approx([0.01, 0.08 / 2.02])
    out = capsys.readouterr().out
    assert "  compile_blocks" in out.split("deepspeed_zero2 against")[1].splitlines()[1]  # the nearest first
    # refused in one line each: no ZeRO run; no pair of our runs; another length; a control in two files
    (tmp_path / "alone.json").write_text(json.dumps({"windows": windows, "loss": {
        "a": base, "deepspeed_zero3": base}}))
    for files, message in ((["controls.json"], "no run of deepspeed_zero2"), (["alone.json"], "no pair of our own"),
                           (["curves.json", "other.json"], "windows ['0-4'], the first file's are"),
                           (["controls.json", "controls2.json", "curves.json"], "'compile_blocks' is in an earlier")):
        (tmp_path / "other.json").write_text(json.dumps({"windows": ["0-4"], "loss": {}}))
        (tmp_path / "controls2.json").write_text(json.dumps(controls))
        with pytest.raises(SystemExit):
            invoke(files)
        assert message in capsys.readouterr().err, files


def test_runs_curve_on_one_gpu_runs_the_pair_in_turn_and_spreads_the_runs_over_invocations(tmp_path, monkeypatch):
    """`runs.py curve` on a 1-GPU machine: the 1-GPU pair one after the other on GPU 0, each config's run on
    one process; --runs starts only the runs named, a finished run started with the same settings is reused,
    and the comparison comes once every run has finished. Runs are faked (a log of --steps steps each)."""
    curve = benchmark_module("real_runs.curve")
    monkeypatch.setattr(curve, "gpu_count", lambda: 1)
    started, running = [], []

    class FakeRun:
        def __init__(self, base_dir, tag, train_args, gpu=None, processes=1, config=None, script=None):
            assert not running, f"{tag} started while {running} runs"  # one at a time on the one GPU
            started.append((tag, gpu, processes, config and Path(config).stem))
            running.append(tag)
            run_dir = base_dir / "runs" / tag
            run_dir.mkdir(parents=True, exist_ok=True)
            steps = int(train_args[train_args.index("--num_iterations") + 1])
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "loss": 5.0 - s / 10, "tok_per_sec": 1000.0, "peak_mem_gib": 1.0}) + "\n"
                for s in range(steps)))
            (run_dir / "eval.jsonl").write_text(json.dumps({"step": steps, "val_bpb": 1.5}) + "\n")

        def wait(self):
            running.clear()
            return 0

    monkeypatch.setattr(curve, "start_training", FakeRun)
    configs = ",".join(str(REPO / "configs" / "accelerate" / f"deepspeed_zero{s}.yaml") for s in (2, 3))
    out = tmp_path / "curves.json"

    def invoke(*extra):
        args, p = benchmark_module("real_runs.deepspeed").subcommand_args(curve, [
            "--base-dir", str(tmp_path), "--gpus", "1", "--steps", "12", "--configs", configs, "--out", str(out),
            *extra])
        return curve.run(args, p)

    assert invoke("--runs", "a,b") == 0 and not out.exists()
    assert started == [("curve_1gpu_a", 0, 1, None), ("curve_1gpu_b", 0, 1, None)]
    started.clear()
    assert invoke("--runs", "a,deepspeed_zero2") == 0 and not out.exists()  # a: finished, reused
    assert started == [("curve_deepspeed_zero2_1gpu", None, 1, "deepspeed_zero2")]
    started.clear()
    assert invoke() == 0  # only zero3 is left; then the comparison of all four
    assert started == [("curve_deepspeed_zero3_1gpu", None, 1, "deepspeed_zero3")]
    result = json.loads(out.read_text())
    assert result["a_vs_deepspeed_zero3_max_rel"] == [0.0, 0.0] and result["windows"] == ["0-9", "10-11"]
    started.clear()
    assert invoke("--extra", "--kernels fused", "--runs", "b") == 0  # other settings: not the same run, run again
    assert started == [("curve_1gpu_b", 0, 1, None)]
    with pytest.raises(SystemExit):
        invoke("--runs", "zero9")


def test_runs_deepspeed_on_one_gpu_runs_the_curves_alone_and_passes_runs_on(tmp_path, monkeypatch):
    """`runs.py deepspeed --gpus 1`: ZeRO on one process for the curves, no speed runs (`scaling` would launch
    one GPU without the DeepSpeed config), --runs handed to `curve`; --part speed with one GPU is refused."""
    deepspeed = benchmark_module("real_runs.deepspeed")
    for key in deepspeed.NO_MULTICAST:
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    calls = []
    monkeypatch.setattr(deepspeed.curve, "run", lambda args, p: calls.append(("curve", args)) or 0)
    monkeypatch.setattr(deepspeed.scaling, "run", lambda args, p: calls.append(("scaling", args)) or 0)
    args, parser = deepspeed.subcommand_args(deepspeed, ["--base-dir", str(tmp_path), "--gpus", "1",
                                                         "--runs", "a,b"])
    assert deepspeed.run(args, parser) == 0
    assert [c[0] for c in calls] == ["curve"]
    assert (calls[0][1].gpus, calls[0][1].runs) == (1, "a,b")
    assert calls[0][1].out == tmp_path / "deepspeed_curves_d12_1gpu.json"
    args, parser = deepspeed.subcommand_args(deepspeed, ["--base-dir", str(tmp_path), "--gpus", "1",
                                                         "--part", "speed"])
    with pytest.raises(SystemExit):
        deepspeed.run(args, parser)
    calls.clear()
    args, parser = deepspeed.subcommand_args(deepspeed, ["--base-dir", str(tmp_path), "--gpus", "2",
                                                         "--part", "speed"])
    assert deepspeed.run(args, parser) == 0 and [c[0] for c in calls] == ["scaling"] * 4
    # --part controls: the 1-GPU pair and the controls on their own, one GPU whatever --gpus says, no ZeRO run
    calls.clear()
    args, parser = deepspeed.subcommand_args(deepspeed, ["--base-dir", str(tmp_path), "--gpus", "2",
                                                         "--part", "controls", "--runs", "a,wte_fp32"])
    assert deepspeed.run(args, parser) == 0 and [c[0] for c in calls] == ["curve"]
    controls = calls[0][1]
    assert (controls.gpus, controls.configs, controls.runs) == (1, "none", "a,wte_fp32")
    assert controls.controls == deepspeed.CONTROLS and controls.out == tmp_path / "deepspeed_controls_d12_1gpu.json"


def test_runs_curve_with_configs_none_compares_the_one_gpu_runs_alone(tmp_path, monkeypatch):
    """`runs.py curve --configs none`: A, B and the controls, no N-GPU run; the comparison is made once those
    have finished (what `runs.py deepspeed --part controls` uses on a machine without the ZeRO runs)."""
    curve = benchmark_module("real_runs.curve")
    started = []

    class Finished:
        def wait(self):
            return 0

    def fake_training(base_dir, tag, train_args, gpu=None, processes=1, config=None, script=None):
        started.append(tag)
        run = base_dir / "runs" / tag
        run.mkdir(parents=True)
        offset = 1e-3 * (len(started) - 1)
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 4.0 + offset, "tok_per_sec": 1000.0, "peak_mem_gib": 1.0}) + "\n"
            for s in range(4)))
        (run / "eval.jsonl").write_text(json.dumps({"step": 4, "val_bpb": 2.0}) + "\n")
        return Finished()

    monkeypatch.setattr(curve, "start_training", fake_training)
    monkeypatch.setattr(curve, "gpu_count", lambda: 1)
    p = argparse.ArgumentParser()
    curve.add_arguments(p)
    args = p.parse_args(["--base-dir", str(tmp_path), "--gpus", "1", "--steps", "4", "--eval-every", "2",
                         "--configs", "none", "--controls", "wte=@wte_fp32", "--out", str(tmp_path / "c.json")])
    assert curve.run(args, p) == 0
    assert started == ["curve_1gpu_a", "curve_1gpu_b", "curve_1gpu_wte"]
    result = json.loads((tmp_path / "c.json").read_text())
    assert sorted(k for k in result if k.endswith("_max_rel")) == ["a_vs_b_max_rel", "a_vs_wte_max_rel"]
    assert result["a_vs_wte_max_rel"][0] == pytest.approx(2e-3 / 4.0)


def test_runs_quality_gpus_per_run_trains_each_run_data_parallel_on_its_own_gpus(tmp_path, monkeypatch):
    """--gpus-per-run K: every run is one `accelerate launch` of K processes on K GPUs of its own, so 4 GPUs take
    two runs of 2 at once, each with its own rendezvous port. The loop is a stand-in that writes a finished run's
    logs (a CPU has no GPUs to launch on); what is checked is the wiring down to the launch command. Asking for
    more GPUs than the machine has, or sharing them with --per-gpu, is refused before anything starts."""
    quality, common = benchmark_module("real_runs.quality"), benchmark_module("common")
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import make_train_base_dir

    base = make_train_base_dir(tmp_path / "base")
    launched = []

    def fake_training(base_dir, tag, train_args, gpu=None, processes=1, config=None, script=None, port=None):
        launched.append((tag, gpu, processes, port))
        run = base_dir / "runs" / tag
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "dt": 1.0, "smooth_loss": 3.0}) + "\n"
                                                   for s in range(10)))
        (run / "eval.jsonl").write_text(json.dumps({"step": 10, "val_bpb": 2.0}) + "\n")
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(quality, "start_training", fake_training)
    monkeypatch.setattr(quality, "gpu_count", lambda: 4)
    parser = benchmark_module("runs").build_parser()
    argv = ["quality", "--base-dir", str(base), "--depth", "2", "--tokens", "1280", "--total-batch", "128",
            "--variants", "torch,fp8", "--seeds", "1", "--gpus-per-run", "2", "--out", str(tmp_path / "q.json")]
    assert quality.run(parser.parse_args(argv), parser) == 0
    assert sorted(launched) == [("q_fp8_s1", (2, 3), 2, 29502), ("q_torch_s1", (0, 1), 2, 29500)]
    assert json.loads((tmp_path / "q.json").read_text())["args"]["gpus_per_run"] == "2"
    for bad, why in ((["--gpus-per-run", "8"], "this machine has 4 GPUs; pass 1 to 4"),
                     (["--gpus-per-run", "2", "--per-gpu", "2"], "leave --per-gpu at 1")):
        with pytest.raises(SystemExit):
            quality.run(parser.parse_args([*argv[:-4], *bad]), parser)
    monkeypatch.setattr(quality, "gpu_count", lambda: 0)
    with pytest.raises(SystemExit):
        quality.run(parser.parse_args(argv), parser)

    # the launch itself: K ranks through accelerate on the tuple's GPUs, at the given port
    seen = {}
    monkeypatch.setattr(common.subprocess, "Popen", lambda cmd, env, **kw: seen.update(cmd=cmd, env=env))
    common.start_training(tmp_path, "t", ["--depth", "2"], gpu=(2, 3), processes=2, port=29502)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    launch = seen["cmd"][seen["cmd"].index("accelerate.commands.launch"):]
    assert launch[launch.index("--num_processes") + 1] == "2"
    assert launch[launch.index("--main_process_port") + 1] == "29502"
